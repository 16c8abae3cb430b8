"""Load the recipe's datasets, normalize every format to chat messages, tokenize with labels.

Formats → messages:
  messages    {"messages": [{"role", "content"}, ...]}
  alpaca      {"instruction", "input"?, "output"}        → user (instruction + input), assistant
  sharegpt    {"conversations": [{"from", "value"}, ...]} (human/gpt/system)
  completion  {"prompt", "completion"}                   → user, assistant
  text        {"text"}                                   → every token trained (continued pre-training)
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from llama_train.config import BUILTIN_DATA, DataSource, Recipe
from llama_train.data.builtin import generate_splits
from llama_train.data.chat import IGNORE_INDEX, tokenize_messages
from llama_train.errors import DataError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def to_messages(row: dict, fmt: str) -> list[dict] | str:
    """One row → messages (or the raw text for format `text`). Raises KeyError/TypeError on a
    row that does not have the format's fields."""
    if fmt == "messages":
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise TypeError("`messages` must be a list of {role, content} objects")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if fmt == "alpaca":
        prompt = row["instruction"] + (("\n\n" + row["input"]) if row.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if fmt == "sharegpt":
        return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
    if fmt == "completion":
        return [{"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]}]
    if fmt == "text":
        if not isinstance(row["text"], str):
            raise TypeError("`text` must be a string")
        return row["text"]
    raise DataError(f"unknown data format {fmt!r}")


def read_rows(src: DataSource) -> list[dict]:
    """Raw rows of one source, columns renamed to the format's names."""
    path = Path(src.path)
    if path.suffix in {".jsonl", ".json", ".parquet", ".csv"} and not path.exists():
        raise DataError(f"data.sources path {src.path} does not exist")
    import datasets

    if path.exists():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise DataError(f"data.sources path {src.path}: unsupported file type {path.suffix!r}; "
                            "use .jsonl, .json, .parquet or .csv")
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:
        ds = datasets.load_dataset(src.path, split=src.split)
    rows = ds.to_list()
    if src.columns:
        inverse = {theirs: ours for ours, theirs in src.columns.items()}
        rows = [{inverse.get(k, k): v for k, v in r.items()} for r in rows]
    return rows


@dataclass
class Tokenized:
    """Tokenized train rows, raw + tokenized eval rows, and counts of what was dropped."""

    train: list[dict]
    eval_rows: list[dict]
    eval: list[dict]
    stats: dict = field(default_factory=dict)


def _tokenize_rows(rows, fmt, tokenizer, recipe: Recipe, stats: dict, *, split: str) -> list[dict]:
    d = recipe.data
    out = []
    for n, row in enumerate(rows):
        try:
            conv = to_messages(row, fmt)
        except (KeyError, TypeError) as exc:
            stats["invalid"] = stats.get("invalid", 0) + 1
            if split == "eval":
                raise DataError(f"eval row {n} is not valid {fmt!r} data: {exc}") from None
            continue
        if isinstance(conv, str):
            ids = tokenizer(conv).input_ids + [tokenizer.eos_token_id]
            tok = {"input_ids": ids, "labels": list(ids)}
        else:
            tok = tokenize_messages(conv, tokenizer, train_on=d.train_on, chat_template=d.chat_template)
        if len(tok["input_ids"]) > d.seq_len:
            if d.overlength == "error":
                raise DataError(f"{split} row {n} has {len(tok['input_ids'])} tokens > data.seq_len="
                                f"{d.seq_len}; raise data.seq_len or set data.overlength: drop|truncate")
            stats["overlength"] = stats.get("overlength", 0) + 1
            if d.overlength == "drop":
                continue
            tok = {k: v[: d.seq_len] for k, v in tok.items()}
        if all(x == IGNORE_INDEX for x in tok["labels"][1:]):
            stats["no_supervised_tokens"] = stats.get("no_supervised_tokens", 0) + 1
            continue
        tok["id"] = str(row.get("id", f"{split}-{n}"))
        out.append(tok)
    return out


def load_data(recipe: Recipe, tokenizer) -> Tokenized:
    d = recipe.data
    stats: dict = {}
    train: list[dict] = []
    eval_rows: list[dict] = []
    eval_fmt = "messages"
    for src in d.sources:
        if src.path == BUILTIN_DATA:
            b = d.builtin
            rows, ev = generate_splits(num_train=b.num_train, num_eval=b.num_eval, seed=b.seed,
                                       tasks=tuple(b.tasks))
            if d.eval.path is None and d.eval.fraction == 0:
                eval_rows += ev
        else:
            rows = read_rows(src)
            if src.weight != 1.0:
                # Mixture weights scale a source by sampling its rows with replacement.
                rng = random.Random(recipe.train.seed)
                rows = [rows[rng.randrange(len(rows))] for _ in range(round(len(rows) * src.weight))]
            eval_fmt = src.format
        train += [dict(r, _format=src.format) for r in rows]
    if d.eval.path:
        eval_rows = read_rows(DataSource(path=d.eval.path, format=d.sources[0].format))
        eval_fmt = d.sources[0].format
    elif d.eval.fraction > 0:
        rng = random.Random(recipe.train.seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        cut = max(1, int(len(train) * d.eval.fraction))
        held = set(order[:cut])
        eval_rows = [train[i] for i in sorted(held)]
        train = [r for i, r in enumerate(train) if i not in held]
        eval_fmt = d.sources[0].format

    by_fmt: dict[str, list] = {}
    for r in train:
        by_fmt.setdefault(r.pop("_format"), []).append(r)
    tok_train = []
    for fmt, rows in by_fmt.items():
        tok_train += _tokenize_rows(rows, fmt, tokenizer, recipe, stats, split="train")
    eval_rows = [{k: v for k, v in r.items() if k != "_format"} for r in eval_rows][: d.eval.max_samples]
    tok_eval = _tokenize_rows(eval_rows, eval_fmt, tokenizer, recipe, {}, split="eval")
    for r in eval_rows:
        r["messages"] = to_messages(r, eval_fmt) if eval_fmt != "text" else None

    total = len(train)
    dropped = total - len(tok_train)
    stats.update(rows=total, kept=len(tok_train), dropped=dropped)
    if not tok_train:
        raise DataError(f"no usable training rows out of {total}: {stats}")
    if total and dropped / total > d.max_dropped_fraction:
        raise DataError(
            f"{dropped} of {total} training rows dropped ({stats}), more than "
            f"data.max_dropped_fraction={d.max_dropped_fraction}; fix the data or raise the threshold"
        )
    return Tokenized(train=tok_train, eval_rows=eval_rows, eval=tok_eval, stats=stats)


def dataset_fingerprint(rows: list[dict]) -> str:
    import hashlib

    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r["input_ids"]).encode())
        h.update(json.dumps(r["labels"]).encode())
    return h.hexdigest()[:16]
