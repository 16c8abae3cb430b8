"""The default local MLflow store is relocatable (issue 19): train with the default store
(`<outputs>/mlruns.db` + `<outputs>/mlartifacts/`), register the adapter, move `outputs/`
elsewhere, then open it the documented way (`llama-train track ui DIR`): every artifact of the run
and of its registered model version opens through the UI server, byte for byte."""

from __future__ import annotations

import shutil
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import tiny_recipe
from tests.integration.mlflow_fixtures import MlflowServer, free_port

MODEL_NAME = "moved-lora"


def _train_default_store(outputs: Path, tiny_dir: Path, monkeypatch) -> Path:
    from llama_train.config import recipe_from_dict
    from llama_train.trainer import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = tiny_recipe(
        outputs,
        tiny_dir,
        output_dir=str(outputs / "run"),
        tracking={"enabled": True, "registered_model_name": MODEL_NAME, "log_system_metrics": False},
    )
    train(recipe_from_dict(recipe))
    return outputs / "run"


def _all_artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for f in client.list_artifacts(run_id, path):
        found += _all_artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return found


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200, url
        return resp.read()


@pytest.mark.slow
def test_moved_store_opens_every_artifact(tmp_path, tiny_dir, monkeypatch):
    from mlflow import MlflowClient

    from llama_train.tracking.registry import download_adapter

    _train_default_store(tmp_path / "outputs", tiny_dir, monkeypatch)
    moved = tmp_path / "elsewhere" / "outputs-copy"
    moved.parent.mkdir()
    shutil.move(tmp_path / "outputs", moved)
    run_dir = moved / "run"

    local = MlflowClient(tracking_uri=f"sqlite:///{moved / 'mlruns.db'}")
    (run,) = local.search_runs([local.get_experiment_by_name("llama-train").experiment_id])
    with pytest.raises(Exception):  # noqa: B017  the defect: the db still points at the old path
        local.download_artifacts(run.info.run_id, "recipe.yaml", str(tmp_path / "before"))

    port = free_port()
    cmd = [sys.executable, "-m", "llama_train.cli", "track", "ui", str(moved), "--port", str(port)]
    ui = MlflowServer(tmp_path / "ui", command=cmd, port=port)
    ui.root.mkdir()
    ui.start()
    try:
        client = MlflowClient(tracking_uri=ui.uri, registry_uri=ui.uri)
        run_id = run.info.run_id
        paths = _all_artifacts(client, run_id)
        assert {
            "recipe.yaml",
            "run.json",
            "loss_curve.png",
            "eval_examples.json",
            "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors",
        } <= set(paths), paths
        stored = moved / "mlartifacts" / run_id / "artifacts"
        for path in paths:  # what the UI's Artifacts tab fetches
            query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
            assert _get(f"{ui.uri}/get-artifact?{query}") == (stored / path).read_bytes(), path
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (stored / "adapter" / name).read_bytes() == (run_dir / "adapter" / name).read_bytes()

        version = client.get_model_version_by_alias(MODEL_NAME, "candidate")
        assert version.run_id == run_id
        for name in ("adapter_config.json", "adapter_model.safetensors"):  # the model version page
            query = urllib.parse.urlencode({"path": name, "name": MODEL_NAME, "version": version.version})
            assert _get(f"{ui.uri}/model-versions/get-artifact?{query}") == (run_dir / "adapter" / name).read_bytes()
        adapter = Path(download_adapter(f"models:/{MODEL_NAME}@candidate", uri=ui.uri))
        assert (adapter / "adapter_model.safetensors").read_bytes() == (
            run_dir / "adapter" / "adapter_model.safetensors"
        ).read_bytes()
    finally:
        ui.stop()
    assert not (tmp_path / "outputs").exists()  # nothing was recreated at the old path
    # the store itself (no server) reads the new path too
    assert Path(local.download_artifacts(run.info.run_id, "recipe.yaml", str(tmp_path / "after"))).is_file()


def test_relocate_names_the_directory_when_no_store_is_there(tmp_path):
    from llama_train.errors import UsageError
    from llama_train.tracking.store import relocate

    with pytest.raises(UsageError, match="mlruns.db and mlartifacts/"):
        relocate(tmp_path)


def test_a_new_run_in_a_moved_store_writes_beside_it(tmp_path, monkeypatch):
    """Training into a moved store relocates it first: the new run's artifacts go to the new
    mlartifacts/, never to the old path (which may not exist on this machine)."""
    from mlflow import MlflowClient

    from llama_train.config import recipe_from_dict
    from llama_train.tracking.client import resolve_uri
    from llama_train.tracking.tracker import make_tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def one_run(outputs: Path) -> str:
        recipe = recipe_from_dict(
            {"output_dir": str(outputs / "run"), "train": {"max_steps": 1}, "tracking": {"log_system_metrics": False}}
        )
        tracker = make_tracker(recipe, rank=0)
        run_id = tracker.start(params={}, tags={})
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.finish()
        return run_id

    first = one_run(tmp_path / "a" / "outputs")
    shutil.move(tmp_path / "a" / "outputs", tmp_path / "b")
    with pytest.warns(RuntimeWarning, match="was moved"):
        second = one_run(tmp_path / "b")
    assert not (tmp_path / "a" / "outputs").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'b' / 'mlruns.db'}")
    new_root = (tmp_path / "b" / "mlartifacts").resolve().as_uri()
    for run_id in (first, second):
        assert client.get_run(run_id).info.artifact_uri.startswith(new_root + "/")
        assert Path(client.download_artifacts(run_id, "recipe.yaml", str(tmp_path / run_id))).is_file()
    moved = recipe_from_dict({"output_dir": str(tmp_path / "b" / "run"), "train": {"max_steps": 1}})
    assert resolve_uri(moved).endswith("/b/mlruns.db")
