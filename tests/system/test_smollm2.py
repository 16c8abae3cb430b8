"""The real-model path as a user runs it, on SmolLM2-135M-Instruct from the catalogue: pull, a few
training steps of recipes/smollm2.yaml, export, and the gate (which loads the adapter on the base,
evaluates both, and sends one chat completion to the real server through the OpenAI client).

The model is fetched once per machine into ~/.cache/llama_train (or $LLAMA_TRAIN_CACHE); the
training is cut to a few steps on a few rows, so this checks the mechanics, not the learning
(README "A real model" has the full run's numbers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "llama_train.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )
    print(f"llama-train {args[0]}: {time.monotonic() - t0:.0f} s")
    return r


def test_smollm2_pull_train_export_gate_serve(smollm2_dir, tmp_path):
    r = _cli("model", "pull", "smollm2-135m-instruct")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == Path(smollm2_dir)

    out = tmp_path / "run"
    r = _cli(
        "run",
        "recipes/smollm2.yaml",
        f"output_dir={out}",
        "train.max_steps=2",
        "train.warmup_steps=0",
        "train.micro_batch_size=4",
        "data.builtin.num_train=16",
        "data.builtin.num_eval=4",
        "data.eval.max_samples=4",
        f"tracking.uri=sqlite:///{tmp_path}/mlruns.db",
        # A 2-step adapter has not learned yet: this checks the mechanics (the full recipe's gate
        # threshold is the default 0.05, see README); 24 tokens let the base's wordy answers end.
        "gate.min_improvement_over_base=-1.0",
        "gate.max_new_tokens=24",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["base_model"] == str(smollm2_dir)
    for when in ("before", "after"):
        ev = run["eval"][when]
        assert 0.0 <= ev["exact_match"] <= 1.0 and ev["num_samples"] == 4, ev
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    export = tmp_path / "export"
    r = _cli("export", str(out), "--out", str(export), "--format", "adapter")
    assert r.returncode == 0, r.stderr[-3000:]

    r = _cli("gate", str(export), "--json", "--report-dir", str(tmp_path / "gate"))
    report = json.loads(r.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert r.returncode == 0, json.dumps(report["checks"], indent=1)
    assert [c["status"] for c in report["checks"]] == ["passed"] * 5
    assert "candidate" in checks["serving"]["figures"]["models"]
    assert checks["serving"]["figures"]["completion_tokens"] > 0
    assert set(checks["quality"]["figures"]) == {"candidate", "base"}
