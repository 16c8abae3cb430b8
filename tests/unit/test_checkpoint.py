"""Checkpoint protocol in one process: commit marker, cleanup, retention, resume selection, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama_train import checkpoint as ckpt
from llama_train.dist import DistContext
from llama_train.errors import CheckpointError


class FakeStrategy:
    name = "ddp"
    resharding_allowed = True

    def __init__(self):
        self.ctx = DistContext()
        self.param = torch.nn.Parameter(torch.zeros(3))
        self.optimizer = torch.optim.SGD([self.param], lr=0.5)
        self.loaded = None

    def save_state(self, path: Path) -> None:
        torch.save({"w": self.param.detach().clone()}, path / "weights.pt")

    def load_state(self, path: Path) -> None:
        self.loaded = torch.load(path / "weights.pt")


def _save(root: Path, step: int, strategy=None, keep: int = 2, fault=None) -> Path:
    strategy = strategy or FakeStrategy()
    sched = torch.optim.lr_scheduler.LambdaLR(strategy.optimizer, lambda s: 1.0 / (s + 1))
    return ckpt.save_checkpoint(
        root,
        step,
        strategy=strategy,
        scheduler=sched,
        state={"step": step, "world_size": 1},
        recipe_yaml="x: 1\n",
        keep_last_k=keep,
        fault=fault,
    )


def test_commit_marker_and_retention(tmp_path):
    for step in (1, 2, 3):
        final = _save(tmp_path, step)
        assert (final / ckpt.MARKER).exists() and not (tmp_path / f"step_{step}.tmp").exists()
    assert [d.name for d in ckpt.complete_checkpoints(tmp_path)] == ["step_2", "step_3"]
    assert sorted(p.name for p in (tmp_path / "step_3").iterdir()) == [
        "COMPLETE",
        "recipe.yaml",
        "rng_rank0.pt",
        "scheduler.pt",
        "state.json",
        "weights.pt",
    ]


def test_uncommitted_directories_are_never_loaded_and_cleaned(tmp_path):
    _save(tmp_path, 2)

    class Crash(Exception):
        pass

    def crash_at(phase):
        def hook(p, step):
            if p == phase:
                raise Crash

        return hook

    for step, phase in ((4, "weights_written"), (5, "files_synced"), (6, "renamed")):
        with pytest.raises(Crash):
            _save(tmp_path, step, fault=crash_at(phase))
        assert ckpt.find_resume(tmp_path, "auto").name == "step_2"
    assert (tmp_path / "step_6").exists() and not (tmp_path / "step_6" / ckpt.MARKER).exists()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.find_resume(tmp_path, str(tmp_path / "step_6"))
    removed = {p.name for p in ckpt.clean_incomplete(tmp_path)}
    assert removed == {"step_4.tmp", "step_5.tmp", "step_6"}
    assert [p.name for p in tmp_path.iterdir()] == ["step_2"]
    # pruning only ever touches committed checkpoints
    _save(tmp_path, 7, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_7"]


def test_resume_selection(tmp_path):
    assert ckpt.find_resume(tmp_path / "none", "auto") is None
    path = _save(tmp_path, 3)
    assert ckpt.find_resume(tmp_path, "never") is None
    assert ckpt.find_resume(tmp_path, str(path)) == path


def test_load_restores_lr_and_refuses_world_size_change_without_resharding(tmp_path):
    s = FakeStrategy()
    sched = torch.optim.lr_scheduler.LambdaLR(s.optimizer, lambda step: 1.0 / (step + 1))
    for _ in range(3):
        s.optimizer.step()
        sched.step()
    path = ckpt.save_checkpoint(
        tmp_path,
        3,
        strategy=s,
        scheduler=sched,
        state={"step": 3, "world_size": 2, "strategy": "deepspeed"},
        recipe_yaml="",
        keep_last_k=1,
    )
    fresh = FakeStrategy()
    fresh.name = "deepspeed"
    fresh.resharding_allowed = False
    sched2 = torch.optim.lr_scheduler.LambdaLR(fresh.optimizer, lambda step: 1.0 / (step + 1))
    with pytest.raises(CheckpointError, match="2 rank"):
        ckpt.load_checkpoint(path, strategy=fresh, scheduler=sched2)
    fresh.resharding_allowed = True
    state = ckpt.load_checkpoint(path, strategy=fresh, scheduler=sched2)
    assert state["step"] == 3 and fresh.loaded is not None
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 / 4)


def test_faults_parse(monkeypatch):
    from llama_train.faults import Faults

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    f = Faults(1, "nan:rank=1:step=2,kill:rank=0:step=3,ckpt_kill:rank=1:step=4:phase=renamed:attempt=0")
    assert f.nan(2) and not f.nan(3)
    assert not Faults(0, "nan:rank=1:step=2").nan(2)
    assert f.items == [("nan", 1, 2, None), ("kill", 0, 3, None)]  # attempt=0 item dropped in restart 1


def test_changed_recipe_is_refused_with_a_diff(tmp_path, tiny_dir):
    from llama_train.config import recipe_from_dict
    from llama_train.trainer import train
    from tests.conftest import tiny_recipe

    base = tiny_recipe(
        tmp_path,
        tiny_dir,
        data={"builtin": {"num_train": 16, "num_eval": 1}, "seq_len": 48, "eval": {"max_new_tokens": 1}},
        train={"max_steps": 1, "micro_batch_size": 4},
        checkpoint={"save_final": True},
    )
    train(recipe_from_dict(base))
    changed = json.loads(json.dumps(base))
    changed["train"]["lr"] = 5e-4
    changed["train"]["max_steps"] = 2
    with pytest.raises(CheckpointError, match=r"train.lr: 0.001 -> 0.0005") as err:
        train(recipe_from_dict(changed))
    assert "train.max_steps: 1 -> 2" in str(err.value) and "--allow-recipe-change" in str(err.value)
    summary = train(recipe_from_dict(changed), allow_recipe_change=True)
    assert summary["global_step"] == 2 and [s for s, _ in summary["loss_history"]] == [2]


def test_another_attention_kernel_is_not_a_recipe_change(tmp_path, tiny_dir, capsys):
    """A checkpoint written with model.attn_implementation sdpa (the default before `auto`)
    resumes under the default: the same attention, another kernel; it is said, not refused."""
    from llama_train.config import recipe_from_dict
    from llama_train.trainer import train
    from tests.conftest import tiny_recipe

    base = tiny_recipe(
        tmp_path,
        tiny_dir,
        model={"attn_implementation": "sdpa"},
        data={
            "builtin": {"num_train": 16, "num_eval": 1},
            "seq_len": 48,
            "packing": True,
            "eval": {"max_new_tokens": 1},
        },
        train={"max_steps": 1, "micro_batch_size": 1},
        checkpoint={"save_final": True},
    )
    train(recipe_from_dict(base))
    later = json.loads(json.dumps(base))
    del later["model"]["attn_implementation"]
    capsys.readouterr()
    train(recipe_from_dict(later))  # the same finished run: not evaluated, saved or registered again
    log = " ".join(capsys.readouterr().err.split())
    assert "already finished at step 1" in log and "eval after" not in log, log[-1500:]
    later["train"]["max_steps"] = 2
    with pytest.raises(CheckpointError) as err:  # the step count did change
        train(recipe_from_dict(later))
    assert "attn_implementation" not in str(err.value)
    summary = train(recipe_from_dict(later), allow_recipe_change=True)
    assert summary["global_step"] == 2
    log = " ".join(capsys.readouterr().err.split())
    assert "with model.attn_implementation auto (the checkpoint's run used sdpa)" in log, log[-1500:]


def test_fsync_tree_skips_files_another_rank_renamed_meanwhile(tmp_path, monkeypatch):
    """Ranks fsync the same shared step_N.tmp; a temp file that another rank renamed between the
    listing and the open must not fail this rank's save (seen: rank 1 vs rank 0's adapter writer)."""
    (tmp_path / "real.pt").write_bytes(b"x")
    synced = []
    real_fsync = ckpt._fsync_path
    monkeypatch.setattr(ckpt, "_fsync_path", lambda p: (real_fsync(p), synced.append(Path(p).name)))
    monkeypatch.setattr(ckpt.os, "walk", lambda path: iter([(str(path), [], [".tmpAbC123", "real.pt"])]))
    ckpt.fsync_tree(tmp_path)
    assert synced == ["real.pt", tmp_path.name]


def test_clean_incomplete_only_removes_checkpoint_directories(tmp_path):
    _save(tmp_path, 2)
    (tmp_path / "step_3.tmp").mkdir()
    (tmp_path / "step_4").mkdir()  # renamed, never marked: a crash between rename and marker
    (tmp_path / "best").mkdir()  # the user's
    (tmp_path / "best" / "adapter_model.safetensors").write_bytes(b"x")
    removed = sorted(d.name for d in ckpt.clean_incomplete(tmp_path))
    assert removed == ["step_3.tmp", "step_4"]
    assert (tmp_path / "best" / "adapter_model.safetensors").exists() and (tmp_path / "step_2").exists()


def test_tiny_base_is_never_rebuilt_under_a_run(tmp_path):
    """Changing model.tiny_seed for an output_dir whose base_model was built with another seed is
    refused before anything is written: the run's checkpoints and exports were trained on it."""
    from llama_train.config import recipe_from_dict
    from llama_train.errors import RecipeError
    from llama_train.model import resolve_base_path
    from tests.conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path)
    base = Path(resolve_base_path(recipe_from_dict(recipe)))
    before = (base / "model.safetensors").read_bytes()
    recipe["model"]["tiny_seed"] = 1
    with pytest.raises(RecipeError, match=r"model.tiny_seed=1.*built with seed 0"):
        resolve_base_path(recipe_from_dict(recipe))
    assert (base / "model.safetensors").read_bytes() == before


def test_reruns_resume_never_mix_runs_and_name_damage(tmp_path, tiny_dir):
    """The same command after a run ended changes nothing; a new run never starts among an earlier
    run's files; edited data and damaged checkpoints are refused with the fix (exit 5)."""
    from llama_train.config import recipe_from_dict
    from llama_train.trainer import train
    from tests.conftest import tiny_recipe

    data = tmp_path / "train.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Sort: {n}"}, {"role": "assistant", "content": str(n)}]}
        for n in range(100, 116)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = tiny_recipe(
        tmp_path,
        tiny_dir,
        data={"sources": [{"path": str(data), "format": "messages"}], "seq_len": 48, "cache": False},
        train={"max_steps": 2, "micro_batch_size": 4},
        checkpoint={"save_final": True, "every_n_steps": 1, "keep_last_k": 2},
    )
    out = Path(base["output_dir"])
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "metrics": {"train/loss": 9.0}}\n')  # a dead attempt's
    first = train(recipe_from_dict(base))
    assert not (out / "metrics.jsonl").exists() and len(list(out.glob("metrics.*.jsonl"))) == 1
    adapter = out / "adapter" / "adapter_model.safetensors"
    written = (adapter.stat().st_mtime_ns, (out / "run.json").read_text())

    again = train(recipe_from_dict(base))
    assert again["train_loss"] == first["train_loss"] is not None and again["loss_history"] == first["loss_history"]
    assert (adapter.stat().st_mtime_ns, (out / "run.json").read_text()) == written

    fresh = json.loads(json.dumps(base))
    fresh["checkpoint"]["resume"] = "never"
    with pytest.raises(CheckpointError, match=r"holds an earlier run \(step_1, step_2, run.json\).*new output_dir"):
        train(recipe_from_dict(fresh))
    assert (adapter.stat().st_mtime_ns, (out / "run.json").read_text()) == written

    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))  # edited in place, same recipe
    with pytest.raises(CheckpointError, match=r"training data changed since checkpoint .*step_2"):
        train(recipe_from_dict(base))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    (out / "checkpoints" / "step_2" / "scheduler.pt").write_bytes(b"truncated")
    older = out / "checkpoints" / "step_1"
    with pytest.raises(CheckpointError, match=rf"step_2 cannot be loaded .*damaged.*checkpoint.resume={older}"):
        train(recipe_from_dict(base))
    assert (adapter.stat().st_mtime_ns, (out / "run.json").read_text()) == written
    # the named fix works: choosing the checkpoint is not a recipe change
    named = json.loads(json.dumps(base))
    named["checkpoint"]["resume"] = str(older)
    redone = train(recipe_from_dict(named))
    assert redone["global_step"] == 2 and [s for s, _ in redone["loss_history"]] == [2]
    assert redone["loss_history"][0][1] == pytest.approx(first["loss_history"][1][1], rel=1e-5)


def test_checkpoint_manifest_reports_the_checkpoints_own_loss(tmp_path, tiny_dir):
    """Each checkpoint's state.json carries the loss of the step whose weights it holds, and
    `export` of that checkpoint reports it (not run.json's final loss, not null)."""
    from llama_train.config import recipe_from_dict
    from llama_train.export import export_run
    from llama_train.trainer import train
    from tests.conftest import tiny_recipe

    recipe = tiny_recipe(
        tmp_path,
        tiny_dir,
        data={"seq_len": 48, "cache": False},
        train={"max_steps": 3, "micro_batch_size": 4, "lr": 1e-2},
        checkpoint={"save_final": True, "every_n_steps": 1, "keep_last_k": 3},
    )
    summary = train(recipe_from_dict(recipe))
    losses = dict(summary["loss_history"])
    assert len(set(losses.values())) == 3  # three different losses: the test can tell them apart
    for step in (1, 2, 3):
        ck = Path(recipe["output_dir"]) / "checkpoints" / f"step_{step}"
        manifest = export_run(ck, tmp_path / f"export_{step}")
        assert manifest["metrics"]["status"] == "checkpoint" and manifest["metrics"]["global_step"] == step
        assert manifest["metrics"]["train_loss"] == pytest.approx(losses[step], rel=1e-12)
