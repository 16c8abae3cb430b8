"""Throughput accounting: model FLOPs per token, MFU, and accelerator peak FLOP/s.

Convention (PaLM appendix B / Megatron): a matmul with a [in, out] weight costs 2*in*out
FLOPs per token forward and the same again for each gradient it produces (input, weight).
Attention score/value products are counted for the full ``seq_len`` (no causal halving and
no saving from packed-document masks), so MFU numbers stay comparable across kernels.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["flops_per_token", "mfu", "peak_flops", "matmul_param_counts"]

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, FLOP/s, from the vendor data sheets.
_PEAK_BF16 = (
    ("h200", 989e12),
    ("h100", 989e12),  # SXM; the PCIe card is lower (756e12)
    ("gh200", 989e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("a10g", 70e12),
)


def flops_per_token(config: Any, *, num_trainable: int, num_frozen: int, seq_len: int, lora: bool) -> float:
    """Training FLOPs per token (forward + backward) for one optimizer micro-step.

    Exact formula, with L = ``config.num_hidden_layers``, H = ``config.hidden_size``,
    S = ``seq_len`` (packed row length):

    * attention = 12 * L * H * S  (QK^T and AV: 2 matmuls * 2 FLOPs * S * H per layer forward,
      x3 for forward + backward; attention has no weights, so LoRA does not change it)
    * LoRA (``lora=True``): 4 * num_frozen + 6 * num_trainable + attention.
      Frozen weights run forward (2) and the input gradient (2) but no weight gradient.
    * full fine-tuning (``lora=False``): 6 * (num_trainable + num_frozen) + attention
      (frozen parameters, if any, are counted as trained: full FT rarely freezes any).

    Counts should be of weights used in matmuls: leave out the input embedding table (a
    lookup) unless it is tied to lm_head; :func:`matmul_param_counts` does that.
    """
    num_layers = int(config.num_hidden_layers)
    hidden = int(config.hidden_size)
    attention = 12.0 * num_layers * hidden * seq_len
    if lora:
        return 4.0 * num_frozen + 6.0 * num_trainable + attention
    return 6.0 * (num_trainable + num_frozen) + attention


def matmul_param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts, excluding untied input embedding tables."""
    embeddings = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            embeddings.add(id(module.weight))
    out_emb = getattr(model, "get_output_embeddings", lambda: None)()
    if out_emb is not None:
        embeddings.discard(id(out_emb.weight))  # tied: the table is also the lm_head matmul
    trainable = frozen = 0
    for p in model.parameters():
        if id(p) in embeddings:
            continue
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1]; None when the peak is unknown (CPU)."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` (per GPU), or None for CPU / unknown GPUs."""
    device = torch.device(device) if device is not None else None
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, value in _PEAK_BF16:
        if key in name:
            if key == "h100" and "pcie" in name:
                return 756e12
            return value
    return None
