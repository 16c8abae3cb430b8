"""Row surgery on a transformers KV cache for continuous batching: merge two batches' caches
(left-padded to a common length), keep some rows, drop leading all-padding columns. Works on
layered caches (`cache.layers[i].keys / .values`, [rows, heads, seq, dim]).
"""

from __future__ import annotations


def _layers(cache) -> list:
    if not hasattr(cache, "layers"):
        raise RuntimeError("continuous batching needs a layered transformers Cache (transformers >= 4.56)")
    return cache.layers


def left_pad(t, n: int, dim: int):
    """Prepend n zeros along `dim` (cache: dim 2 = sequence; mask: dim 1)."""
    import torch

    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def merge_caches(a, b, pad_a: int, pad_b: int) -> None:
    """Append b's rows to a, left-padding each to a common sequence length (in place on a)."""
    import torch

    for la, lb in zip(_layers(a), _layers(b)):
        la.keys = torch.cat([left_pad(la.keys, pad_a, 2), left_pad(lb.keys, pad_b, 2)], dim=0)
        la.values = torch.cat([left_pad(la.values, pad_a, 2), left_pad(lb.values, pad_b, 2)], dim=0)


def select_rows(cache, idx) -> None:
    for layer in _layers(cache):
        layer.keys, layer.values = layer.keys[idx], layer.values[idx]


def trim_cache(cache, first: int) -> None:
    for layer in _layers(cache):
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


def cache_of(out):
    # transformers 5.x renamed `past_key_values` to `cache` (outputs and forward arguments).
    return out["cache"] if "cache" in out else out["past_key_values"]
