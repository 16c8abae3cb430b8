"""Does `train.compile` compute the same loss as eager? Compiled vs eager vs an fp32 reference.

    PYTHONPATH=. python scripts/compile_check.py --tiny            # CPU, seconds
    PYTHONPATH=. python3 scripts/compile_check.py --out $OUT/compile_check.json   # GPU: Llama-3.1-8B arch
    PYTHONPATH=. python scripts/compile_check.py --arch 8b --layers 4 --seq 1024  # CPU: 8B width, 4 layers

One model with random weights (scripts/bench_gpu.py's `build_model`: bf16 base, float32 LoRA r16 on
all projections, here with LoRA B drawn non-zero so the adapters take part), one packed batch of
documents (position ids restart per document, as the trainer feeds it: no cu_seqlens), the
trainer's loss (`llama_train.loss.causal_lm_loss`) and its compilation
(`llama_train.model.compile_decoder_layers`). Losses per token, no grad:

  eager_bf16, compiled_bf16   under bf16 autocast (how the GPU recipes train)
  eager_fp32, compiled_fp32   the same weights upcast to float32; eager_fp32 is the reference

If compiled_bf16 is about as far from eager_fp32 as eager_bf16 is, a compiled/eager gap in bf16 is
rounding; if it is much farther, the compiled path computes something else. `per_layer` then says
where: the relative error (Frobenius norm) of every decoder layer's output hidden states against
the eager fp32 ones, for eager_bf16 and compiled_bf16, and compiled vs eager bf16 (the layers'
outputs are recorded by an uncompiled wrapper around each compiled layer, so recording changes
nothing inside the compiled graphs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_gpu import build_model, make_batch, set_attn  # noqa: E402

from llama_train import attention  # noqa: E402
from llama_train.loss import causal_lm_loss  # noqa: E402
from llama_train.model import compile_decoder_layers  # noqa: E402


class Tap(torch.nn.Module):
    """Wraps a decoder layer (which itself gets compiled) and records its output hidden states."""

    def __init__(self, layer, store: list):
        super().__init__()
        self.layer, self.store = layer, store

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        self.store.append((out[0] if isinstance(out, tuple) else out).detach().clone())
        return out


def tap_layers(model) -> list:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    store: list = []
    base.model.layers = torch.nn.ModuleList(Tap(layer, store) for layer in base.model.layers)
    return store


def rel_errors(got: list, ref: list) -> list[float]:
    return [float((g.float() - r.float()).norm() / r.float().norm()) for g, r in zip(got, ref)]


def loss_of(model, batch, *, bf16: bool, device) -> float:
    input_ids, labels, position_ids, _, _ = batch
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss_sum, n = causal_lm_loss(model, input_ids, labels, position_ids=position_ids, chunk_size=2048)
    return float(loss_sum) / int(n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config (the default without CUDA)")
    ap.add_argument(
        "--arch", choices=["tiny", "8b"], default=None, help="model architecture (default: 8b on CUDA, tiny elsewhere)"
    )
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the 8b architecture (default 32)")
    ap.add_argument("--seq", type=int, default=None, help="packed row length (default 4096; tiny 512)")
    ap.add_argument("--attn", default=None, help="doc_varlen on CUDA, doc_sdpa elsewhere (default)")
    ap.add_argument(
        "--no-fp32",
        action="store_true",
        help="skip the float32 reference (it doubles the memory: 32 layers of 8B do not fit 24 GiB)",
    )
    ap.add_argument("--lora-b-std", type=float, default=0.02)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.tiny = args.arch == "tiny" if args.arch else (args.tiny or not cuda)
    args.seq = args.seq or (512 if args.tiny else 4096)
    args.batch = 1
    device = torch.device("cuda" if cuda and not args.tiny else "cpu")
    attention.register()
    model, cfg = build_model(args, device)
    attn = args.attn or ("doc_varlen" if device.type == "cuda" else "doc_sdpa")
    set_attn(model, attn)
    model.eval()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=args.lora_b_std)
    batch = make_batch(args, device, cfg.vocab_size, step=0)
    taps = tap_layers(model)
    outputs = {}
    res = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "attn": attn,
        "seq": args.seq,
        "documents": len(batch[4]),
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
    }
    res["eager_bf16"] = loss_of(model, batch, bf16=True, device=device)
    outputs["eager_bf16"], taps[:] = list(taps), []
    compile_decoder_layers(model)
    res["compiled_bf16"] = loss_of(model, batch, bf16=True, device=device)
    outputs["compiled_bf16"], taps[:] = list(taps), []
    res["per_layer"] = {"compiled_vs_eager_bf16": rel_errors(outputs["compiled_bf16"], outputs["eager_bf16"])}
    res["rel_compiled_vs_eager_bf16"] = abs(res["compiled_bf16"] - res["eager_bf16"]) / abs(res["eager_bf16"])
    if not args.no_fp32:
        model.float()
        res["compiled_fp32"] = loss_of(model, batch, bf16=False, device=device)
        taps[:] = []
        with torch.compiler.set_stance("force_eager"):
            res["eager_fp32"] = ref = loss_of(model, batch, bf16=False, device=device)
        for k in ("eager_bf16", "compiled_bf16", "compiled_fp32"):
            res[f"rel_{k}_vs_eager_fp32"] = abs(res[k] - ref) / abs(ref)
        for k in ("eager_bf16", "compiled_bf16"):
            res["per_layer"][f"{k}_vs_eager_fp32"] = rel_errors(outputs[k], taps)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
