"""Shared fixtures: a tiny Llama directory built once per session (deterministic, ~3 s)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from llama_train.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def tiny_recipe(tmp_path, tiny_dir=None, **sections):
    """A small, fast recipe dict on the tiny model (no MLflow, no checkpoints unless asked)."""
    base = {
        "output_dir": str(tmp_path / "run"),
        "model": {"source": "tiny", **({"path": str(tiny_dir)} if tiny_dir else {})},
        "data": {"builtin": {"num_train": 64, "num_eval": 4}, "seq_len": 64},
        "train": {"max_steps": 2, "micro_batch_size": 8, "lr": 1e-3, "seed": 0, "warmup_steps": 0,
                  "lr_scheduler": "constant"},
        "tracking": {"enabled": False},
        "checkpoint": {"save_final": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return base
