"""Per-document attention for packed rows, registered with transformers' `AttentionInterface`.

A packed row holds several documents; position ids restart at 0 at each document start. SDPA with
a block-diagonal mask isolates the documents but still computes the whole seq x seq score matrix,
so on CPU packing only breaks even with padding. These implementations run causal attention on
each document separately, so a row costs sum(L_i^2) instead of (sum L_i)^2:

  doc_sdpa    causal SDPA per document (any device; the CPU fast path).
  doc_varlen  on CUDA, torch.nn.attention.varlen.varlen_attn over cu_seqlens (one flash call for
              the whole batch) when q, k, v share an fp16/bf16 dtype; elsewhere (CPU, float32,
              mixed dtypes under autocast) or when varlen_attn is unusable, the doc_sdpa loop.

Document boundaries come from the model kwargs `cu_seq_lens_q` (int32 offsets into the flattened
batch*seq tokens, with `max_length_q`; `doc_bounds` may carry the same offsets as Python ints) or,
failing that, from `position_ids` (a new document wherever the position does not grow by 1, the
rule transformers uses for packed rows). Padding after the last document is its own document.

Everything else falls back to plain SDPA: a padding mask (unpacked eval batches, left-padded
generation), a KV cache holding earlier tokens (decoding), or rows with one document each.
Call `register()` before loading a model with `attn_implementation="doc_sdpa"` (or doc_varlen).
"""

from __future__ import annotations

import inspect
import itertools
import weakref

import torch
import torch.nn.functional as F

NAMES = ("doc_sdpa", "doc_varlen")


def resolve(name: str) -> str:
    """The kernel `model.attn_implementation` names; `auto` is doc_varlen on CUDA, doc_sdpa elsewhere
    (both equal sdpa wherever a batch is not packed)."""
    if name != "auto":
        return name
    return "doc_varlen" if torch.cuda.is_available() else "doc_sdpa"


# (fn, has_window_size, has_enable_gqa, has_is_causal) of torch's varlen_attn, once checked usable.
_VARLEN = None
# One-entry cache: every layer of a forward sees the same position_ids tensor, so the boundaries
# (a device-to-host copy) are computed once per forward.
_BOUNDS_CACHE: tuple[weakref.ref, int, tuple[int, ...]] | None = None


# ------------------------------------------------------------------------------- boundaries
def document_bounds(position_ids: torch.Tensor) -> tuple[int, ...]:
    """Offsets of the documents in the flattened [batch * seq] tokens: (0, end_0, end_1, ..., B*S).

    A document starts at every row start and wherever position_ids[t] != position_ids[t-1] + 1.
    """
    pos = position_ids.reshape(position_ids.shape[0], -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    flat = starts.flatten().nonzero().flatten().tolist()  # syncs with the device once
    return tuple(flat) + (pos.numel(),)


def _cached_bounds(position_ids: torch.Tensor) -> tuple[int, ...]:
    global _BOUNDS_CACHE
    c = _BOUNDS_CACHE
    if c is not None and c[0]() is position_ids and c[1] == position_ids._version:
        return c[2]
    bounds = document_bounds(position_ids)
    _BOUNDS_CACHE = (weakref.ref(position_ids), position_ids._version, bounds)
    return bounds


def _packed_bounds(query, key, attention_mask, kwargs) -> tuple[int, ...] | None:
    """Document offsets when this call is per-document attention over packed rows, else None."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return None  # padding mask or tokens from a KV cache: not a packed training forward
    if kwargs.get("doc_bounds") is not None:
        return tuple(kwargs["doc_bounds"])
    if kwargs.get("cu_seq_lens_q") is not None:
        return tuple(kwargs["cu_seq_lens_q"].tolist())
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return None
    bsz, seq = query.shape[0], query.shape[2]
    if position_ids.shape[0] != bsz:  # some callers pass [1, seq] for the whole batch
        position_ids = position_ids.expand(bsz, -1)
    bounds = _cached_bounds(position_ids)
    if len(bounds) - 1 == bsz and bounds[-1] == bsz * seq:
        return None  # one document per row: plain causal SDPA over the batch is the same, and faster
    return bounds


# ------------------------------------------------------------------------------- attention
def _per_document_sdpa(q, k, v, bounds, scaling):
    """q [T, Hq, D], k/v [T, Hkv, D] (T = batch*seq flattened): causal SDPA on each document."""
    num_q, num_kv = q.shape[1], k.shape[1]
    if q.is_cuda and num_kv != num_q:  # the flash SDPA backend wants equal head counts
        k = k.repeat_interleave(num_q // num_kv, dim=1)
        v = v.repeat_interleave(num_q // num_kv, dim=1)
    outs = []
    for start, end in itertools.pairwise(bounds):
        qd, kd, vd = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, L, D]
        od = F.scaled_dot_product_attention(
            qd, kd, vd, is_causal=True, scale=scaling, enable_gqa=kd.shape[1] != qd.shape[1]
        )
        outs.append(od.squeeze(0).transpose(0, 1))
    return torch.cat(outs, dim=0)


def _flatten(query, key, value):
    bsz, num_q, seq, dim = query.shape
    num_kv = key.shape[1]
    return (
        query.transpose(1, 2).reshape(bsz * seq, num_q, dim),
        key.transpose(1, 2).reshape(bsz * seq, num_kv, dim),
        value.transpose(1, 2).reshape(bsz * seq, num_kv, dim),
    )


def _fallback(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs = {k: v for k, v in kwargs.items() if k not in ("doc_bounds",)}
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def doc_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, S, D], key/value [B, Hkv, S, D] → ([B, S, Hq, D], None).

    Attention dropout is not supported on the per-document path (Llama's is 0)."""
    bounds = _packed_bounds(query, key, attention_mask, kwargs)
    if bounds is None:
        return _fallback(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    bsz, num_q, seq, dim = query.shape
    q, k, v = _flatten(query, key, value)
    out = _per_document_sdpa(q, k, v, bounds, scaling)
    return out.reshape(bsz, seq, num_q, dim), None


def doc_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """As `doc_sdpa_attention`, with one varlen flash call on CUDA (when `register()` found it usable).

    kwargs may carry ``cu_seq_lens_q`` (int32 document offsets in the flattened B*S tokens, on the
    device) and ``max_length_q``; without them the offsets come from position_ids."""
    bounds = _packed_bounds(query, key, attention_mask, kwargs)
    if bounds is None:
        return _fallback(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    bsz, num_q, seq, dim = query.shape
    num_kv = key.shape[1]
    q, k, v = _flatten(query, key, value)
    if query.is_cuda and _VARLEN is not None and _flash_dtypes(q, k, v):
        fn, has_window, has_gqa, has_causal = _VARLEN
        extra = {"scale": scaling}
        if has_window:
            extra["window_size"] = (-1, 0)  # causal
        elif has_causal:
            extra["is_causal"] = True
        if has_gqa:
            extra["enable_gqa"] = True
        elif num_kv != num_q:
            k = k.repeat_interleave(num_q // num_kv, dim=1)
            v = v.repeat_interleave(num_q // num_kv, dim=1)
        cu = kwargs.get("cu_seq_lens_q")
        max_len = kwargs.get("max_length_q")
        if cu is None:
            cu = torch.tensor(bounds, dtype=torch.int32, device=query.device)
            max_len = max(b - a for a, b in itertools.pairwise(bounds))
        out = fn(q, k, v, cu, cu, max_len, max_len, **extra)
    else:
        out = _per_document_sdpa(q, k, v, bounds, scaling)
    return out.reshape(bsz, seq, num_q, dim), None


def _flash_dtypes(q, k, v) -> bool:
    """The flash kernel behind varlen_attn takes fp16/bf16 only, one dtype for q, k and v: not
    a float32 run (the default dtype), nor autocast where RoPE's float32 cos/sin promoted q and k
    but not v. Those take the per-document SDPA loop (same result, SDPA's own kernels)."""
    return q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)


def doc_attention_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
):
    """transformers mask function for both names: no mask for a packed (or plain causal) forward,
    which the attention functions above handle from the position ids; otherwise SDPA's mask, so
    padding masks and KV-cache decoding behave exactly as with `sdpa`."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        **kwargs,
    )


# ------------------------------------------------------------------------------- registration
def _varlen_fn():
    """torch's flash varlen attention and how to ask it for causal + GQA, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params and "is_causal" not in params:
        return None  # unknown API: no way to ask for causal masking, use the per-document loop
    return varlen_attn, ("window_size" in params), ("enable_gqa" in params), ("is_causal" in params)


def varlen_self_test(device: str = "cuda") -> str:
    """Check varlen_attn (causal, GQA, backward) against the per-document SDPA loop on CUDA; on
    failure disable it (doc_varlen then uses the loop) and say why."""
    global _VARLEN
    try:
        torch.manual_seed(0)
        bounds = (0, 100, 300, 512)
        q = torch.randn(512, 8, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(512, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(512, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        kw = {
            "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32, device=device),
            "max_length_q": 512,
            "doc_bounds": bounds,
        }
        as_hf = lambda t: t.transpose(0, 1).unsqueeze(0)  # [T, H, D] -> [1, H, T, D]
        got, _ = doc_varlen_attention(None, as_hf(q), as_hf(k), as_hf(v), None, scaling=0.125, **kw)
        got.float().square().sum().backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        ref = _per_document_sdpa(q, k, v, bounds, 0.125)
        ref.float().square().sum().backward()
        # Relative to the largest reference value: bf16 kernels differ in summation order.
        err = ((got.squeeze(0) - ref).abs().max() / ref.abs().max()).item()
        gerr = max(((a - t.grad).abs().max() / t.grad.abs().max()).item() for a, t in zip(grads, (q, k, v)))
        if err > 2e-2 or gerr > 2e-2:
            raise AssertionError(f"max |out diff| {err:.3g}, max |grad diff| {gerr:.3g}")
        return f"torch varlen_attn (flash), self-test max rel. out diff {err:.2g}, grad diff {gerr:.2g}"
    except Exception as exc:  # noqa: BLE001 - fall back to the loop, say why
        _VARLEN = None
        return f"per-document flash SDPA loop (varlen_attn unusable: {type(exc).__name__}: {str(exc)[:200]})"


_REGISTERED: str | None = None


def register() -> str:
    """Register doc_sdpa and doc_varlen (attention + mask functions) with transformers. Idempotent.
    Returns what doc_varlen runs on this machine (on CUDA after a self-test of varlen_attn)."""
    global _VARLEN, _REGISTERED
    if _REGISTERED is not None:
        return _REGISTERED
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("doc_sdpa", doc_sdpa_attention)
    AttentionInterface.register("doc_varlen", doc_varlen_attention)
    for name in NAMES:
        AttentionMaskInterface.register(name, doc_attention_mask)
    _VARLEN = _varlen_fn()
    if not torch.cuda.is_available():
        _REGISTERED = "per-document sdpa loop"
    elif _VARLEN is None:
        _REGISTERED = "per-document flash SDPA loop (no usable torch.nn.attention.varlen)"
    else:
        _REGISTERED = varlen_self_test()
    return _REGISTERED
