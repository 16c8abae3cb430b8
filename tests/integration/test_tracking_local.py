"""Tracking without a server: the default local SQLite store and its artifacts directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llama_train.config import recipe_from_dict
from llama_train.tracking.client import resolve_experiment, resolve_uri
from llama_train.tracking.sync import METRICS_FILE
from llama_train.tracking.tracker import MlflowTracker, make_tracker

pytestmark = pytest.mark.timeout(180)


def test_default_store_is_sqlite_beside_output_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out = tmp_path / "runs" / "first"
    recipe = recipe_from_dict(
        {
            "output_dir": str(out),
            "train": {"max_steps": 2},
            "tracking": {"log_system_metrics": False},
        }
    )
    assert resolve_uri(recipe) == f"sqlite:///{(tmp_path / 'runs' / 'mlruns.db').resolve()}"
    assert resolve_experiment(recipe.tracking) == "llama-train"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert resolve_experiment(recipe.tracking) == "from-env"

    tracker = make_tracker(recipe, rank=0)
    assert isinstance(tracker, MlflowTracker)
    run_id = tracker.start(params={}, tags={})
    assert run_id
    tracker.log_metrics({"loss": 2.0, "lr": 1e-3}, step=1)
    tracker.log_metrics({"loss": 1.0, "lr": 1e-3}, step=2)
    tracker.log_metrics({"loss": 9.0}, step=2)  # same key and step again: skipped
    tracker.finish()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=resolve_uri(recipe))
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [2.0, 1.0]
    artifacts = tmp_path / "runs" / "mlartifacts"
    assert list(artifacts.rglob("recipe.yaml")) and list(artifacts.rglob("loss_curve.png"))
    lines = (out / METRICS_FILE).read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert Path(out / "loss_curve.png").stat().st_size > 1000


def test_env_uri_when_recipe_has_none(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    recipe = recipe_from_dict({"output_dir": str(tmp_path / "x"), "train": {"max_steps": 1}})
    assert resolve_uri(recipe) == "http://mlflow.example:5000"
    recipe = recipe_from_dict(
        {
            "output_dir": str(tmp_path / "x"),
            "train": {"max_steps": 1},
            "tracking": {"uri": "http://other:5000"},
        }
    )
    assert resolve_uri(recipe) == "http://other:5000"
