"""The GPU machine's scripts, run here on the CPU with their small settings: a lent device has
minutes, so the commands in BENCHMARKS.md ("next device call") must not fail for a reason a CPU
run would have shown. Each runs as the device runs it (a subprocess, PYTHONPATH=.)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def run_script(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def test_compile_check_reports_losses_and_per_layer_errors(tmp_path):
    out = tmp_path / "compile_check.json"
    run_script(["scripts/compile_check.py", "--tiny", "--out", str(out)], tmp_path)
    res = json.loads(out.read_text())
    assert res["compiled_fp32"] == pytest.approx(res["eager_fp32"], rel=1e-6)
    assert res["rel_compiled_vs_eager_bf16"] < 1e-3
    per_layer = res["per_layer"]
    assert set(per_layer) == {"compiled_vs_eager_bf16", "eager_bf16_vs_eager_fp32", "compiled_bf16_vs_eager_fp32"}
    assert all(len(v) == res["layers"] and all(0 <= x < 0.05 for x in v) for v in per_layer.values())


def test_bench_gpu_runs_the_device_call_variants(tmp_path):
    out = tmp_path / "bench.json"
    run_script(
        [
            "scripts/bench_gpu.py",
            "--tiny",
            "--variants",
            "trainer_compile,hf_packed,hf_trainer",
            "--deadline-s",
            "240",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    res = json.loads(out.read_text())
    assert [r["variant"] for r in res["results"]] == ["trainer_compile", "hf_packed", "hf_trainer"]
    assert all(r["tokens_per_s"] > 0 for r in res["results"])
    compiled, eager = res["results"][0]["check_loss_compiled_vs_eager"]  # train.compile's own layers
    assert compiled == pytest.approx(eager, rel=1e-3)
    check = res["loss_check"]
    assert check["fast"] == pytest.approx(check["hf_packed"], rel=1e-5)  # documents isolated alike


def test_gpu_serve_check_passes_on_cpu(tmp_path):
    out = tmp_path / "serve_check.json"
    run_script(["scripts/gpu_serve_check.py", "--device", "cpu", "--out", str(out)], tmp_path)
    res = json.loads(out.read_text())
    assert res["ok"] and len(res["requests"]) == 7
    echo = next(r for r in res["requests"] if r["request"] == "echo_prompt_logprobs")
    assert echo["finite"] and echo["max_logprob_diff"] == 0.0


def test_gpu_dpo_check_passes_on_cpu(tmp_path):
    out = tmp_path / "dpo_check.json"
    run_script(["scripts/gpu_dpo_check.py", "--device", "cpu", "--out", str(out)], tmp_path)
    res = json.loads(out.read_text())
    assert res["ok"] and res["same_counts"] and res["max_rel_logp_diff"] == 0.0  # the same path twice
    assert res["metrics"]["rewards/margins"][0] != 0.0  # the adapter moves the policy off the reference
