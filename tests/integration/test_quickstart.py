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
