"""The MLflow client as every stage uses it: HTTP timeouts, where the store and the experiment
are, experiments created once and marked for model training, and MLflow's errors told apart by
kind instead of by each caller matching message text.

Nothing here imports mlflow at module load; the first client does.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from llama_train.tracking.params import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from llama_train.config import Recipe, TrackingConfig

DEFAULT_EXPERIMENT = "llama-train"
# Read by mlflow's REST client at every request; set (unless the user did) before any call so a
# dead or hung server costs seconds, not mlflow's default 120 s x 7 retries with backoff.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",  # seconds, connect and read
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # seconds; sleeps 1, 2 between retries
}


def warn(msg: str) -> None:
    warnings.warn(f"[tracking] {msg}", RuntimeWarning, stacklevel=3)


def configure_env() -> None:
    """The HTTP timeouts above, for this process (also for `mlflow.*` calls without a client)."""
    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def mlflow_client(uri: str) -> MlflowClient:
    """A client of the tracking server and model registry at `uri`, with short HTTP timeouts."""
    configure_env()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _error_code(exc: BaseException) -> str:
    return getattr(exc, "error_code", "") or ""


def is_not_found(exc: BaseException) -> bool:
    """An MLflow error saying the run, model, version or alias does not exist. A REST server
    sends the code RESOURCE_DOES_NOT_EXIST; some local stores only say so in the message."""
    return (
        _error_code(exc) == "RESOURCE_DOES_NOT_EXIST"
        or "RESOURCE_DOES_NOT_EXIST" in str(exc)
        or "not found" in str(exc).lower()
    )


def is_already_exists(exc: BaseException) -> bool:
    """An MLflow error saying the experiment or registered model exists already."""
    return (
        _error_code(exc) == "RESOURCE_ALREADY_EXISTS"
        or "RESOURCE_ALREADY_EXISTS" in str(exc)
        or "already exists" in str(exc)
    )


def resolve_uri(recipe: Recipe) -> str:
    """recipe.tracking.uri, else $MLFLOW_TRACKING_URI, else a SQLite store beside output_dir."""
    if recipe.tracking.uri:
        return recipe.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    parent = Path(recipe.output_dir).resolve().parent
    return f"sqlite:///{parent / 'mlruns.db'}"


def resolve_experiment(tracking: TrackingConfig) -> str:
    """tracking.experiment, else $MLFLOW_EXPERIMENT_NAME, else DEFAULT_EXPERIMENT."""
    return tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def artifact_location(uri: str) -> str | None:
    """For a local SQLite store, artifacts go to `mlartifacts/` beside the database file."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db.parent / "mlartifacts").resolve().as_uri()


def ensure_experiment(client: MlflowClient, name: str, *, uri: str | None = None) -> str:
    """Id of experiment `name`, created if needed, marked as a model-training experiment (MLflow
    3 otherwise opens it in its GenAI view) unless someone chose another kind."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=artifact_location(uri) if uri else None,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except Exception:  # created meanwhile by another job
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if uri:
        exp = _follow_moved_store(client, exp, uri)
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def _follow_moved_store(client: MlflowClient, exp, uri: str):
    """A local store moved or copied with its mlartifacts/ still records the old absolute paths:
    relocate it first, so new runs write beside the database, not under the old path."""
    local = artifact_location(uri)
    here = exp.artifact_location.rstrip("/")
    if local is None or here == local or not here.endswith("/mlartifacts"):
        return exp
    db = Path(uri.removeprefix("sqlite:///"))
    if not (db.parent / "mlartifacts").is_dir():
        return exp
    from llama_train.tracking.store import relocate

    moved = relocate(db)
    warn(f"{db} was moved: artifact locations now point at {moved['artifacts']} (were {', '.join(moved['from'])})")
    return client.get_experiment(exp.experiment_id)


def create_run(
    client: MlflowClient, *, uri: str, experiment: str, run_name: str, tags: dict, start_time_ms: int | None = None
) -> str:
    experiment_id = ensure_experiment(client, experiment, uri=uri)
    return client.create_run(experiment_id, run_name=run_name, tags=tags, start_time=start_time_ms).info.run_id
