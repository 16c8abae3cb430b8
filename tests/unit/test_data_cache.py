"""Preprocessing cache: a hit on the second run, a miss after changing any input, safe when
several processes build the same key at once."""

from __future__ import annotations

import json
import threading

import pytest

from llama_train.config import recipe_from_dict
from llama_train.data import cache as cache_mod
from llama_train.data.cache import build_or_load, cache_key
from llama_train.tiny import CHAT_TEMPLATE, build_tokenizer

from ..conftest import tiny_recipe


def _rows(n=12):
    return [
        {
            "id": f"r{i}",
            "messages": [{"role": "user", "content": f"Add: {i} + 1"}, {"role": "assistant", "content": str(i + 1)}],
        }
        for i in range(n)
    ]


@pytest.fixture
def setup(tmp_path, tiny_dir):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))

    def recipe(**data):
        base = {"sources": [{"path": str(path)}], "seq_len": 64, "cache_dir": str(tmp_path / "cache")}
        return recipe_from_dict(tiny_recipe(tmp_path, tiny_dir, data={**base, **data}))

    return path, recipe


def test_hit_then_miss_after_any_input_change(setup, tiny_tokenizer):
    path, recipe = setup
    first, info = build_or_load(recipe(), tiny_tokenizer)
    assert not info["hit"]
    again, info2 = build_or_load(recipe(), tiny_tokenizer)
    assert info2["hit"] and info2["key"] == info["key"]
    assert again.train["input_ids"] == first.train["input_ids"] and again.counts == first.counts
    # Settings that do not change the data keep the key.
    assert cache_key(recipe(max_dropped_fraction=0.5, num_proc=2, shuffle=False), tiny_tokenizer) == info["key"]
    keys = {info["key"]}
    variants = [
        recipe(seq_len=128),
        recipe(packing=True),
        recipe(train_on="all"),
        recipe(overlength="truncate"),
        recipe(sources=[{"path": str(path), "columns": {"messages": "messages"}}]),
        recipe(dedup=False),
        recipe(chat_template=CHAT_TEMPLATE.replace("\\n\\n", "\\n")),
        recipe(eval={"fraction": 0.1}),
    ]
    for r in variants:
        key = cache_key(r, tiny_tokenizer)
        assert key not in keys, r.data
        keys.add(key)
    # Another tokenizer (different merges) → miss.
    assert cache_key(recipe(), build_tokenizer(seed=1)) not in keys
    # Editing the data file → miss, and the rebuilt data reflects the edit.
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(10)))
    changed, info3 = build_or_load(recipe(), tiny_tokenizer)
    assert not info3["hit"] and info3["key"] not in keys and len(changed.train) == 10


def test_concurrent_builders_agree(setup, tiny_tokenizer):
    _, recipe = setup
    results = []

    def worker():
        results.append(build_or_load(recipe(), tiny_tokenizer))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and sum(not info["hit"] for _, info in results) == 1
    assert len({tuple(map(tuple, p.train["input_ids"])) for p, _ in results}) == 1
    root = cache_mod.cache_root(recipe())
    assert [p.name for p in root.iterdir() if p.is_dir()] == [results[0][1]["key"]]  # no temp dirs left


def test_lost_rename_race_uses_the_winner(setup, tiny_tokenizer, monkeypatch):
    """A builder that did not see the lock (e.g. on a filesystem without locks) loses the rename
    to a complete copy: it keeps the winner's copy and removes its own temp dir."""
    _, recipe = setup
    real_prepare = cache_mod.prepare
    r = recipe()

    def prepare_while_another_pod_wins(rec, tok, *, fingerprint):
        out = real_prepare(rec, tok, fingerprint=fingerprint)
        cache_mod.save(out, cache_mod.cache_root(rec) / fingerprint)  # the other pod's finished copy
        return out

    monkeypatch.setattr(cache_mod, "prepare", prepare_while_another_pod_wins)
    prepared, info = build_or_load(r, tiny_tokenizer)
    assert len(prepared.train) == 12
    assert [p.name for p in cache_mod.cache_root(r).iterdir() if p.is_dir()] == [info["key"]]


def test_tokenizing_keeps_the_os_environ_object(setup, tiny_tokenizer, monkeypatch):
    """datasets' multi-process map (num_proc >= 1, always used here) rebinds os.environ to a copy of
    itself; the pipeline puts the original object back, so whoever holds it (monkeypatch here, which
    must be able to undo its edit; `from os import environ` elsewhere) still sees the live mapping."""
    import os

    _, recipe = setup
    environ = os.environ
    monkeypatch.setenv("LLAMA_TRAIN_TEST_MARK", "1")
    build_or_load(recipe(), tiny_tokenizer)
    assert os.environ is environ
    assert os.environ["LLAMA_TRAIN_TEST_MARK"] == "1"
