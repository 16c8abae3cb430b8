"""Params, base-model names and registry texts shown in MLflow (the server side is tested in
tests/integration/test_tracking_story.py)."""

from __future__ import annotations

import json

from llama_train.config import recipe_from_dict
from llama_train.tracking.params import (
    hub_id_of,
    param_value,
    served_base_name,
    summary_metrics,
    training_params,
    version_description,
)


def test_params_are_json_without_none_and_only_training_sections():
    recipe = recipe_from_dict(
        {
            "train": {"max_steps": 3, "warmup_ratio": 0.1},
            "data": {"sources": [{"path": "some/hub-set", "split": "train"}]},
            "tracking": {"registered_model_name": "x"},
        }
    )
    params = training_params(recipe)
    assert "None" not in params.values() and "null" not in params.values()
    assert "train.warmup_steps" not in params and params["train.warmup_ratio"] == "0.1"
    assert {k.split(".")[0] for k in params} == {"model", "data", "lora", "train", "parallel"}
    assert json.loads(params["data.sources"]) == [
        {"path": "some/hub-set", "split": "train", "format": "messages", "weight": 1.0}
    ]
    assert not [k for k in params if k.startswith("data.builtin.")]  # no built-in source: not shaping
    assert params["train.compile"] == "false" and json.loads(params["train.betas"]) == [0.9, 0.999]
    assert param_value(None) == "null" and param_value("a b") == "a b"


def test_hub_ids_and_cache_snapshots_name_the_base(tmp_path):
    snap = tmp_path / "hub" / "models--meta-llama--Llama-3.1-8B" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    other = tmp_path / "my-model"
    other.mkdir()
    assert hub_id_of(str(snap)) == "meta-llama/Llama-3.1-8B"
    assert hub_id_of("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert hub_id_of(str(other)) is None and hub_id_of("./x/y") is None
    recipe = recipe_from_dict({"model": {"source": "hf", "path": str(snap)}, "train": {"max_steps": 1}})
    assert served_base_name(recipe.model, str(snap)) == "meta-llama/Llama-3.1-8B"
    assert served_base_name(recipe.model, str(other)) == str(other)


def test_description_and_summary_metrics():
    before, after = {"loss": 2.0, "exact_match": 0.1}, {"loss": 1.0, "exact_match": 0.6}
    text = version_description(
        base_model="org/base",
        recipe_sha256="ab" * 32,
        run_name="r1",
        eval_before=before,
        eval_after=after,
        metric="exact_match",
        global_step=7,
    )
    assert "`org/base`" in text and "ab" * 32 in text and "(7 steps)" in text
    assert "eval exact_match: 0.1 before → 0.6 after training" in text
    summary = {
        "train_runtime_s": 3.5,
        "consumed_tokens": 100,
        "supervised_tokens_total": 40,
        "train_loss": None,
        "eval": {"before": before, "after": after},
    }
    m = summary_metrics(summary)
    assert m["summary/total_tokens"] == 100 and "summary/train_loss" not in m
    assert m["summary/eval_exact_match_change"] == 0.5


def test_command_line_tag_masks_credentials(monkeypatch):
    """The command line is a tag everyone with UI access reads: URL credentials and secret-looking
    override values are masked, the rest is kept as typed."""
    from llama_train.tracking.params import source_tags

    monkeypatch.setattr(
        "sys.argv",
        [
            "/usr/bin/llama-train",
            "run",
            "r.yaml",
            "train.lr=1e-4",
            "tracking.uri=https://alice:s3cr3t@mlflow.example:5000",
            "--hf-token=hf_abc",
            "export.api_key=xyz",
        ],
    )
    tags = source_tags()
    command = tags["llama_train.command"]
    assert "s3cr3t" not in command and "hf_abc" not in command and "xyz" not in command
    assert "tracking.uri=https://***@mlflow.example:5000" in command
    assert "--hf-token=***" in command and "export.api_key=***" in command and "train.lr=1e-4" in command
    assert "s3cr3t" not in tags["mlflow.source.name"]
