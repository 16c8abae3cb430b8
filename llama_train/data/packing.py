"""Best-fit-decreasing packing of samples into `seq_len` rows, and the per-document attention
inputs of a packed batch.

Documents in a packed row must not see each other. On this stack (transformers 5.x) position ids
that restart per document are NOT enough on sdpa/eager once an attention mask or a cache is in
play, so packed batches carry a block-diagonal causal 4D additive mask (0 where a query may attend,
dtype-min elsewhere). flash_attention_2 gets position ids only: transformers turns restarting
position ids into varlen (cu_seqlens) calls, and a 4D mask would be rejected.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from llama_train.data.chat import IGNORE_INDEX


def best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= capacity. Longest first, each into
    the bin with the least room that still fits it (ties: the older bin). O(n log n) searches."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    # Open bins sorted by (room left, bin index); a bin that is exactly full is closed.
    open_bins: list[tuple[int, int]] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens > capacity {capacity}")
        k = bisect.bisect_left(open_bins, (n, -1))
        if k < len(open_bins):
            room, b = open_bins.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(open_bins, (room - n, b))
    return bins


def pack_table(table, bins: list[list[int]]):
    """A pyarrow table of samples (input_ids, labels, id[, doc_lens]) → a table of packed rows with
    columns input_ids, labels (-100 on each document's first token, so no document is trained to
    predict the next document's first token), id, ids (sample ids) and doc_lens. A sample is one
    document, or the documents of its own `doc_lens` (a preference pair: chosen side, rejected side)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    order = np.fromiter((i for b in bins for i in b), dtype=np.int64)
    docs = table.take(pa.array(order))
    ids_col = docs.column("input_ids").combine_chunks()
    lab_col = docs.column("labels").combine_chunks()
    flat_ids = ids_col.flatten()
    sample_lens = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
    if "doc_lens" in docs.column_names:  # samples of several documents (preference pairs)
        sub = docs.column("doc_lens").combine_chunks()
        doc_lens = sub.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
        docs_per_sample = pc.list_value_length(sub).to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        doc_lens, docs_per_sample = sample_lens, np.ones_like(sample_lens)
    doc_starts = np.concatenate([[0], np.cumsum(doc_lens)[:-1]])
    labels = lab_col.flatten().to_numpy(zero_copy_only=False).copy()
    labels[doc_starts] = IGNORE_INDEX
    per_bin = np.array([len(b) for b in bins], dtype=np.int64)
    sample_offsets = np.concatenate([[0], np.cumsum(per_bin)]).astype(np.int32)
    doc_offsets = np.concatenate([[0], np.cumsum(docs_per_sample)])[sample_offsets].astype(np.int32)
    tok_offsets = np.concatenate([[0], np.cumsum(sample_lens)])[sample_offsets].astype(np.int32)
    row_ids = docs.column("id").combine_chunks()
    first = [f"pack{n}:{row_ids[int(s)].as_py()}" for n, s in enumerate(sample_offsets[:-1])]
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(pa.array(tok_offsets), flat_ids),
            "labels": pa.ListArray.from_arrays(pa.array(tok_offsets), pa.array(labels, type=flat_ids.type)),
            "id": pa.array(first, type=pa.string()),
            "ids": pa.ListArray.from_arrays(pa.array(sample_offsets), row_ids),
            "doc_lens": pa.ListArray.from_arrays(pa.array(doc_offsets), pa.array(doc_lens, type=pa.int32())),
        }
    )


def packing_efficiency(lengths, bins: list[list[int]], capacity: int) -> float:
    """Non-pad tokens / slots when every packed row is `capacity` long."""
    return float(sum(int(x) for x in lengths)) / max(1, len(bins) * capacity)


GROUP_WINDOW = 50  # global batches per length-sorted window (HF's group_by_length uses 50 too)


def group_by_length(order: list[int], lengths, group_size: int, window: int = GROUP_WINDOW) -> list[int]:
    """Reorder a shuffled sample order so that neighbours have similar lengths, keeping it random
    at a larger scale: cut `order` into windows of `window * group_size` samples and sort each
    window by length (longest first, ties in shuffled order). Batches cut from the result at
    multiples of `group_size` then hold samples of similar length, so padding them costs little.
    The batch that holds the longest sample of all (the head of some window) trades places with
    the first batch, so a step that runs out of memory does so at once."""
    size = max(1, window * group_size)
    out: list[int] = []
    for start in range(0, len(order), size):
        out += sorted(order[start : start + size], key=lambda i: -int(lengths[i]))
    if out:
        head = max(range(0, len(out), size), key=lambda j: int(lengths[out[j]]))
        span = min(group_size, len(out) - head)  # a whole batch, unless the epoch's last is short
        if head and span == min(group_size, len(out)):
            out[:span], out[head : head + span] = out[head : head + span], out[:span]
        elif head:
            out[0], out[head] = out[head], out[0]
    return out


def segments(doc_lens_rows: list[list[int]], width: int) -> torch.Tensor:
    """[batch, width] document index of every position; the padding after the last document is
    a segment of its own (it attends only to itself, so no softmax row is empty)."""
    seg = torch.empty((len(doc_lens_rows), width), dtype=torch.long)
    for i, lens in enumerate(doc_lens_rows):
        counts = list(lens) + ([width - sum(lens)] if width > sum(lens) else [])
        seg[i] = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return seg


def position_ids_from_segments(seg: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every segment start."""
    width = seg.shape[1]
    pos = torch.arange(width).expand_as(seg)
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    start_pos = torch.where(starts, pos, torch.zeros_like(pos))
    return pos - torch.cummax(start_pos, dim=1).values


def block_causal_mask(seg: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[batch, 1, width, width] additive mask: 0 where query q may attend key k (same segment and
    k <= q), the dtype's minimum elsewhere."""
    width = seg.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
