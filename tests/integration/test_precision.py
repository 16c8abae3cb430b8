"""bf16/fp16 mixed precision and CPU offload under real torchrun gloo ranks.

FSDP2 (MixedPrecisionPolicy bf16 + CPUOffloadPolicy) and DeepSpeed ZeRO-3 (bf16 + optimizer and
parameter offload) on 2 ranks against the single-process bf16-autocast run with the same global
batch: bf16 rounds differently in each (FSDP casts the weights, ZeRO keeps a 16-bit module and float32
masters, autocast casts per op), so losses and weights agree to bf16 precision, not bitwise. The
exported adapter must hold the float32 master weights. (Exact resume is tested in fp32 for every
strategy in test_resume.py; a bf16 ZeRO-3 resume is left out to keep the suite's time.)
FSDP2 in fp16 with the dynamic loss scaler: every rank takes the same overflow decisions as the
single-process fp16 run (the decision uses the global grad norm, not a rank's shard).
"""

from __future__ import annotations

import pytest
import torch

from tests.integration.test_distributed import (
    DS_INSTALLED,
    MAX_STEPS,
    Launch,
    exported,
    losses,
    run_recipe,
    runs,
    torchrun,
    train_in_process,
)

__all__ = ["runs"]

BF16_LOSS_ATOL = 2e-2  # per-token losses around 5-8; bf16 carries ~3 significant digits
BF16_WEIGHT_ATOL = 1e-2  # adapter weights up to ~0.1 after 6 steps at lr 1e-3

VARIANTS = {
    "fsdp_bf16_offload": {"strategy": "fsdp", "cpu_offload": True},
    "zero3_bf16_offload": {"strategy": "deepspeed", "zero_stage": 3, "cpu_offload": True},
}
needs_ds = pytest.mark.skipif(not DS_INSTALLED, reason="deepspeed not installed")


def _recipe(runs, root, parallel=None, train=None, **kw):
    return run_recipe(
        root,
        runs.tiny_dir,
        parallel=parallel,
        micro_batch_size=2 if parallel else 4,
        train=train or {"precision": "bf16"},
        **kw,
    )


def _variant(runs, name: str) -> Launch:
    key = f"precision_{name}"
    if key not in runs.cache:
        recipe = _recipe(runs, runs.root / key, VARIANTS[name])
        launch = torchrun(recipe, runs.root / key)
        assert launch.returncode == 0, launch.output[-4000:]
        runs.cache[key] = launch
    return runs.cache[key]


def _single_bf16(runs):
    if "single_bf16" not in runs.cache:
        runs.cache["single_bf16"] = train_in_process(_recipe(runs, runs.root / "single_bf16"))
    return runs.cache["single_bf16"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [pytest.param("fsdp_bf16_offload"), pytest.param("zero3_bf16_offload", marks=needs_ds)]
)
def test_bf16_with_offload_matches_single_process_bf16(runs, name):
    launch = _variant(runs, name)
    got, want, fp32 = losses(launch.out), losses(_single_bf16(runs)), losses(runs.single(True))
    assert len(got) == len(want) == MAX_STEPS
    assert max(abs(a - b) for a, b in zip(got, want)) < BF16_LOSS_ATOL, (got, want)
    assert max(abs(a - b) for a, b in zip(got, fp32)) > 1e-4, "bf16 run equals the float32 run: bf16 not applied"
    assert got[-1] < got[0]
    w, ref = exported(launch.out), exported(_single_bf16(runs))
    assert set(w) == set(ref)
    for k in ref:
        assert w[k].dtype == ref[k].dtype == torch.float32, (k, w[k].dtype)  # the fp32 masters
        diff = float((w[k] - ref[k]).abs().max())
        assert diff < BF16_WEIGHT_ATOL, (k, diff)
    ckpt_adapter = exported(launch.out / "checkpoints" / "step_4")  # every 2 steps, the last 2 kept
    assert all(t.dtype == torch.float32 for t in ckpt_adapter.values())


@pytest.mark.slow
def test_fsdp_fp16_ranks_agree_on_loss_scale_overflows(runs, tmp_path):
    fp16 = {"precision": "fp16", "loss_scale_init": 2.0**18}  # overflows the first steps (tests/unit/test_fp16.py)
    single = train_in_process(_recipe(runs, tmp_path / "single", train=fp16))
    launch = torchrun(_recipe(runs, tmp_path / "fsdp", {"strategy": "fsdp"}, train=fp16), tmp_path / "fsdp")
    assert launch.returncode == 0, launch.output[-4000:]
    want = [e["skipped"] for e in Launch(0, "", single).ledger(0)[1:]]
    assert any(want) and not all(want), want  # some overflows, then training
    for rank in (0, 1):
        assert [e["skipped"] for e in launch.ledger(rank)[1:]] == want, rank
    got, ref = losses(launch.out), losses(single)
    assert max(abs(a - b) for a, b in zip(got, ref)) < BF16_LOSS_ATOL, (got, ref)
