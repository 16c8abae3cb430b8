"""Checkpoints, exact resume and fault tolerance with 2 gloo ranks in real torchrun processes (issue 5).

Faults are injected with the test hooks of llama_train.faults.Faults (LLAMA_TRAIN_FAULT): SIGKILL of
rank 1 before step 3 (checkpoints every 2 steps), SIGTERM, SIGKILL inside the checkpoint writer, NaN.
The uninterrupted references are the session runs of test_distributed.py (same recipe). The per-rank
ledger (LLAMA_TRAIN_LEDGER=1) records, after a resume rewinds it, the effective history: step, sample
ids, LR, loss and a digest of the rank's parameter shards.
"""

from __future__ import annotations

import json
import re

import pytest

from llama_train.checkpoint import clean_incomplete, complete_checkpoints, find_resume
from tests.integration.test_distributed import (
    DS_INSTALLED,
    LOSS_ATOL,
    MAX_STEPS,
    STRATEGIES,
    Launch,
    exported,
    run_recipe,
    runs,
    torchrun,
)

__all__ = ["runs"]  # the session fixture, shared with test_distributed.py

RESUME_ATOL = 1e-6
KILLED = 137  # 128 + SIGKILL, as llama_train.k8s.launch reports a rank killed by a signal
PREEMPTED = 143
INFRA = 130  # llama_train.errors.InfrastructureError


def assert_same_history(got: Launch, want: Launch) -> None:
    """Losses, LR and sample ids per step on every rank equal the uninterrupted run's."""
    import torch

    for rank in (0, 1):
        a, b = got.ledger(rank), want.ledger(rank)
        assert [e["step"] for e in a] == [e["step"] for e in b] == list(range(MAX_STEPS + 1))
        for x, y in zip(a[1:], b[1:]):
            assert x["ids"] == y["ids"], (rank, x["step"])  # no sample repeated or skipped
            assert x["lr"] == pytest.approx(y["lr"], abs=1e-12), x["step"]
            assert abs(x["loss"] - y["loss"]) < RESUME_ATOL, (x["step"], x["loss"], y["loss"])
        ids = [i for e in a[1:] for i in e["ids"]]
        assert len(ids) == len(set(ids))  # 6 steps x 4 samples < 32 rows: one epoch, no repeats
    w_got, w_want = exported(got.out), exported(want.out)
    assert w_got and set(w_got) == set(w_want)
    for k in w_want:
        assert torch.allclose(w_got[k], w_want[k], atol=RESUME_ATOL, rtol=0), k


def kill_rank1_and_resume(recipe: dict, tmp_path, *, want: Launch) -> None:
    """SIGKILL rank 1 before step 3 (step_2 is the last checkpoint), rerun the same command: it
    resumes from step_2 and its history and weights equal the uninterrupted run `want`."""
    killed = torchrun(recipe, tmp_path, fault="kill:rank=1:step=3")
    assert killed.returncode == KILLED, killed.output[-3000:]
    assert [d.name for d in complete_checkpoints(killed.out / "checkpoints")] == ["step_2"]
    resumed = torchrun(recipe, tmp_path)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "resumed from step_2" in resumed.output
    assert_same_history(resumed, want)


def _chain_recipe(runs, name: str, tmp_path):
    parallel, lora = STRATEGIES[name]
    return run_recipe(tmp_path, runs.tiny_dir, lora=lora, parallel=parallel, micro_batch_size=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["fsdp", pytest.param("zero2", marks=pytest.mark.skipif(not DS_INSTALLED, reason="deepspeed not installed"))],
)
def test_kill_rank1_and_resume(runs, name, tmp_path):
    recipe = _chain_recipe(runs, name, tmp_path)
    kill_rank1_and_resume(recipe, tmp_path, want=runs.distributed(name))


@pytest.mark.slow
def test_kill_then_sigterm_then_resume_ddp(runs, tmp_path):
    recipe = _chain_recipe(runs, "ddp", tmp_path)
    killed = torchrun(recipe, tmp_path, fault="kill:rank=1:step=3")
    assert killed.returncode == KILLED, killed.output[-3000:]
    # SIGTERM reaches rank 1 only, before step 4: both ranks agree to stop after step 3, save, exit 143
    preempted = torchrun(recipe, tmp_path, fault="sigterm:rank=1:step=4")
    assert preempted.returncode == PREEMPTED, preempted.output[-3000:]
    assert "resumed from step_2" in preempted.output
    assert [d.name for d in complete_checkpoints(preempted.out / "checkpoints")] == ["step_2", "step_3"]
    state = json.loads((preempted.out / "checkpoints" / "step_3" / "state.json").read_text())
    assert state["step"] == 3 and state["consumed_samples"] == 12 and state["loader"]["position"] == 12
    resumed = torchrun(recipe, tmp_path)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "resumed from step_3" in resumed.output  # no step lost
    assert_same_history(resumed, runs.distributed("ddp"))


@pytest.mark.slow
def test_kill_during_checkpoint_writes_and_nan_skip(runs, tmp_path):
    """Three starts are each SIGKILLed at a different moment of writing a checkpoint; every next
    start resumes from the newest complete one (checked from the log, and for the last kill with
    find_resume, which is what a next start calls). The first start also gets
    a NaN loss on rank 1 at step 1: that update is skipped on both ranks."""
    recipe = run_recipe(
        tmp_path,
        runs.tiny_dir,
        parallel={"strategy": "ddp"},
        micro_batch_size=2,
        train={"max_steps": 4},
        checkpoint={"every_n_steps": 1, "keep_last_k": 2, "save_final": True},
    )
    faults = [
        "nan:rank=1:step=1,ckpt_kill:rank=1:step=2:phase=weights_written",  # step_2.tmp partly written
        "ckpt_kill:rank=0:step=3:phase=files_synced",  # all durable, not renamed
        "ckpt_kill:rank=0:step=3:phase=renamed",  # step_3 without COMPLETE
    ]
    outputs = []
    for fault, newest in zip(faults, ["step_1", "step_2", "step_2"]):
        launch = torchrun(recipe, tmp_path, fault=fault)
        assert launch.returncode == KILLED, launch.output[-3000:]
        assert complete_checkpoints(launch.out / "checkpoints")[-1].name == newest
        outputs.append(launch.output)
    # each start resumed from the newest complete checkpoint; the next one would take step_2 too
    assert [re.findall(r"resumed from (step_\d+)", o) for o in outputs] == [[], ["step_1"], ["step_2"]]
    ckpts = launch.out / "checkpoints"
    assert sorted(d.name for d in ckpts.iterdir()) == ["step_1", "step_2", "step_3"]
    assert not (ckpts / "step_3" / "COMPLETE").exists()
    assert find_resume(ckpts, "auto").name == "step_2"
    assert [d.name for d in clean_incomplete(ckpts)] == ["step_3"]
    assert "update skipped on all ranks" in outputs[0] and "rank(s) [1]" in outputs[0]
    for rank in (0, 1):
        ledger = {e["step"]: e for e in launch.ledger(rank)}
        assert sorted(ledger) == [0, 1, 2, 3]  # step 3 ran; the next start rewinds it
        assert ledger[1]["skipped"] and ledger[1]["digest"] == ledger[0]["digest"]  # params unchanged
        assert ledger[2]["digest"] != ledger[1]["digest"]  # later steps train


@pytest.mark.slow
def test_hung_rank_fails_the_job_at_the_collective_timeout_then_resumes(runs, tmp_path):
    """Rank 1 hangs before step 3 (sleeping, deaf to SIGTERM, as in a stuck kernel): rank 0 waits in
    the next collective until parallel.timeout_s, exits 130 (infrastructure: retried by the operator)
    naming the setting, torchrun ends the hung rank, and the resume repeats nothing."""
    recipe = _chain_recipe(runs, "ddp", tmp_path)
    recipe["parallel"]["timeout_s"] = 10
    hung = torchrun(recipe, tmp_path, fault="hang:rank=1:step=3")
    assert hung.returncode == INFRA, hung.output[-3000:]
    assert "parallel.timeout_s=10" in " ".join(hung.output.split()), hung.output[-3000:]
    assert [d.name for d in complete_checkpoints(hung.out / "checkpoints")] == ["step_2"]
    resumed = torchrun(recipe, tmp_path)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "resumed from step_2" in resumed.output
    assert_same_history(resumed, runs.distributed("ddp"))


@pytest.mark.slow
def test_resume_ddp_checkpoint_on_one_rank_with_the_same_global_batch(runs, tmp_path, monkeypatch, capsys):
    """2 ranks x micro 2 killed before step 3; the checkpoint resumes in one process with micro 2 x
    accum 2 (same global batch 4, --allow-recipe-change): the rest of the run sees the same samples
    per step and reaches the same losses and weights as the uninterrupted 2-rank run."""
    from llama_train.config import recipe_from_dict
    from llama_train.trainer import train
    from tests.integration.test_distributed import LOSS_ATOL, assert_weights_close

    recipe = _chain_recipe(runs, "ddp", tmp_path)
    killed = torchrun(recipe, tmp_path, fault="kill:rank=1:step=3")
    assert killed.returncode == KILLED, killed.output[-3000:]
    monkeypatch.setenv("LLAMA_TRAIN_LEDGER", "1")
    for var in ("LLAMA_TRAIN_FAULT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    one_rank = {**recipe, "train": {**recipe["train"], "grad_accum_steps": 2}}
    train(recipe_from_dict(one_rank), allow_recipe_change=True)
    log = " ".join(capsys.readouterr().err.split())
    assert "resuming step_2 (written by 2 rank(s)) on 1: global batch 4 -> 4" in log, log[-2000:]
    ref = runs.distributed("ddp")
    ref_ids = [a.get("ids", []) + b.get("ids", []) for a, b in zip(ref.ledger(0), ref.ledger(1))]
    got = killed.ledger(0)  # the same file, now holding the resumed steps too
    assert [e["step"] for e in got] == list(range(MAX_STEPS + 1))
    assert [e["ids"] for e in got[3:]] == ref_ids[3:]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(got[1:], ref.ledger(0)[1:])) < LOSS_ATOL
    assert_weights_close(exported(killed.out), exported(ref.out))


@pytest.mark.slow
def test_in_place_torchrun_restart_resumes(runs, tmp_path):
    """torchrun --max-restarts=1 with c10d rendezvous (what an elastic PyTorchJob runs): rank 1 is
    SIGKILLed before step 3 in the first attempt; the agent restarts the group, which resumes from
    step_2 and finishes with the uninterrupted run's history. (Needs the launcher's default
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with the shared store the restarted group hangs.)"""
    from tests.integration.test_distributed import free_port

    recipe = _chain_recipe(runs, "ddp", tmp_path)
    launch = torchrun(
        recipe,
        tmp_path,
        fault="kill:rank=1:step=3:attempt=0",
        extra_args=["--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"],
    )
    assert launch.returncode == 0, launch.output[-3000:]
    assert "resumed from step_2" in launch.output
    assert_same_history(launch, runs.distributed("ddp"))


@pytest.mark.slow
def test_fsdp_checkpoint_before_the_first_update_resumes_exactly(runs, tmp_path, monkeypatch):
    """Steps 1-2 are skipped (NaN on rank 0), step_2 is saved before any optimizer step, rank 1 dies
    at step 3. Saving FSDP optimizer state initializes an empty optimizer with a zero step, which
    would make the first real update Adam's second; the resumed run must train exactly like the
    single process with the same skips, uninterrupted."""
    from llama_train.config import recipe_from_dict
    from llama_train.trainer import train

    nan = "nan:rank=0:step=1,nan:rank=0:step=2"
    parallel, lora = STRATEGIES["fsdp"]
    recipe = run_recipe(tmp_path / "fsdp", runs.tiny_dir, lora=lora, parallel=parallel, micro_batch_size=2)
    killed = torchrun(recipe, tmp_path / "fsdp", fault=f"{nan},kill:rank=1:step=3")
    assert killed.returncode == KILLED, killed.output[-3000:]
    assert (killed.out / "checkpoints" / "step_2" / "optimizer_empty").exists()
    resumed = torchrun(recipe, tmp_path / "fsdp")
    assert resumed.returncode == 0 and "resumed from step_2" in resumed.output, resumed.output[-3000:]
    single = run_recipe(tmp_path / "single", runs.tiny_dir, lora=lora)
    monkeypatch.setenv("LLAMA_TRAIN_FAULT", nan)
    train(recipe_from_dict(single))
    got = dict(resumed.summary()["loss_history"])  # the steps the resumed run ran: 3-6
    want = dict(json.loads((tmp_path / "single" / "run" / "run.json").read_text())["loss_history"])
    assert sorted(got) == list(range(3, MAX_STEPS + 1))
    assert max(abs(got[s] - want[s]) for s in got) < LOSS_ATOL, (got, want)
