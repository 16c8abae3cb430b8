"""Recipe → preprocessed data: read and validate rows, dedup, hold out eval, tokenize with labels
(datasets.map over several processes), apply the over-length policy, mix by weight, pack.

Every row read ends up counted exactly once: kept, or dropped under one category
(invalid_json, missing_field, wrong_type, empty_response, malformed_tool_call, duplicate, overlength,
no_supervised).
The result (`Prepared`) is what the preprocessing cache saves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llama_train.config import BUILTIN_DATA, BUILTIN_PREFERENCES, DataConfig, Recipe
from llama_train.data.builtin import generate_preference_splits, generate_splits
from llama_train.data.chat import IGNORE_INDEX, tokenize_messages
from llama_train.data.formats import RowError, iter_raw, normalize
from llama_train.data.packing import best_fit_decreasing, pack_table
from llama_train.data.preference import is_pair, normalize_pair, tokenize_pair
from llama_train.errors import DataError

# Batched encodes of a few short strings are slower with the Rust thread pool than without, and the
# pool must not be live when datasets.map forks its workers.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CATEGORIES = (
    "invalid_json",
    "missing_field",
    "wrong_type",
    "empty_response",
    "malformed_tool_call",
    "duplicate",
    "template",
    "overlength",
    "no_supervised",
)
PAIR_CATEGORIES = ("identical_pair",)  # preference data (train.objective: dpo) only


def categories(recipe: Recipe) -> tuple[str, ...]:
    """The drop categories preflight reports for this recipe's data."""
    return CATEGORIES + (PAIR_CATEGORIES if recipe.train.objective == "dpo" else ())


TEMPLATE_ERROR = "template:"  # status prefix of a row the chat template refused (raise_exception)
MAX_EXAMPLES = 5  # bad rows quoted per category in the report


@dataclass
class Prepared:
    train: object  # datasets.Dataset of train rows (packed or not)
    eval_rows: list[dict]  # {"id", "messages" (None for text)} for generation
    eval: list[dict]  # tokenized eval rows (never packed)
    counts: dict  # rows read, kept, per category (see CATEGORIES), truncated
    examples: dict  # category → ["file:row: why", ...]
    lengths: np.ndarray  # tokens per kept train sample, before truncation and packing
    sources: list[dict] = field(default_factory=list)  # per source: rows read, valid, used


def tokenize_sample(conv, tokenizer, *, train_on: str, chat_template: str | None) -> dict:
    """One normalized sample → {input_ids, labels}. Text is trained on every token plus EOS.
    A preference pair → {input_ids, labels, doc_lens} (see data/preference.py)."""
    if is_pair(conv):
        return tokenize_pair(conv, tokenizer, chat_template=chat_template)
    if isinstance(conv, str):
        ids = list(tokenizer(conv).input_ids) + [tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids)}
    if isinstance(conv, dict):  # messages with the tools they may call
        return tokenize_messages(
            conv["messages"], tokenizer, train_on=train_on, chat_template=chat_template, tools=conv["tools"]
        )
    return tokenize_messages(conv, tokenizer, train_on=train_on, chat_template=chat_template)


def apply_length_policy(tok: dict, *, seq_len: int, policy: str) -> tuple[dict | None, str]:
    """(sample or None, status): ok | truncated | overlength (dropped / error) | no_supervised |
    truncated_no_supervised (truncation cut every trained token)."""
    status = "ok"
    if len(tok["input_ids"]) > seq_len:
        if policy != "truncate":
            return None, "overlength"
        tok = {k: v[:seq_len] for k, v in tok.items()}
        status = "truncated"
    if all(x == IGNORE_INDEX for x in tok["labels"][1:]):
        return None, "no_supervised" if status == "ok" else "truncated_no_supervised"
    return tok, status


def _tokenize_batch(batch, *, tokenizer, train_on, chat_template, seq_len, policy):
    out = {"input_ids": [], "labels": [], "doc_lens": [], "length": [], "status": []}
    from jinja2 import TemplateError

    for conv_json in batch["conv"]:
        try:
            tok = tokenize_sample(json.loads(conv_json), tokenizer, train_on=train_on, chat_template=chat_template)
        except TemplateError as exc:  # the template's raise_exception (e.g. roles must alternate): this row only
            for key, value in (
                ("input_ids", []),
                ("labels", []),
                ("doc_lens", []),
                ("length", 0),
                ("status", TEMPLATE_ERROR + str(exc)[:300]),
            ):
                out[key].append(value)
            continue
        n = len(tok["input_ids"])
        kept, status = apply_length_policy(tok, seq_len=seq_len, policy=policy)
        out["input_ids"].append(kept["input_ids"] if kept else [])
        out["labels"].append(kept["labels"] if kept else [])
        out["doc_lens"].append(tok.get("doc_lens", []) if kept else [])
        out["length"].append(n)
        out["status"].append(status)
    return out


class _Tally:
    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def drop(self, category: str, where: str, why: str) -> None:
        self.counts[category] += 1
        ex = self.examples.setdefault(category, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(f"{where}: {why}")


def _source_rows(data: DataConfig, src):
    """(where, id, row-or-RowError) of one source; built-in rows are generated."""
    if src.path == BUILTIN_PREFERENCES:
        b = data.builtin
        rows, _ = generate_preference_splits(
            num_train=b.num_train, num_eval=b.num_eval, seed=b.seed, tasks=tuple(b.tasks)
        )
        for n, r in enumerate(rows):
            yield f"{BUILTIN_PREFERENCES}[{n}]", r["id"], r
        return
    if src.path == BUILTIN_DATA:
        b = data.builtin
        rows, _ = generate_splits(num_train=b.num_train, num_eval=b.num_eval, seed=b.seed, tasks=tuple(b.tasks))
        for n, r in enumerate(rows):
            yield f"{BUILTIN_DATA}[{n}]", r["id"], r
        return
    name = Path(src.path).name if Path(src.path).exists() else src.path
    line = "line" if src.path.endswith(".jsonl") else "row"
    for n, row in iter_raw(src.path, columns=src.columns, split=src.split, revision=src.revision, key="data.sources"):
        rid = row.get("id") if isinstance(row, dict) else None
        yield f"{src.path} {line} {n}", str(rid) if rid is not None else f"{name}:{n}", row


def collect(recipe: Recipe, tally: _Tally) -> tuple[list[dict], list[dict], list[dict]]:
    """Valid, deduplicated samples {id, src, conv} of all sources; per-source counts."""
    d = recipe.data
    pool, per_source, seen = [], [], set()
    for si, src in enumerate(d.sources):
        fmt = {BUILTIN_DATA: "messages", BUILTIN_PREFERENCES: "preference"}.get(src.path, src.format)
        read = valid = 0
        for where, rid, row in _source_rows(recipe.data, src):
            read += 1
            try:
                if isinstance(row, RowError):
                    raise row
                conv = normalize_pair(row) if fmt == "preference" else normalize(row, fmt)
            except RowError as exc:
                tally.drop(exc.category, where, str(exc))
                continue
            if d.dedup:
                digest = hashlib.sha1(json.dumps(conv, ensure_ascii=False).encode()).digest()
                if digest in seen:
                    tally.drop("duplicate", where, f"same content as an earlier row (id {rid})")
                    continue
                seen.add(digest)
            valid += 1
            pool.append({"id": rid, "src": si, "conv": conv, "where": where})
        per_source.append({"path": src.path, "format": fmt, "weight": src.weight, "rows": read, "valid": valid})
        tally.counts["rows"] += read
    return pool, per_source


def _eval_split(recipe: Recipe, pool: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train pool, eval samples): the eval file, a seeded fraction of the pool, or built-in eval."""
    d = recipe.data
    if d.eval.path:
        fmt = d.eval.format or d.sources[0].format
        if d.sources[0].path == BUILTIN_DATA and d.eval.format is None:
            fmt = "messages"
        if d.sources[0].path == BUILTIN_PREFERENCES and d.eval.format is None:
            fmt = "preference"
        ev = []
        for n, row in iter_raw(d.eval.path, columns=d.eval.columns, key="data.eval"):
            try:
                if isinstance(row, RowError):
                    raise row
                conv = normalize_pair(row) if fmt == "preference" else normalize(row, fmt)
            except RowError as exc:
                raise DataError(
                    f"data.eval.path {d.eval.path} row {n}: {exc}; fix the row or the format (data.eval.format={fmt})"
                ) from None
            rid = row.get("id")
            ev.append({"id": str(rid) if rid is not None else f"eval-{n}", "conv": conv})
        return pool, ev
    if d.eval.fraction > 0:
        order = list(range(len(pool)))
        random.Random(recipe.train.seed).shuffle(order)
        held = set(order[: max(1, int(len(pool) * d.eval.fraction))])
        return ([s for i, s in enumerate(pool) if i not in held], [s for i, s in enumerate(pool) if i in held])
    if any(s.path == BUILTIN_PREFERENCES for s in d.sources):
        b = d.builtin
        _, rows = generate_preference_splits(
            num_train=b.num_train, num_eval=b.num_eval, seed=b.seed, tasks=tuple(b.tasks)
        )
        return pool, [{"id": r["id"], "conv": {k: r[k] for k in ("prompt", "chosen", "rejected")}} for r in rows]
    if any(s.path == BUILTIN_DATA for s in d.sources):
        b = d.builtin
        _, rows = generate_splits(num_train=b.num_train, num_eval=b.num_eval, seed=b.seed, tasks=tuple(b.tasks))
        return pool, [{"id": r["id"], "conv": r["messages"]} for r in rows]
    return pool, []


def _num_proc(data: DataConfig, num_rows: int) -> int:
    wanted = data.num_proc or os.cpu_count() or 1
    return max(1, min(wanted, math.ceil(num_rows / 2000)))


def tokenize_pool(recipe: Recipe, tokenizer, pool: list[dict], *, fingerprint: str):
    """datasets.map over the pool (num_proc processes) → arrow table: id, src, input_ids, labels,
    length (tokens before truncation), status (see `apply_length_policy`)."""
    import datasets

    d = recipe.data
    ds = datasets.Dataset.from_dict(
        {
            "id": [s["id"] for s in pool],
            "src": [s["src"] for s in pool],
            "conv": [json.dumps(s["conv"], ensure_ascii=False) for s in pool],
        }
    )
    kwargs = {
        "tokenizer": tokenizer,
        "train_on": d.train_on,
        "chat_template": d.chat_template,
        "seq_len": d.seq_len,
        "policy": d.overlength,
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "src": datasets.Value("int64"),
            "input_ids": datasets.List(datasets.Value("int32")),
            "labels": datasets.List(datasets.Value("int32")),
            "doc_lens": datasets.List(datasets.Value("int32")),
            "length": datasets.Value("int32"),
            "status": datasets.Value("string"),
        }
    )
    if not pool:
        return features.arrow_schema.empty_table()
    environ = os.environ
    try:
        out = ds.map(
            _tokenize_batch,
            batched=True,
            batch_size=256,
            fn_kwargs=kwargs,
            remove_columns=["conv"],
            num_proc=_num_proc(recipe.data, len(pool)),
            features=features,
            new_fingerprint=fingerprint,
            desc="tokenize",
        )
    finally:
        _rebind_environ(environ)
    return out.with_format("arrow")[:]


def _rebind_environ(environ) -> None:
    """datasets' `map(num_proc >= 1)` ends by rebinding `os.environ` to a deep copy of itself taken
    before the map (datasets 5.2). Whoever holds the original object (`from os import environ`,
    pytest's monkeypatch, a launcher's env edits) would from then on read and write a stale mapping.
    Put the original object back, holding the copy's values."""
    if os.environ is environ:
        return
    values = dict(os.environ)
    os.environ = environ  # noqa: B003  (putting the original mapping object back is the point)
    for key in set(environ) - set(values):
        del environ[key]
    environ.update(values)


def _mix(recipe: Recipe, src_of_row: np.ndarray) -> np.ndarray:
    """Row indices after mixture weights: floor(weight) copies plus a seeded random fraction."""
    out = []
    for si, src in enumerate(recipe.data.sources):
        rows = np.flatnonzero(src_of_row == si)
        whole, frac = int(src.weight), src.weight - int(src.weight)
        out += [rows] * whole
        if frac > 0 and rows.size:
            rng = np.random.default_rng([recipe.train.seed, si])
            out.append(np.sort(rng.choice(rows, size=round(rows.size * frac), replace=False)))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _tokenize_eval(data: DataConfig, tokenizer, ev: list[dict]) -> tuple[list[dict], list[dict]]:
    d = data
    ev = ev[: d.eval.max_samples]
    eval_rows, tok_eval = [], []
    from jinja2 import TemplateError

    for s in ev:
        conv = s["conv"]
        try:
            tok = tokenize_sample(conv, tokenizer, train_on=d.train_on, chat_template=d.chat_template)
        except TemplateError:
            continue  # the template refuses this conversation: it cannot be scored or prompted either
        if is_pair(conv):  # scored as a pair; the gate prompts with the chosen conversation
            chat = isinstance(conv["prompt"], list)
            eval_rows.append({"id": s["id"], "messages": conv["prompt"] + conv["chosen"] if chat else None})
        else:
            if isinstance(conv, dict):  # evaluation prompts the messages without the tool definitions
                conv = conv["messages"]
            eval_rows.append(
                {
                    "id": s["id"],
                    "messages": None if isinstance(conv, str) else conv,
                    **({"text": conv} if isinstance(conv, str) else {}),
                }
            )
        policy = "drop" if is_pair(conv) else "truncate" if d.overlength == "error" else d.overlength
        kept, _ = apply_length_policy(tok, seq_len=d.seq_len, policy=policy)
        if kept:
            tok_eval.append(dict(kept, id=s["id"]))
    return eval_rows, tok_eval


def prepare(recipe: Recipe, tokenizer, *, fingerprint: str = "llama_train") -> Prepared:
    """Run the whole pipeline in this process (tokenizing with num_proc workers)."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    d = recipe.data
    tally = _Tally()
    pool, per_source = collect(recipe, tally)
    pool, ev = _eval_split(recipe, pool)
    full = tokenize_pool(recipe, tokenizer, pool, fingerprint=fingerprint)
    status = np.array(full.column("status").to_pylist(), dtype=object)
    all_lengths = full.column("length").to_numpy()
    where = [s["where"] for s in pool]
    whys = {
        "overlength": "{n} tokens > seq_len {seq_len}",
        "no_supervised": "no token carries loss (data.train_on={train_on})",
        "truncated_no_supervised": "{n} tokens truncated to seq_len {seq_len} left no token with loss",
    }
    if recipe.train.objective == "dpo":
        whys["overlength"] = "{n} tokens (prompt + chosen, prompt + rejected: one row) > seq_len {seq_len}"
    for i in np.flatnonzero(np.isin(status, list(whys))):
        n = int(all_lengths[i])
        if status[i] == "overlength" and d.overlength == "error":
            raise DataError(
                f"{where[i]} has {n} tokens > data.seq_len={d.seq_len}; raise data.seq_len "
                "or set data.overlength: drop | truncate"
            )
        category = "overlength" if status[i] == "overlength" else "no_supervised"
        tally.drop(category, where[i], whys[status[i]].format(n=n, seq_len=d.seq_len, train_on=d.train_on))
    for i, st in enumerate(status):
        if st.startswith(TEMPLATE_ERROR):
            tally.drop("template", where[i], f"the chat template refused it: {st[len(TEMPLATE_ERROR) :]}")
    tally.counts["truncated"] = int(np.isin(status, ["truncated", "truncated_no_supervised"]).sum())
    keep = np.flatnonzero((status == "ok") | (status == "truncated"))
    table = full.take(pa.array(keep))
    src_col = table.column("src").to_numpy()
    mixed = _mix(recipe, src_col)
    for si, info in enumerate(per_source):
        info["kept"] = int((src_col == si).sum())
        info["used"] = int((src_col[mixed] == si).sum())
    lengths = table.column("length").to_numpy()[mixed]
    pairs = recipe.train.objective == "dpo"
    table = table.take(pa.array(mixed)).select(["input_ids", "labels", "id"] + (["doc_lens"] if pairs else []))
    if d.packing:
        ntok = pc.list_value_length(table.column("input_ids")).to_numpy()
        table = pack_table(table, best_fit_decreasing(ntok, d.seq_len))
    else:
        ids = table.column("id").combine_chunks()
        table = table.append_column(
            "ids", pa.ListArray.from_arrays(pa.array(np.arange(len(ids) + 1, dtype=np.int32)), ids)
        )
        if pairs:  # a pair is a row of two documents even unpacked (collate isolates them)
            table = table.select(["input_ids", "labels", "id", "ids", "doc_lens"])
    eval_rows, tok_eval = _tokenize_eval(recipe.data, tokenizer, ev)
    counts = {
        "rows": int(tally.counts["rows"]),
        "kept": int(keep.size),
        **{c: int(tally.counts[c]) for c in categories(recipe)},
        "truncated": tally.counts["truncated"],
        "train_samples": int(mixed.size),
        "train_rows": table.num_rows,
        "eval_held_out": len(ev),
    }
    counts["dropped"] = sum(counts[c] for c in categories(recipe))
    return Prepared(
        train=datasets.Dataset(table),
        eval_rows=eval_rows,
        eval=tok_eval,
        counts=counts,
        examples=tally.examples,
        lengths=np.asarray(lengths, dtype=np.int64),
        sources=per_source,
    )
