"""The README's first command, end to end: the adapter really learned the held-out tasks."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow


def test_run_json_shows_learning(quickstart_run):
    run = json.loads((quickstart_run / "run.json").read_text())
    assert run["status"] == "completed" and run["global_step"] == 200
    before, after = run["eval"]["before"], run["eval"]["after"]
    assert before["exact_match"] <= 0.02
    assert after["exact_match"] >= before["exact_match"] + 0.15, after
    assert after["loss"] < before["loss"] / 2
    assert run["train_loss"] < run["train_loss_first"] / 2
    assert len(run["recipe_sha256"]) == 64 and run["adapter_dir"].endswith("adapter")
    assert (quickstart_run / "recipe.yaml").is_file() and (quickstart_run / "metrics.jsonl").is_file()


def test_adapter_loads_with_peft_offline_and_changes_logits(quickstart_run, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = json.loads((quickstart_run / "run.json").read_text())
    adapter = quickstart_run / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    base = AutoModelForCausalLM.from_pretrained(run["base_model"], use_safetensors=True)
    ids = torch.tensor([[0, 2, 5, 9, 11]])
    with torch.no_grad():
        base_logits = base(ids).logits
        model = PeftModel.from_pretrained(base, str(adapter))
        tuned = model(ids).logits
    assert not torch.allclose(base_logits, tuned, atol=1e-3)


def test_checkpoints_are_complete_and_pruned(quickstart_run):
    ckpts = sorted((quickstart_run / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_100", "step_200"]  # keep_last_k: 2
    assert all((c / "COMPLETE").exists() for c in ckpts)


def test_checkpoint_holds_a_servable_adapter_equal_to_the_final_one(quickstart_run, tmp_path):
    from safetensors.torch import load_file

    from llama_train.export import export_run

    manifest = export_run(quickstart_run / "checkpoints" / "step_200", tmp_path / "exp", formats=["adapter"])
    assert manifest["recipe_sha256"] and manifest["metrics"]["global_step"] == 200
    # the checkpoint records the loss of its last step (it was always null before)
    run = json.loads((quickstart_run / "run.json").read_text())
    assert manifest["metrics"]["train_loss"] == pytest.approx(run["train_loss"])
    exported = load_file(str(tmp_path / "exp" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(quickstart_run / "adapter" / "adapter_model.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)


def test_quickstart_run_is_in_the_local_mlflow_store(quickstart_run):
    """The default store (sqlite beside output_dir) holds params, the recipe artifact, per-step
    and eval metrics, the loss curve and the adapter of the quickstart run."""
    from mlflow import MlflowClient

    run_info = json.loads((quickstart_run / "run.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{quickstart_run.parent / 'mlruns.db'}")
    run = client.get_run(run_info["tracking_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "16" and run.data.params["train.max_steps"] == "200"
    assert run.data.tags["llama_train.recipe_sha256"] == run_info["recipe_sha256"]
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 201))  # every step once
    assert "eval/exact_match" in run.data.metrics and "train/tflops_per_device" in run.data.metrics
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "run.json", "adapter", "loss_curve.png"} <= top, top
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert adapter == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
