"""Causal-LM loss without materializing the full [tokens, vocab] logits.

For Llama 3 (vocab 128256) at 4096 tokens the float32 logits alone are 2.1 GB, and the
naive ``F.cross_entropy(logits.float())`` path keeps several tensors of that size alive
(bf16 logits, fp32 logits, log-softmax saved for backward, its gradient). Here the lm_head
matmul, the log-sum-exp and the gradient are computed ``chunk_size`` tokens at a time, so
only one [chunk_size, vocab] float32 buffer exists at any moment.

Two gradient strategies, both in :class:`_ChunkedLinearCrossEntropy`:

* ``recompute=False`` (default): the forward pass already computes d(loss)/d(hidden) and
  d(loss)/d(weight) chunk by chunk and keeps only those (sizes of hidden and weight);
  backward just scales them. 3 matmuls per chunk, like the naive path.
* ``recompute=True``: forward keeps only references to its inputs; backward recomputes
  each chunk's logits. 4 matmuls per chunk, but no gradient buffer of size [N, H] (or
  [V, H] when lm_head is trained) is held between forward and backward. ``scripts/bench_loss.py`` measures both (BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["chunked_cross_entropy", "causal_lm_loss"]


def _chunk_softmax_grad(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss sum, per-token log-sum-exp and d(loss_sum)/d(logits) for one chunk.

    The returned gradient reuses the float32 logits buffer in place (softmax - one_hot,
    zero on ignored rows) so a chunk costs one [C, V] float32 buffer plus the matmul output.
    """
    logits = (hidden @ weight.T).float()  # matmul in the input dtype, like the HF head
    valid = labels != ignore_index
    safe_labels = labels.masked_fill(~valid, 0).unsqueeze(1)
    target_logit = logits.gather(1, safe_labels).squeeze(1)
    row_max = logits.amax(dim=1, keepdim=True)
    logits.sub_(row_max).exp_()
    sum_exp = logits.sum(dim=1, keepdim=True)
    lse = (sum_exp.log() + row_max).squeeze(1)
    loss_sum = ((lse - target_logit) * valid).sum()
    logits.div_(sum_exp)  # now softmax
    logits.scatter_add_(1, safe_labels, -valid.unsqueeze(1).to(logits.dtype))
    logits.mul_(valid.unsqueeze(1))
    return loss_sum, lse, logits


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    # Under torch.autocast the inputs arrive already in the compute dtype; autocast is
    # switched off inside so that the float32 buffers and the out= matmuls stay as written.
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size, ignore_index, recompute):
        with torch.autocast(hidden.device.type, enabled=False):
            return _ChunkedLinearCrossEntropy._forward(ctx, hidden, weight, labels, chunk_size, ignore_index, recompute)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _ChunkedLinearCrossEntropy._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, hidden, weight, labels, chunk_size, ignore_index, recompute):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h and not recompute else None
        # Accumulated in the weight dtype with in-place addmm: a float32 accumulator would
        # need a [V, H] float32 buffer plus a [V, H] temporary per chunk.
        grad_w = torch.zeros_like(weight) if need_w and not recompute else None
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            h = hidden[start:end]
            chunk_loss, _, grad_logits = _chunk_softmax_grad(h, weight, labels[start:end], ignore_index)
            loss += chunk_loss
            if recompute:
                del grad_logits
                continue
            g = grad_logits.to(hidden.dtype)
            del grad_logits
            if grad_h is not None:
                torch.mm(g, weight.to(g.dtype), out=grad_h[start:end])
            if grad_w is not None:
                grad_w.addmm_(g.T.to(weight.dtype), h.to(weight.dtype))
            del g  # free this chunk's [C, V] buffer before the next one is allocated
        ctx.recompute = recompute
        ctx.chunk_size = chunk_size
        ctx.ignore_index = ignore_index
        if recompute:
            ctx.save_for_backward(hidden, weight, labels)
        else:
            ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def _backward(ctx, grad_out):
        if not ctx.recompute:
            grad_h, grad_w = ctx.saved_tensors
            # In place: these buffers belong to this node only (backward runs once).
            if grad_h is not None:
                grad_h = grad_h.mul_(grad_out.to(grad_h.dtype))
            if grad_w is not None:
                grad_w = grad_w.mul_(grad_out.to(grad_w.dtype))
            return grad_h, grad_w, None, None, None, None
        hidden, weight, labels = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:end]
            _, _, grad_logits = _chunk_softmax_grad(h, weight, labels[start:end], ctx.ignore_index)
            grad_logits.mul_(grad_out)
            g = grad_logits.to(hidden.dtype)
            del grad_logits
            if grad_h is not None:
                torch.mm(g, weight.to(g.dtype), out=grad_h[start:end])
            if grad_w is not None:
                grad_w.addmm_(g.T.to(weight.dtype), h.to(weight.dtype))
            del g  # free this chunk's [C, V] buffer before the next one is allocated
        return grad_h, grad_w, None, None, None, None


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    recompute: bool = False,
) -> Tensor:
    """Sum of token cross-entropies of ``hidden @ weight.T`` against ``labels``.

    Args:
        hidden: [N, H] final-norm output, already shifted (``hidden[i]`` predicts ``labels[i]``).
        weight: [V, H] lm_head weight.
        labels: [N] token ids; ``ignore_index`` entries contribute neither loss nor gradient.
        chunk_size: tokens per chunk; peak extra memory is about chunk_size * V * 6 bytes.
        recompute: recompute chunk logits in backward instead of computing gradients in forward.

    Returns:
        float32 scalar: the SUM over non-ignored tokens (callers divide by the token count,
        which for data parallelism is the global count, not this batch's).
    """
    if hidden.ndim != 2 or weight.ndim != 2 or labels.ndim != 1:
        raise ValueError(
            f"expected hidden [N, H], weight [V, H], labels [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[0] != labels.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size, ignore_index, recompute)


def causal_lm_loss(
    model: torch.nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    **model_kwargs,
) -> tuple[Tensor, int]:
    """Next-token loss of a (PEFT-wrapped) LlamaForCausalLM without full logits.

    Runs the decoder (``model.model``, no lm_head) with ``use_cache=False``, shifts the
    labels by one, drops ignored positions before the head and applies
    :func:`chunked_cross_entropy` with ``lm_head.weight``. Extra ``model_kwargs`` (e.g.
    ``cu_seq_lens_q`` for a varlen attention implementation) go to the decoder.

    Returns:
        (loss_sum, num_tokens): float32 sum over supervised tokens and their count. The
        count is a Python int (the boolean gather syncs with the device once per call).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = base.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **model_kwargs,
    )
    hidden = out.last_hidden_state[:, :-1, :]
    shift_labels = labels[:, 1:]
    keep = shift_labels != ignore_index
    hidden = hidden[keep]
    targets = shift_labels[keep]
    loss_sum = chunked_cross_entropy(
        hidden, base.lm_head.weight, targets, chunk_size=chunk_size, ignore_index=ignore_index
    )
    return loss_sum, int(targets.shape[0])
