"""What the tracker writes beside a run (`metrics.jsonl`, `tracking.json`) and the upload of it:
`sync_run` gives the server what it lacks (metric steps missing from its history, params, tags,
the recipe, artifacts not uploaded, the final status); the tracker calls it when it finishes
after an outage, and `llama-train track sync OUTPUT_DIR` later. Idempotent.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from llama_train.errors import LlamaTrainError
from llama_train.tracking.client import create_run, mlflow_client, warn

if TYPE_CHECKING:
    from mlflow import MlflowClient

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "tracking.json"
# MLflow's server-side limits (mlflow/utils/validation.py): MAX_PARAM_VAL_LENGTH,
# MAX_PARAMS_TAGS_PER_BATCH, MAX_METRICS_PER_BATCH; tag values are capped at 8000 chars.
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 5000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


def param_items(params: dict) -> dict[str, str]:
    return {str(k): str(v)[:MAX_PARAM_VALUE_CHARS] for k, v in params.items()}


def tag_items(tags: dict) -> dict[str, str]:
    return {str(k): str(v)[:MAX_TAG_VALUE_CHARS] for k, v in tags.items() if v is not None}


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        try:
            client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])
        except Exception as exc:  # a value that changed on resume is refused: keep the rest
            if "INVALID_PARAMETER_VALUE" not in str(exc) and "Changing param" not in str(exc):
                raise
            warn(f"some params were not logged (already logged with another value?): {exc}")


def log_metric_batch(client: MlflowClient, run_id: str, rows: list[tuple[str, float, int, int]]) -> None:
    """rows: (key, value, timestamp_ms, step)."""
    from mlflow.entities import Metric

    metrics = [Metric(k, v, ts, step) for k, v, ts, step in rows]
    for i in range(0, len(metrics), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + METRICS_PER_BATCH])


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_metrics_file(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return rows


def upload_artifact(client: MlflowClient, run_id: str, path: Path, artifact_path: str | None) -> None:
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def read_state(output_dir: Path) -> dict:
    path = Path(output_dir) / STATE_FILE
    if not path.exists():
        raise LlamaTrainError(f"{path} not found: was {output_dir} trained with tracking.enabled on rank 0?")
    return json.loads(path.read_text())


def sync_run(
    output_dir: Path,
    *,
    uri: str | None = None,
    client: MlflowClient | None = None,
) -> dict:
    """Upload to the run what the server lacks: metric steps missing from its history, params,
    tags, the recipe, artifacts not uploaded, the final status. Idempotent."""
    output_dir = Path(output_dir)
    state = read_state(output_dir)
    uri = uri or state["uri"]
    client = client or mlflow_client(uri)
    run_id = state.get("run_id")
    if not run_id:  # the server was down when training started: create the run now
        run_id = create_run(
            client,
            uri=uri,
            experiment=state["experiment"],
            run_name=state.get("run_name") or output_dir.name,
            tags=state.get("tags", {}),
            start_time_ms=state.get("start_time_ms"),  # when it ran, not now
        )
        state["run_id"] = run_id
        write_json(output_dir / STATE_FILE, state)
    log_params(client, run_id, state.get("params", {}))
    for key, value in state.get("tags", {}).items():
        client.set_tag(run_id, key, value)
    if state.get("recipe_yaml"):
        client.log_text(run_id, state["recipe_yaml"], "recipe.yaml")
    if state.get("datasets"):
        from llama_train.tracking.datasets import log_dataset_records

        log_dataset_records(client, run_id, state["datasets"])

    local: dict[str, dict[int, tuple[float, int]]] = {}
    for row in read_metrics_file(output_dir):
        ts = int(float(row.get("time", time.time())) * 1000)
        for key, value in row.get("metrics", {}).items():
            local.setdefault(key, {}).setdefault(int(row["step"]), (float(value), ts))
    rows = []
    for key, by_step in local.items():
        have = {m.step for m in client.get_metric_history(run_id, key)}
        rows += [(key, v, ts, step) for step, (v, ts) in sorted(by_step.items()) if step not in have]
    log_metric_batch(client, run_id, rows)

    uploaded = []
    for record in state.get("artifacts", []):
        path = Path(record["path"])
        if record.get("uploaded") or not path.exists():
            continue
        upload_artifact(client, run_id, path, record.get("artifact_path"))
        record["uploaded"] = True
        uploaded.append(str(path))
    if (
        state.get("status") in ("FINISHED", "FAILED", "KILLED") and client.get_run(run_id).info.status == "RUNNING"
    ):  # the recorded end time: a 5-minute run synced an hour later still lasted 5 minutes
        client.set_terminated(run_id, state["status"], end_time=state.get("end_time_ms"))
    write_json(output_dir / STATE_FILE, state)
    summary = {"run_id": run_id, "uri": uri, "num_metrics_uploaded": len(rows), "artifacts_uploaded": uploaded}
    return summary
