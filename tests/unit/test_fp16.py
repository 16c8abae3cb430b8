"""fp16 training with dynamic loss scaling (single process on CPU; fp16 autocast runs on CPU too).

The loss is scaled before backward and the float32 gradients are unscaled before clipping, so the
logged grad norm and the training follow the float32 run; an overflow (finite loss, non-finite
gradients) skips the step and halves the scale without counting as a NaN failure; the scale is part
of the checkpoint, so a resume repeats the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llama_train.config import recipe_from_dict
from llama_train.errors import RecipeError
from llama_train.trainer import train

from ..conftest import tiny_recipe

STEPS = 6


def _recipe(tmp_path, tiny_dir, precision, **train_kw):
    return tiny_recipe(
        tmp_path / precision,
        tiny_dir,
        data={"builtin": {"num_train": 48, "num_eval": 1}, "seq_len": 64, "eval": {"max_new_tokens": 2}},
        train={"max_steps": STEPS, "micro_batch_size": 4, "precision": precision, **train_kw},
        checkpoint={"every_n_steps": 1, "keep_last_k": STEPS, "save_final": False},
        # metrics.jsonl (grad norm, loss scale) is the tracker's local mirror of what MLflow gets
        tracking={
            "enabled": True,
            "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "experiment": "fp16",
            "log_system_metrics": False,
        },
    )


def _metrics(out, key):
    rows = [json.loads(x)["metrics"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def _ledger(out):
    return [json.loads(x) for x in (out / "ledger" / "rank0.jsonl").read_text().splitlines()][1:]


def _train(recipe, monkeypatch):
    monkeypatch.setenv("LLAMA_TRAIN_LEDGER", "1")
    monkeypatch.delenv("LLAMA_TRAIN_FAULT", raising=False)
    return train(recipe_from_dict(recipe))


def test_fp16_with_loss_scaling_follows_fp32(tmp_path, tiny_dir, monkeypatch):
    """Scale 2^10 never overflows here: every step applies; the logged (unscaled) grad norms and the
    losses are the float32 run's to fp16 precision. Without the unscale the norms would be 1024x."""
    _train(_recipe(tmp_path, tiny_dir, "fp32"), monkeypatch)
    _train(_recipe(tmp_path, tiny_dir, "fp16", loss_scale_init=2.0**10), monkeypatch)
    ref, got = tmp_path / "fp32" / "run", tmp_path / "fp16" / "run"
    assert not any(e["skipped"] for e in _ledger(got))
    assert _metrics(got, "train/loss_scale") == [2.0**10] * STEPS
    assert _metrics(ref, "train/loss_scale") == []  # fp32: no scaler
    for a, b in zip(_metrics(got, "train/grad_norm"), _metrics(ref, "train/grad_norm")):
        assert a == pytest.approx(b, rel=0.05)
    la, lb = _metrics(got, "train/loss"), _metrics(ref, "train/loss")
    assert max(abs(a - b) for a, b in zip(la, lb)) < 2e-2, (la, lb)
    assert max(abs(a - b) for a, b in zip(la, lb)) > 0  # fp16 autocast really ran
    w, w_ref = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (got, ref))
    for k in w_ref:
        assert w[k].dtype == torch.float32
        assert float((w[k] - w_ref[k]).abs().max()) < 1e-2, k


def test_fp16_overflow_halves_the_scale_and_resume_is_exact(tmp_path, tiny_dir, monkeypatch, capsys):
    """A scale of 2^18 overflows the tiny model's fp16 gradients: the first steps are skipped
    (more than train.max_nonfinite_skips of them, which stays for real NaNs), each halving the
    scale, until one applies. Resuming from a checkpoint taken among the overflows restores the
    scale, so the resumed steps repeat the uninterrupted run bit for bit."""
    recipe = _recipe(tmp_path, tiny_dir, "fp16", loss_scale_init=2.0**18, max_nonfinite_skips=1)
    summary = _train(recipe, monkeypatch)
    out = tmp_path / "fp16" / "run"
    assert summary["status"] == "completed"
    ledger = _ledger(out)
    skipped = [e["skipped"] for e in ledger]
    first = skipped.index(False) + 1  # the first step that updated the weights
    assert 2 <= first < STEPS, f"expected overflows before step {STEPS} at scale 2^18, got {skipped}"
    assert not any(skipped[first - 1 :]), skipped  # once it fits, it stays (growth is every 2000 steps)
    scales = _metrics(out, "train/loss_scale")  # the scale after each step
    assert scales == [2.0**18 / 2 ** min(s, first - 1) for s in range(1, STEPS + 1)]
    assert "fp16 gradient overflow" in " ".join(capsys.readouterr().err.split())
    assert ledger[first - 1]["digest"] != ledger[first - 2]["digest"]  # the weights changed there
    assert ledger[first - 2]["digest"] == ledger[0]["digest"]  # ... and not before
    resume_from = first - 1  # its state holds a scale already halved (first - 1) times
    state = json.loads((out / "checkpoints" / f"step_{resume_from}" / "state.json").read_text())
    assert state["loss_scale"] == 2.0**18 / 2**resume_from
    reference = _ledger(out)
    for p in (out / "checkpoints").iterdir():
        if int(p.name.split("_")[1]) > resume_from:
            shutil.rmtree(p)
    for name in ("adapter", "run.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    _train(recipe, monkeypatch)
    assert _ledger(out) == reference  # skipped flags, losses, LR, sample ids and weight digests


def test_loss_scale_must_be_a_power_of_two(tmp_path, tiny_dir):
    with pytest.raises(RecipeError, match="train.loss_scale_init must be a power of two"):
        recipe_from_dict(tiny_recipe(tmp_path, tiny_dir, train={"precision": "fp16", "loss_scale_init": 1000.0}))


def test_overflows_at_every_scale_stop_the_run(tmp_path, tiny_dir, monkeypatch):
    """Overflow after overflow (here the cap is lowered to 3 and the scale starts at 2^40, far above
    what fp16 holds) ends the run with the non-finite error (exit code 6), naming bf16 as the fix."""
    from llama_train import step
    from llama_train.errors import NonFiniteError

    monkeypatch.setattr(step, "MAX_OVERFLOWS", 3)
    recipe = _recipe(tmp_path, tiny_dir, "fp16", loss_scale_init=2.0**40)
    with pytest.raises(NonFiniteError, match="3 consecutive fp16 gradient overflows.*train.precision: bf16"):
        _train(recipe, monkeypatch)
