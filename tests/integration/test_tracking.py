"""MLflow tracking and registry against a real `mlflow server` on localhost.

The server is killed and restarted in the last test of the module (`test_server_goes_away...`):
keep it last.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path

import pytest

from llama_train.config import recipe_from_dict
from llama_train.tracking.registry import (
    CANDIDATE,
    CHAMPION,
    PREVIOUS,
    download_adapter,
    get_alias_version,
    promote,
    register_adapter,
)
from llama_train.tracking.sync import (
    MAX_PARAM_VALUE_CHARS,
    METRICS_FILE,
    STATE_FILE,
    sync_run,
)
from llama_train.tracking.tracker import MlflowTracker, make_tracker

try:
    from mlflow_fixtures import mlflow_server
except ImportError:  # imported as a package module
    from .mlflow_fixtures import mlflow_server  # noqa: F401

pytestmark = pytest.mark.timeout(300)


def _recipe(tmp_path: Path, server, name: str, **tracking):
    return recipe_from_dict(
        {
            "output_dir": str(tmp_path / name),
            "train": {"max_steps": 10},
            "tracking": {
                "uri": server.uri,
                "experiment": "tests",
                "log_system_metrics": False,
                **tracking,
            },
        }
    )


def _adapter_dir(root: Path) -> Path:
    d = root / "adapter"
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    return d


def _client(server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_tracker_logs_params_metrics_and_artifacts(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("KUBEFLOW_JOB_NAME", "llama-job-7")
    monkeypatch.setenv("POD_UID", "0000-pod-uid")
    monkeypatch.setenv("LLAMA_TRAIN_IMAGE", "ghcr.io/example/llama-train:1.0")
    recipe = _recipe(tmp_path, mlflow_server, "run1", log_system_metrics=True)
    tracker = make_tracker(recipe, rank=0)
    assert isinstance(tracker, MlflowTracker)
    extra = {f"extra.p{i:03d}": i for i in range(150)}  # > 100 params: needs several batches
    extra["extra.long"] = "x" * (MAX_PARAM_VALUE_CHARS + 1000)
    run_id = tracker.start(params=extra, tags={"llama_train.dataset_fingerprint": "abc123"})
    assert run_id
    for step in range(1, 6):
        tracker.log_metrics({"loss": 2.0 / step, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 1000.0}, step=step)
    tracker.log_metrics({"eval/loss": 0.7, "eval/exact_match": 0.25}, step=5)  # same step, other keys
    tracker.log_artifact(_adapter_dir(Path(recipe.output_dir)), "adapter")
    time.sleep(1.5)  # a few system metric samples
    tracker.finish()

    client = _client(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert len(params) > 150 and params["extra.p149"] == "149"
    assert params["train.lr"] == str(recipe.train.lr)
    assert len(params["extra.long"]) == MAX_PARAM_VALUE_CHARS
    tags = run.data.tags
    assert tags["llama_train.recipe_sha256"] == recipe.sha256()
    assert tags["llama_train.dataset_fingerprint"] == "abc123"
    assert tags["k8s.job_name"] == "llama-job-7" and tags["k8s.pod_uid"] == "0000-pod-uid"
    assert tags["k8s.image"] == "ghcr.io/example/llama-train:1.0"
    assert _steps(client, run_id, "loss") == [1, 2, 3, 4, 5]
    assert _steps(client, run_id, "eval/loss") == [5]
    assert any(k.startswith("system/") for k in run.data.metrics), run.data.metrics.keys()
    root = {f.path for f in client.list_artifacts(run_id)}
    assert {"recipe.yaml", "loss_curve.png", "adapter"} <= root
    adapter = {f.path for f in client.list_artifacts(run_id, "adapter")}
    assert adapter == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    recipe_text = Path(client.download_artifacts(run_id, "recipe.yaml", str(tmp_path))).read_text()
    assert "max_steps: 10" in recipe_text

    out = Path(recipe.output_dir)
    lines = [json.loads(x) for x in (out / METRICS_FILE).read_text().splitlines()]
    # system metrics are kept in the file too (issue 24): the 6 logged lines plus the samples
    logged = [x for x in lines if not any(k.startswith("system/") for k in x["metrics"])]
    assert len(logged) == 6 and set(lines[0]) == {"step", "metrics", "time"}
    assert len(lines) - len(logged) >= 2
    state = json.loads((out / STATE_FILE).read_text())
    assert state["run_id"] == run_id and state["status"] == "FINISHED"


def test_other_ranks_and_disabled_tracking_touch_nothing(tmp_path, mlflow_server):
    recipe = _recipe(tmp_path, mlflow_server, "quiet")
    for tracker in (
        make_tracker(recipe, rank=1),
        make_tracker(
            recipe.model_copy(update={"tracking": recipe.tracking.model_copy(update={"enabled": False})}),
            rank=0,
        ),
    ):
        assert tracker.start(params={"a": 1}, tags={}) is None
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.finish()
        assert tracker.run_id is None
    assert not Path(recipe.output_dir).exists()


def test_resume_continues_the_run_without_duplicate_steps(mlflow_server, tmp_path):
    recipe = _recipe(tmp_path, mlflow_server, "resume")
    first = make_tracker(recipe, rank=0)
    run_id = first.start(params={}, tags={})
    for step in range(1, 6):
        first.log_metrics({"loss": 1.0 / step}, step=step)
    first.finish("KILLED")  # preempted after a checkpoint at step 3

    second = make_tracker(recipe, rank=0)
    assert second.start(params={}, tags={}, resume_run_id=run_id) == run_id
    assert _client(mlflow_server).get_run(run_id).info.status == "RUNNING"
    for step in range(4, 9):  # the trainer replays steps 4-5 from the checkpoint
        second.log_metrics({"loss": 1.0 / step}, step=step)
    second.finish()

    # A fresh output dir (no metrics.jsonl): the last steps come from the server.
    other = _recipe(tmp_path, mlflow_server, "resume_elsewhere")
    third = make_tracker(other, rank=0)
    assert third.start(params={}, tags={}, resume_run_id=run_id) == run_id
    for step in range(7, 11):
        third.log_metrics({"loss": 1.0 / step}, step=step)
    third.finish()

    client = _client(mlflow_server)
    assert _steps(client, run_id, "loss") == list(range(1, 11))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_registry_candidate_promote_and_download(mlflow_server, tmp_path):
    recipe = _recipe(tmp_path, mlflow_server, "reg", registered_model_name="tiny-lora")
    name = recipe.tracking.registered_model_name
    adapter = _adapter_dir(Path(recipe.output_dir))
    versions = []
    for _ in range(2):
        tracker = make_tracker(recipe, rank=0)
        tracker.start(params={}, tags={})
        tracker.log_metrics({"eval/exact_match": 0.5}, step=1)
        tracker.log_artifact(adapter, "adapter")
        tracker.finish()
        versions.append(register_adapter(tracker, adapter, name=name, tags={"gate": "pending"}))
        # the second run logs no adapter itself: register_adapter uploads it
        Path(recipe.output_dir, METRICS_FILE).unlink()
    assert versions == ["1", "2"]

    client = _client(mlflow_server)
    mv = client.get_model_version(name, "2")
    assert mv.tags["llama_train.recipe_sha256"] == recipe.sha256()
    # one tag per fact (issue 24): the final eval value once, as eval_after.<metric>
    assert mv.tags["eval_after.exact_match"] == "0.5" and mv.tags["gate"] == "pending"
    assert not [k for k in mv.tags if k.startswith("metric.")]
    assert get_alias_version(name, CANDIDATE, client=client) == "2"
    assert get_alias_version(name, CHAMPION, client=client) is None

    assert promote(name, "1", client=client) == {CHAMPION: "1", PREVIOUS: None}
    assert promote(name, "2", client=client) == {CHAMPION: "2", PREVIOUS: "1"}
    assert get_alias_version(name, PREVIOUS, uri=mlflow_server.uri) == "1"

    for uri in (f"models:/{name}@{CHAMPION}", f"models:/{name}/1"):
        local = download_adapter(uri, dst=tmp_path / uri.replace("/", "_").replace(":", ""), uri=mlflow_server.uri)
        assert (local / "adapter_config.json").exists() and (local / "adapter_model.safetensors").exists()

    assert register_adapter(None, adapter, name=name, tags={}) is None


def test_server_goes_away_training_continues_and_sync_fills_gaps(mlflow_server, tmp_path):
    """Keep last: kills and restarts the module's server."""
    recipe = _recipe(tmp_path, mlflow_server, "flaky")
    tracker = make_tracker(recipe, rank=0)
    tracker.flush_timeout_s = 30
    run_id = tracker.start(params={}, tags={})
    durations = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 41):
            if step == 11:
                assert tracker.flush(30)  # steps 1-10 reached the server
                mlflow_server.kill()
            t0 = time.monotonic()
            tracker.log_metrics({"loss": 1.0 / step, "tokens_per_s": 100.0 + step}, step=step)
            durations.append(time.monotonic() - t0)
            time.sleep(0.05)  # a (very fast) training step
        t0 = time.monotonic()
        tracker.finish()
        finish_s = time.monotonic() - t0
        # Started while the server is down: no run id yet, everything goes to the file.
        offline = make_tracker(_recipe(tmp_path, mlflow_server, "offline"), rank=0)
        assert offline.start(params={"note": "offline"}, tags={}) is None
        for step in range(1, 4):
            offline.log_metrics({"loss": float(step)}, step=step)
        offline.finish()
    messages = [str(w.message) for w in caught]
    assert any("failed" in m for m in messages) and any("unreachable" in m for m in messages)
    # the run that lost its server ends by saying what to run (issue 24), not "retrying in 30 s"
    closing = [m for m in messages if "did not receive everything" in m]
    assert closing and f"llama-train track sync {recipe.output_dir}" in closing[0], messages[-3:]
    print(
        f"log_metrics: mean {statistics.mean(durations) * 1000:.2f} ms, "
        f"max {max(durations) * 1000:.2f} ms; finish {finish_s:.1f} s"
    )
    assert statistics.mean(durations) < 1.0 and max(durations) < 5.0
    assert finish_s < 60

    mlflow_server.start()
    client = _client(mlflow_server)
    assert _steps(client, run_id, "loss") == list(range(1, 11))
    summary = sync_run(Path(recipe.output_dir))
    assert summary["run_id"] == run_id and summary["num_metrics_uploaded"] == 2 * 30
    for key in ("loss", "tokens_per_s"):
        assert _steps(client, run_id, key) == list(range(1, 41))
    assert client.get_run(run_id).info.status == "FINISHED"
    # the end time the run recorded, not the time of the sync
    state = json.loads((Path(recipe.output_dir) / STATE_FILE).read_text())
    assert client.get_run(run_id).info.end_time == state["end_time_ms"]
    assert "loss_curve.png" in {f.path for f in client.list_artifacts(run_id)}
    assert sync_run(Path(recipe.output_dir))["num_metrics_uploaded"] == 0  # idempotent

    summary = sync_run(tmp_path / "offline")
    assert _steps(client, summary["run_id"], "loss") == [1, 2, 3]
    assert client.get_run(summary["run_id"]).data.params["note"] == "offline"
