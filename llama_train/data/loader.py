"""Deterministic, resumable batching.

The sample order is a seeded permutation per epoch (seed, epoch) — the same on every rank, so no
communication is needed. Each optimizer step takes the next `global_batch` indices of that stream;
rank r gets the contiguous slice r of it, split into `grad_accum_steps` micro batches. Because
every rank derives the same stream, 2 ranks x micro-batch 2 see exactly the samples that 1 rank x
micro-batch 4 sees, and the loader state is (epoch, position[, group]).

With `group_by_length` (data.group_by_length, unpacked rows) each epoch's permutation is then
reordered by `group_by_length`: windows of 50 global batches sorted by length, so a micro batch
holds rows of similar length and pads little; the batch with the longest row comes first. The
state records the global batch an epoch was grouped by (`group`, 0 = not grouped) when the epoch
starts, so a resume on another number of ranks, or with group_by_length switched, finishes the
epoch in the order it began (every row once) and applies the new setting from the next epoch.

An epoch is ceil(samples / global_batch) steps and trains every sample exactly once. When the
global batch does not divide the samples, the epoch's last step is topped up with *filler* rows
(samples from the end of the same permutation, reported as `filler(i)`; with grouping these
are the shortest rows): the trainer masks
their labels, so they add nothing to the loss or the gradients, and every rank still has a full,
same-shaped batch to run (DDP/FSDP/ZeRO need every rank in every collective). A step never mixes
two epochs.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch

from llama_train.data.chat import IGNORE_INDEX
from llama_train.data.packing import (
    block_causal_mask,
    group_by_length,
    position_ids_from_segments,
    segments,
)


def row_lengths(dataset) -> list[int]:
    """Tokens per row of a train `datasets.Dataset` (its input_ids lengths, read from Arrow)."""
    import pyarrow.compute as pc

    if not len(dataset):
        return []
    return pc.list_value_length(dataset.with_format("arrow")[:].column("input_ids")).to_pylist()


def filler(index: int) -> int:
    """How the loader reports sample `index` used as a filler row (a negative number)."""
    return -1 - index


def is_filler(entry: int) -> bool:
    return entry < 0


def sample_index(entry: int) -> int:
    """The data index of a loader entry, filler or not."""
    return entry if entry >= 0 else -1 - entry


@dataclass
class LoaderState:
    epoch: int = 0
    position: int = 0  # samples of this epoch's permutation already consumed (all ranks)
    group: int | None = None  # global batch this epoch's order is grouped by (0: not grouped);
    # None: not decided yet (a new epoch, or a checkpoint from before grouping existed)


class StepLoader:
    def __init__(
        self,
        num_samples: int,
        *,
        micro_batch_size: int,
        grad_accum_steps: int,
        world_size: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
        lengths=None,
        group_by_length: bool = False,
    ):
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_samples} samples")
        if group_by_length and lengths is None:
            raise ValueError("group_by_length needs the rows' lengths")
        self.num_samples = num_samples
        self.lengths = lengths  # tokens per row; needed to group (or to finish a grouped epoch)
        self.group_by_length = group_by_length
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.state = LoaderState()
        self.last_step_samples = 0
        self._perm_key: tuple[int, int] | None = None
        self._perm: list[int] = []

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    def _permutation(self) -> list[int]:
        state = self.state
        if state.group is None:  # the epoch starts (or an old checkpoint): decide its grouping
            state.group = self.global_batch if self.group_by_length else 0
        key = (state.epoch, state.group)
        if self._perm_key != key:
            order = list(range(self.num_samples))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + state.epoch).shuffle(order)
            if state.group:
                if self.lengths is None:
                    raise ValueError(
                        "this epoch was begun grouped by length (data.group_by_length); "
                        "the loader needs the rows' lengths to finish it"
                    )
                order = group_by_length(order, self.lengths, state.group)
            self._perm, self._perm_key = order, key
        return self._perm

    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.global_batch)

    def next_step(self) -> list[list[int]]:
        """Sample indices of this rank's micro batches for the next optimizer step; fillers (the
        last step of an epoch that the global batch does not divide) are `filler(i)`, see
        `is_filler` / `sample_index`. `last_step_samples` = real samples of the step, all ranks."""
        need = self.global_batch
        perm = self._permutation()
        taken = perm[self.state.position : self.state.position + need]
        self.state.position += len(taken)
        self.last_step_samples = len(taken)
        taken += [filler(perm[-1 - j % self.num_samples]) for j in range(need - len(taken))]
        if self.state.position >= self.num_samples:
            self.state = LoaderState(epoch=self.state.epoch + 1, position=0)
        per_rank = self.micro_batch_size * self.grad_accum_steps
        mine = taken[self.rank * per_rank : (self.rank + 1) * per_rank]
        mb = self.micro_batch_size
        return [mine[i : i + mb] for i in range(0, per_rank, mb)]

    def step_indices_all_ranks(self) -> list[int]:
        """Not used in training; for ledgers/tests: the global batch the next step would take."""
        saved = LoaderState(**asdict(self.state))
        rank = self.rank
        out = []
        for r in range(self.world_size):
            self.state, self.rank = LoaderState(**asdict(saved)), r
            out += [i for mb in self.next_step() for i in mb]
        self.state, self.rank = saved, rank
        return out

    def state_dict(self) -> dict:
        state = asdict(self.state)
        if state["group"] is None:
            del state["group"]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState(**state)


def padded_efficiency(
    lengths,
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    seed: int,
    shuffle: bool = True,
    group_by_length: bool = False,
) -> float:
    """Real tokens / slots over the first epoch of unpacked rows as the trainer batches them: the
    same loader (order, grouping, fillers), every micro batch padded to its longest row."""
    if not len(lengths):
        return 0.0
    loader = StepLoader(
        len(lengths),
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        world_size=world_size,
        rank=0,
        seed=seed,
        shuffle=shuffle,
        lengths=lengths,
        group_by_length=group_by_length,
    )
    real = slots = 0
    for _ in range(loader.steps_per_epoch()):
        batch = loader.step_indices_all_ranks()
        loader.next_step()
        for start in range(0, len(batch), micro_batch_size):
            micro = batch[start : start + micro_batch_size]
            slots += max(int(lengths[sample_index(i)]) for i in micro) * len(micro)
            real += sum(int(lengths[i]) for i in micro if not is_filler(i))
    return real / max(1, slots)


# Keys of a collated batch that go to the model; the rest (num_tokens) are bookkeeping.
MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids", "doc_ids")


def as_filler(row: dict) -> dict:
    """A row that runs through the model but carries no loss (labels all ignored); `collate` does
    not count its tokens."""
    return {**row, "labels": [IGNORE_INDEX] * len(row["labels"]), "filler": True}


def collate(
    rows: list[dict],
    *,
    pad_id: int,
    attn_implementation: str = "sdpa",
    mask_dtype: torch.dtype = torch.float32,
    pairs: bool = False,
) -> dict:
    """Right-pad to the longest row; labels are -100 on pad. Besides the model inputs, `num_tokens`
    counts the real (non-pad) tokens of the rows that are not fillers (`as_filler`).

    Unpacked rows get a 2D attention_mask marking real tokens. Packed rows (rows with `doc_lens`)
    get position_ids restarting per document and, unless `attn_implementation` finds the documents
    from the position ids itself (flash_attention_2, doc_sdpa, doc_varlen: no mask), a
    block-diagonal causal 4D additive mask of `mask_dtype` (the dtype attention runs in) that
    isolates the documents.

    `pairs` (train.objective: dpo; rows of preference pairs, data/preference.py): also `doc_ids`,
    the document number of every position over the whole batch (-1 on padding; documents 2k and
    2k+1 are the chosen and rejected side of pair k) and `num_pairs` (pairs of non-filler rows)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
        real[i, :n] = 1
    batch = {
        "input_ids": ids,
        "labels": labels,
        "num_tokens": sum(len(r["input_ids"]) for r in rows if not r.get("filler")),
    }
    if not any("doc_lens" in r for r in rows):
        batch["attention_mask"] = real
        return batch
    seg = segments([r.get("doc_lens") or [len(r["input_ids"])] for r in rows], width)
    if pairs:
        docs = [len(r["doc_lens"]) for r in rows]
        first = torch.tensor([0] + docs[:-1]).cumsum(0)
        real_doc = seg < torch.tensor(docs)[:, None]  # the padding after the last document is a segment too
        batch["doc_ids"] = torch.where(real_doc, seg + first[:, None], torch.full_like(seg, -1))
        batch["num_pairs"] = sum(n // 2 for n, r in zip(docs, rows) if not r.get("filler"))
    batch["position_ids"] = position_ids_from_segments(seg)
    # These find the documents from the position ids; a 4D mask would make doc_sdpa/doc_varlen
    # fall back to the full seq x seq attention.
    if attn_implementation not in ("flash_attention_2", "doc_sdpa", "doc_varlen"):
        batch["attention_mask"] = block_causal_mask(seg, dtype=mask_dtype)
    return batch


def num_supervised(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift (label at position t is predicted at t-1)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
