"""Content-addressed preprocessing cache: `<cache_dir>/<key>/` holds the train rows as a saved
Arrow dataset (memory-mapped on load), the tokenized eval rows, the counts and the sample lengths.

The key hashes everything that changes the output: the bytes of every data file (hub datasets:
id, split, revision), the tokenizer (its tokenizer.json, special tokens, chat template), the
recipe's data options (formats, columns, weights, seq_len, packing, train_on, overlength, chat
template, dedup, eval split), train.seed (mixture sampling and eval fraction) and the pipeline
version. Thresholds, shuffling, cache location and num_proc are not part of it.

Several processes (ranks, pods on a shared volume) may build the same key at once: each builds in
its own temp dir under a file lock, marks it COMPLETE and renames it into place atomically; if
another process won the rename (locks are unreliable on some network filesystems) its copy is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from llama_train.config import BUILTIN_DATA, Recipe
from llama_train.data.pipeline import Prepared, prepare

PIPELINE_VERSION = 4  # bump when the pipeline's output for the same inputs changes (3: ChatML spans end at <|im_end|>; 4: pairs: empty-prompt first tokens unscored, implicit prompts)
COMPLETE = "COMPLETE"
NOT_KEYED = {
    "cache",
    "cache_dir",
    "num_proc",
    "max_dropped_fraction",
    "min_packing_efficiency",
    "shuffle",
    "group_by_length",
}


def cache_root(recipe: Recipe) -> Path:
    d = recipe.data
    return Path(d.cache_dir) if d.cache_dir else Path(recipe.output_dir).resolve().parent / "data_cache"


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_identity(path: str, *, split: str | None = None, revision: str | None = None) -> dict:
    if path == BUILTIN_DATA:
        return {"builtin": True}
    if Path(path).is_file():
        return {"sha256": file_digest(path)}
    return {"hub": path, "split": split, "revision": revision}


def tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(
        json.dumps(
            [
                tokenizer.bos_token_id,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
                getattr(tokenizer, "chat_template", None),
            ],
            default=str,
        ).encode()
    )
    return h.hexdigest()


def cache_key(recipe: Recipe, tokenizer) -> str:
    d = recipe.data
    options = {k: v for k, v in d.model_dump(mode="json").items() if k not in NOT_KEYED}
    options["eval"].pop("max_new_tokens", None)
    inputs = {
        "version": PIPELINE_VERSION,
        "data": options,
        "sources": [_source_identity(s.path, split=s.split, revision=s.revision) for s in d.sources],
        "eval_file": _source_identity(d.eval.path) if d.eval.path else None,
        "seed": recipe.train.seed,
        "tokenizer": tokenizer_digest(tokenizer),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def save(prepared: Prepared, out: Path) -> None:
    out.mkdir(parents=True)
    prepared.train.save_to_disk(str(out / "train"))
    np.save(out / "lengths.npy", prepared.lengths)
    meta = {
        "counts": prepared.counts,
        "examples": prepared.examples,
        "sources": prepared.sources,
        "eval_rows": prepared.eval_rows,
        "eval": prepared.eval,
    }
    (out / "meta.json").write_text(json.dumps(meta))
    (out / COMPLETE).write_text("")


def load(path: Path) -> Prepared:
    import datasets

    meta = json.loads((path / "meta.json").read_text())
    return Prepared(
        train=datasets.load_from_disk(str(path / "train")),
        eval_rows=meta["eval_rows"],
        eval=meta["eval"],
        counts=meta["counts"],
        examples=meta["examples"],
        lengths=np.load(path / "lengths.npy"),
        sources=meta["sources"],
    )


def _try_load(path: Path) -> Prepared | None:
    try:
        return load(path)
    except Exception:  # noqa: BLE001  (any damage means: build the entry again)
        return None


def build_or_load(recipe: Recipe, tokenizer, *, rebuild: bool = False) -> tuple[Prepared, dict]:
    """(prepared data, info {key, path, hit}). With data.cache false, builds in memory."""
    from filelock import FileLock

    key = cache_key(recipe, tokenizer)
    if not recipe.data.cache:
        return prepare(recipe, tokenizer, fingerprint=key), {"key": key, "path": None, "hit": False}
    root = cache_root(recipe)
    final = root / key
    if not rebuild and (final / COMPLETE).exists() and (hit := _try_load(final)) is not None:
        return hit, {"key": key, "path": str(final), "hit": True}
    if root.exists() and not root.is_dir():
        from llama_train.errors import RecipeError

        raise RecipeError(f"data.cache_dir {root} is a file; point data.cache_dir at a directory")
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if (final / COMPLETE).exists():
            if not rebuild and (hit := _try_load(final)) is not None:
                return hit, {"key": key, "path": str(final), "hit": True}
            _remove(final)  # rebuilt on request, or unreadable (damaged, or an empty entry of an older version)
        prepared = prepare(recipe, tokenizer, fingerprint=key)
        if len(prepared.train) == 0:
            # Nothing usable (an empty file, the wrong format, every row too long): not cached (an
            # Arrow dataset without rows does not load back); preflight reports why.
            return prepared, {"key": key, "path": None, "hit": False}
        tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            save(prepared, tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / COMPLETE).exists():  # an incomplete leftover, not a concurrent winner
                    _remove(final)
                    os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    # Reload from disk so training always reads the memory-mapped copy, hit or miss.
    return load(final), {"key": key, "path": str(final), "hit": False}


def _remove(path: Path) -> None:
    """Move aside, then delete: a reader never sees a half-deleted directory under the key."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)
