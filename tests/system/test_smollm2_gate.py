"""The README's first command learns, and the gate tells a learned adapter from a random one.

`llama-train run recipes/smollm2.yaml` (the full recipe, as the README runs it; .ci/run runs it
before the tests and points LLAMA_TRAIN_SMOLLM2_DIR at it, elsewhere it is trained here, about
1.5 minutes on 2 quiet cores) must take held-out exact match from mostly wrong to mostly right.
Its export passes `llama-train gate` against the base at the default threshold (+0.05 exact
match), and the same export with its LoRA matrices redrawn at random (same scale per tensor, the
manifest's hashes updated so only quality can fail) fails the quality check."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _cli(*args, timeout=1800):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "llama_train.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def smollm2_run(smollm2_dir, tmp_path_factory) -> Path:
    given = os.environ.get("LLAMA_TRAIN_SMOLLM2_DIR")
    if given and (Path(given) / "run.json").is_file():
        if json.loads((Path(given) / "run.json").read_text()).get("status") == "completed":
            return Path(given).resolve()
    out = tmp_path_factory.mktemp("smollm2") / "run"
    r = _cli("run", "recipes/smollm2.yaml", f"output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _gate(export: Path, report_dir: Path) -> tuple[int, dict]:
    r = _cli("gate", str(export), "--json", "--report-dir", str(report_dir))
    return r.returncode, {c["name"]: c for c in json.loads(r.stdout)["checks"]}


def _randomized_copy(export: Path, dest: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(export, dest)
    weights_file = dest / "adapter" / "adapter_model.safetensors"
    gen = torch.Generator().manual_seed(0)
    weights = {
        k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * v.float().std().clamp_min(1e-3)
        for k, v in load_file(weights_file).items()
    }
    save_file(weights, weights_file, metadata={"format": "pt"})
    manifest = json.loads((dest / "manifest.json").read_text())
    rel = str(weights_file.relative_to(dest))
    assert rel in manifest["files"], sorted(manifest["files"])
    manifest["files"][rel] = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))


def test_real_model_learns_and_the_gate_rejects_a_random_adapter(smollm2_run, tmp_path):
    run = json.loads((smollm2_run / "run.json").read_text())
    before, after = run["eval"]["before"]["exact_match"], run["eval"]["after"]["exact_match"]
    assert before <= 0.2 and after >= 0.8, (before, after)  # README: 0.00 -> 1.00

    export = tmp_path / "export"
    r = _cli("export", str(smollm2_run), "--out", str(export), "--format", "adapter")
    assert r.returncode == 0, r.stderr[-3000:]
    code, checks = _gate(export, tmp_path / "gate")
    assert code == 0, json.dumps(checks, indent=1)[-3000:]
    assert checks["quality"]["status"] == "passed"

    _randomized_copy(export, tmp_path / "random")
    code, checks = _gate(tmp_path / "random", tmp_path / "gate_random")
    assert code == 10, json.dumps(checks, indent=1)[-3000:]
    assert checks["format"]["status"] == "passed"  # the hashes match: only the behaviour differs
    assert checks["quality"]["status"] == "failed", checks["quality"]
