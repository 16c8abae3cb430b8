"""`load_data`: the recipe's training and eval data, preprocessed (or read from the cache) and
checked against the recipe's thresholds before anything trains.

Train rows are a memory-mapped `datasets.Dataset`; `train[i]` is a dict with input_ids, labels,
id, ids (document ids; one for an unpacked row) and, for packed rows, doc_lens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from llama_train.config import Recipe
from llama_train.data.cache import build_or_load
from llama_train.data.formats import read_rows, to_messages  # noqa: F401  (public helpers)
from llama_train.data.report import build_report, format_report
from llama_train.errors import DataError


@dataclass
class Tokenized:
    """Train rows, raw + tokenized eval rows, counts (`stats`) and the full preflight `report`."""

    train: object
    eval_rows: list[dict]
    eval: list[dict]
    stats: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    fingerprint: str = ""


def check_data(recipe: Recipe, tokenizer, *, rebuild: bool = False, world_size: int = 1) -> tuple[Tokenized, dict]:
    """Preprocess (or load from the cache) and build the preflight report (batching as
    `world_size` ranks would); never raises on threshold failures (see `report["failures"]`)."""
    prepared, info = build_or_load(recipe, tokenizer, rebuild=rebuild)
    report = build_report(recipe, prepared, cache=info, world_size=world_size)
    stats = {
        "rows": report["rows"],
        "kept": report["kept"],
        "dropped": report["dropped"],
        **{k: v for k, v in report["counts"].items() if v},
        "truncated": report["truncated"],
        "train_rows": report["train_rows"],
        "efficiency": round(report["efficiency"], 4),
    }
    prepared.train._llama_train_key = info["key"][:16]  # read by dataset_fingerprint
    data = Tokenized(
        train=prepared.train,
        eval_rows=prepared.eval_rows,
        eval=prepared.eval,
        stats=stats,
        report=report,
        fingerprint=info["key"][:16],
    )
    return data, report


def load_data(recipe: Recipe, tokenizer, *, world_size: int = 1) -> Tokenized:
    """Data for training; raises DataError (exit 3) when the preflight checks fail."""
    data, report = check_data(recipe, tokenizer, world_size=world_size)
    if not report["ok"]:
        raise DataError(
            "data preflight failed (run `llama-train data check RECIPE` for the full report):\n" + format_report(report)
        )
    return data


def dataset_fingerprint(rows) -> str:
    """Short hash identifying the training rows: the cache key for a loaded dataset, else the
    hash of the token ids and labels."""
    key = getattr(rows, "_llama_train_key", None)
    if key:
        return key
    h = hashlib.sha256()
    for r in rows:
        h.update(repr(list(r["input_ids"])).encode())
        h.update(repr(list(r["labels"])).encode())
    return h.hexdigest()[:16]
