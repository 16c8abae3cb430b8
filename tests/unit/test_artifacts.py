"""The typed hand-offs between stages (llama_train/artifacts.py) and export reading a saved recipe
through the schema."""

import json

import pytest

from llama_train.artifacts import ExportManifest, RunSummary, TrainingState
from llama_train.errors import ExportError
from llama_train.export import resolve_run


def test_round_trip_and_older_or_newer_files():
    state = TrainingState(step=7, consumed_samples=56, train_loss=1.5, loader={"epoch": 0, "position": 56})
    assert TrainingState.from_json(json.loads(json.dumps(state.to_json()))) == state
    # an older state.json (no train_loss, no loss scale) and a newer one (a field this version lacks)
    old = TrainingState.from_json({"step": 3, "consumed_samples": 24, "future_field": [1]})
    assert (old.step, old.train_loss, old.loss_scale_good_steps) == (3, None, 0)


def test_a_field_of_the_wrong_type_is_named():
    with pytest.raises(ValueError, match=r"TrainingState.step is str '3'"):
        TrainingState.from_json({"step": "3"})
    with pytest.raises(ValueError, match=r"RunSummary.train_loss is bool True"):
        RunSummary.from_json({"train_loss": True})
    with pytest.raises(ValueError, match="not a JSON object"):
        ExportManifest.from_json([1, 2])


def test_run_summary_leaves_out_unset_outputs():
    j = RunSummary(status="completed", global_step=2, adapter_dir="/r/adapter").to_json()
    assert j["adapter_dir"] == "/r/adapter" and "model_dir" not in j and "registered_version" not in j
    assert j["train_loss"] is None  # the run's own fields are always there


def test_restore_keeps_the_named_fields():
    current = TrainingState(world_size=2, dataset_fingerprint="new")
    current.restore(
        TrainingState(step=5, world_size=4, dataset_fingerprint="old", train_loss=0.5),
        keep=("world_size", "dataset_fingerprint"),
    )
    assert (current.step, current.train_loss, current.world_size, current.dataset_fingerprint) == (5, 0.5, 2, "new")


def _checkpoint_dir(tmp_path, recipe_text: str, state: dict) -> "object":
    ck = tmp_path / "run" / "checkpoints" / "step_4"
    (ck / "adapter").mkdir(parents=True)
    (ck / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "b"}))
    (ck / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    (ck / "recipe.yaml").write_text(recipe_text)
    (ck / "state.json").write_text(json.dumps(state))
    return ck


def test_export_reads_an_older_recipe_and_a_checkpoint_state(tmp_path):
    """A recipe from an older version (a key this schema no longer has) stays exportable: its
    export section is validated on its own, with the schema's defaults."""
    ck = _checkpoint_dir(
        tmp_path, "old_section: {x: 1}\nexport: {max_lora_rank: 32}\n", {"step": 4, "train_loss": 2.5, "x": 1}
    )
    info = resolve_run(ck)
    assert info.export.max_lora_rank == 32 and info.export.targets == ["vllm", "nim"]
    assert (info.checkpoint_state.step, info.checkpoint_state.train_loss) == (4, 2.5)


def test_export_names_a_bad_export_section_and_a_bad_state(tmp_path):
    ck = _checkpoint_dir(tmp_path, "export: {max_lora_rnk: 32}\n", {"step": 4})
    with pytest.raises(ExportError, match=r"export.max_lora_rnk: unknown key; did you mean `export.max_lora_rank`"):
        resolve_run(ck)
    ck = _checkpoint_dir(tmp_path / "b", "export: {}\n", {"step": "four"})
    with pytest.raises(ExportError, match=r"state.json is unreadable \(TrainingState.step is str 'four'"):
        resolve_run(ck)
