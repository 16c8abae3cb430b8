"""Experiment tracking (MLflow) and the model registry, never fatal to training.

Only the global rank 0 tracks (`make_tracker(recipe, rank=...)` gives every other rank a
`NullTracker` that touches no file and no network). The MLflow tracker:

- appends every `log_metrics` call to `<output_dir>/metrics.jsonl` first (synchronously, one
  JSON line `{"step", "metrics", "time"}`): that file is the source of truth;
- sends everything to MLflow from one background thread through a bounded queue, with short
  HTTP timeouts; when the server is unreachable, items are dropped (they are in the file) and
  the thread backs off, so a training step never waits on the network;
- records its run id and what is still to upload in `<output_dir>/tracking.json`, so that
  `llama-train track sync OUTPUT_DIR` can later upload what the server lacks (it compares the
  server's metric history with metrics.jsonl; no step is logged twice);
- continues the same MLflow run on resume and skips (metric, step) pairs already logged.

The client factory and experiments are in llama_train.tracking.client, the offline upload in
llama_train.tracking.sync, the background upload thread in llama_train.tracking.uploader, the
loss curve in llama_train.tracking.figures, the run tags taken from the environment in
llama_train.tracking.params, the model registry in llama_train.tracking.registry.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llama_train.tracking.client import (
    create_run,
    is_not_found,
    mlflow_client,
    resolve_experiment,
    resolve_uri,
    warn,
)
from llama_train.tracking.figures import plot_loss_curve
from llama_train.tracking.params import environment_tags
from llama_train.tracking.sync import (
    METRICS_FILE,
    STATE_FILE,
    log_metric_batch,
    log_params,
    param_items,
    read_metrics_file,
    sync_run,
    tag_items,
    upload_artifact,
    write_json,
)
from llama_train.tracking.uploader import Uploader

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from llama_train.config import Recipe

LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # which artifacts the UI renders as tables


class Tracker(Protocol):
    run_id: str | None

    def start(self, *, params: dict, tags: dict, resume_run_id: str | None = None) -> str | None: ...
    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_datasets(self, records: list[dict]) -> None: ...
    def log_table(self, table: dict, artifact_file: str) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """What every rank but the global rank 0 gets, and rank 0 with tracking disabled."""

    run_id: str | None = None

    def start(self, *, params: dict, tags: dict, resume_run_id: str | None = None) -> str | None:
        return None

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_datasets(self, records: list[dict]) -> None:
        pass

    def log_table(self, table: dict, artifact_file: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker:
    """MLflow run of one training job (global rank 0), resilient to the server going away."""

    def __init__(
        self,
        *,
        uri: str,
        experiment: str,
        output_dir: str | Path,
        run_name: str | None = None,
        recipe_yaml: str | None = None,
        default_params: dict | None = None,
        default_tags: dict | None = None,
        log_system_metrics: bool = True,
        flush_timeout_s: float = 120.0,
        max_queue: int = 1000,
        backoff_s: float = 30.0,
    ):
        self.uri = uri
        self.experiment = experiment
        self.output_dir = Path(output_dir)
        self.run_name = run_name or self.output_dir.name
        self.recipe_yaml = recipe_yaml
        self.default_params = dict(default_params or {})
        self.default_tags = dict(default_tags or {})
        self.log_system_metrics = log_system_metrics
        self.flush_timeout_s = flush_timeout_s
        self.run_id: str | None = None
        self.last_steps: dict[str, int] = {}  # metric key -> last step logged (file or server)
        self.latest: dict[str, float] = {}  # metric key -> last value (for registry tags)
        self._max_queue, self._backoff_s = max_queue, backoff_s
        self._uploader: Uploader | None = None
        self._client: MlflowClient | None = None
        self._file = None
        self._sampler = None
        self._log_lock = threading.Lock()  # log_metrics runs on the main and the sampler thread
        self._state: dict = {}
        self._state_lock = threading.Lock()
        self._finished = False
        self._warned_bad_value = False

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, *, params: dict, tags: dict, resume_run_id: str | None = None) -> str | None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._load_last_steps_from_file()
        self._file = open(self.output_dir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115  (open for the whole run)
        all_params = param_items({**self.default_params, **params})
        all_tags = tag_items({**environment_tags(), **self.default_tags, **tags})
        self._state = {
            "uri": self.uri,
            "experiment": self.experiment,
            "run_name": self.run_name,
            "run_id": resume_run_id,
            "status": "RUNNING",
            "params": all_params,
            "tags": all_tags,
            "recipe_yaml": self.recipe_yaml,
            "artifacts": [],
            "datasets": [],
            "start_time_ms": self._resumed_start_ms(resume_run_id) or int(time.time() * 1000),
        }
        try:
            self._client = mlflow_client(self.uri)
            self.run_id = self._open_run(all_tags, resume_run_id)
        except Exception as exc:  # noqa: BLE001  (tracking must never stop training)
            self.run_id = resume_run_id
            warn(
                f"MLflow at {self.uri} is unreachable ({type(exc).__name__}: {str(exc)[:200]}); "
                f"training continues, metrics go to {self.output_dir / METRICS_FILE}; upload "
                f"them later with `llama-train track sync {self.output_dir}`"
            )
            self._client = None
        self._state["run_id"] = self.run_id
        self._save_state()
        if self._client is not None and self.run_id is not None:
            self._uploader = Uploader(max_queue=self._max_queue, backoff_s=self._backoff_s)
        if self.log_system_metrics:  # also offline: the samples go to metrics.jsonl
            self._start_system_metrics()
        if self._uploader is None:
            return self.run_id
        client, run_id = self._client, self.run_id
        self._submit(lambda: log_params(client, run_id, all_params), "log params")
        if self.recipe_yaml:
            self._submit(lambda: client.log_text(run_id, self.recipe_yaml, "recipe.yaml"), "log recipe")
        return self.run_id

    def _resumed_start_ms(self, resume_run_id: str | None) -> int | None:
        """Start time of the attempt this one continues (same run id, its metrics still here), so
        a run created later by `track sync` starts when training did."""
        try:
            previous = json.loads((self.output_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return None
        metrics = self.output_dir / METRICS_FILE
        if previous.get("run_id") != resume_run_id or not metrics.exists() or not metrics.stat().st_size:
            return None
        return previous.get("start_time_ms")

    def _open_run(self, tags: dict[str, str], resume_run_id: str | None) -> str:
        client = self._client
        if resume_run_id:
            try:
                run = client.get_run(resume_run_id)
            except Exception as exc:
                if not is_not_found(exc):
                    raise
                warn(f"run {resume_run_id} to resume is not on the server; starting a new run")
            else:
                if run.info.status != "RUNNING":
                    client.update_run(resume_run_id, status="RUNNING")
                for key, value in tags.items():
                    client.set_tag(resume_run_id, key, value)
                self._merge_server_last_steps(run)
                return resume_run_id
        return create_run(
            client,
            uri=self.uri,
            experiment=self.experiment,
            run_name=self.run_name,
            tags=tags,
            start_time_ms=self._state.get("start_time_ms"),
        )

    def _start_system_metrics(self) -> None:
        try:
            from llama_train.system_metrics import SystemSampler

            first = 1 + max((s for k, s in self.last_steps.items() if k.startswith("system/")), default=-1)
            self._sampler = SystemSampler(lambda metrics, step: self.log_metrics(metrics, step=step), first_step=first)
            self._sampler.start()
        except Exception as exc:  # noqa: BLE001  (tracking must never stop training)
            warn(f"system metrics are off ({type(exc).__name__}: {exc}); `pip install psutil`")
            self._sampler = None

    def finish(self, status: str = "FINISHED") -> None:
        if self._finished:
            return
        if self._sampler is not None:
            self._sampler.finish()
        self._finished = True
        with self._log_lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        curve = plot_loss_curve(self.output_dir)
        with self._state_lock:  # the uploader thread serializes _state meanwhile
            self._state["status"] = status
            end_ms = self._state["end_time_ms"] = int(time.time() * 1000)  # kept by `track sync`
        if curve is not None:
            self.log_artifact(curve)
        self._save_state()
        uploader = self._uploader
        if uploader is None:
            self._closing_message(complete=False)
            return
        client, run_id, output_dir = self._client, self.run_id, self.output_dir
        uploader.retry_now()  # one more try for the final items even inside a backoff window
        uploader.closing = True
        done: dict[str, bool] = {}
        if uploader.num_failed or uploader.num_dropped:

            def fill_gaps() -> None:
                sync_run(output_dir, client=client)
                done["gaps"] = True

            self._submit(fill_gaps, "upload of what the server missed")
        else:
            done["gaps"] = True

        def end_run() -> None:
            client.set_terminated(run_id, status, end_time=end_ms)
            done["end"] = True

        self._submit(end_run, "end of run")
        closed = uploader.close(self.flush_timeout_s)
        self._save_state()
        self._closing_message(complete=closed and done.get("gaps", False) and "end" in done)

    def run_url(self) -> str | None:
        """The run's page in the MLflow UI, in its model-training view (MLflow 3 opens the GenAI
        view unless asked: the experimentKind tag is not enough in 3.17's UI)."""
        if not self.run_id or not self.uri.startswith(("http://", "https://")):
            return None
        try:
            exp_id = self._client.get_run(self.run_id).info.experiment_id
        except Exception:  # noqa: BLE001
            return None
        return f"{self.uri.rstrip('/')}/#/experiments/{exp_id}/runs/{self.run_id}?workflowType=machine_learning"

    def _closing_message(self, *, complete: bool) -> None:
        """The last thing a run says about tracking: where it is, or what is left and how to
        upload it."""
        if complete:
            if url := self.run_url():
                print(f"MLflow run: {url}", file=sys.stderr, flush=True)
            return
        pending = [a for a in self._state.get("artifacts", []) if not a.get("uploaded")]
        where = f"run {self.run_id}" if self.run_id else "no MLflow run yet"
        warn(
            f"MLflow at {self.uri} did not receive everything ({where}; {len(pending)} artifact(s) "
            f"pending; all metrics are in {self.output_dir / METRICS_FILE}). When the server is "
            f"reachable, run: llama-train track sync {self.output_dir}"
        )

    def flush(self, timeout: float | None = None) -> bool:
        return self._uploader.flush(timeout or self.flush_timeout_s) if self._uploader else True

    # ---- logging ---------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        with self._log_lock:
            self._log_metrics(metrics, step=step)

    def _log_metrics(self, metrics: dict[str, float], *, step: int) -> None:
        if self._file is None:
            return
        fresh: dict[str, float] = {}
        for key, value in metrics.items():
            if step <= self.last_steps.get(key, -1):
                continue  # replayed after resume: logged before
            try:
                fresh[key] = float(value)
            except (TypeError, ValueError):
                if not self._warned_bad_value:
                    self._warned_bad_value = True
                    warn(f"metric {key}={value!r} is not a number; not logged")
        if not fresh:
            return
        now = time.time()
        line = {
            "step": int(step),
            "metrics": {k: (v if math.isfinite(v) else str(v)) for k, v in fresh.items()},
            "time": now,
        }
        self._file.write(json.dumps(line) + "\n")
        for key, value in fresh.items():
            self.last_steps[key] = int(step)
            self.latest[key] = value
        if self._uploader is not None:
            client, run_id = self._client, self.run_id
            rows = [(k, v, int(now * 1000), int(step)) for k, v in fresh.items()]
            self._submit(lambda: log_metric_batch(client, run_id, rows), "log metrics")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path).resolve()
        if not path.exists():
            warn(f"artifact {path} does not exist; not logged")
            return
        record = {"path": str(path), "artifact_path": artifact_path, "uploaded": False}
        with self._state_lock:
            self._state.setdefault("artifacts", []).append(record)
        self._save_state()
        if self._uploader is None:
            return

        def upload() -> None:
            upload_artifact(self._client, self.run_id, path, artifact_path)
            record["uploaded"] = True
            self._save_state()

        self._submit(upload, f"upload of {path.name}")

    def log_datasets(self, records: list[dict]) -> None:
        """Dataset lineage (see llama_train.tracking.datasets), kept for `track sync`."""
        from llama_train.tracking.datasets import log_dataset_records

        with self._state_lock:
            self._state["datasets"] = list(records)
        self._save_state()
        client, run_id = self._client, self.run_id
        self._submit(lambda: log_dataset_records(client, run_id, records), "log of datasets")

    def log_table(self, table: dict, artifact_file: str) -> None:
        """A table (columns + data rows) as a run artifact the UI shows as a table (what
        `MlflowClient.log_table` writes), written to output_dir first."""
        path = self.output_dir / artifact_file
        try:
            write_json(path, table)
        except OSError as exc:
            warn(f"cannot write {path}: {exc}")
            return
        with self._state_lock:
            tags = self._state.setdefault("tags", {})
            logged = json.loads(tags.get(LOGGED_ARTIFACTS_TAG, "[]"))
            if {"path": artifact_file, "type": "table"} not in logged:
                logged.append({"path": artifact_file, "type": "table"})
            tags[LOGGED_ARTIFACTS_TAG] = json.dumps(logged)
        self.log_artifact(path)
        client, run_id, value = self._client, self.run_id, tags[LOGGED_ARTIFACTS_TAG]
        self._submit(lambda: client.set_tag(run_id, LOGGED_ARTIFACTS_TAG, value), "tag of table")

    def _submit(self, fn: Callable[[], Any], what: str) -> None:
        if self._uploader is not None:
            self._uploader.submit(fn, what)

    # ---- state -----------------------------------------------------------------------------

    def _save_state(self) -> None:
        with self._state_lock:
            try:
                write_json(self.output_dir / STATE_FILE, self._state)
            except OSError as exc:
                warn(f"cannot write {STATE_FILE}: {exc}")

    def _load_last_steps_from_file(self) -> None:
        for row in read_metrics_file(self.output_dir):
            for key, value in row.get("metrics", {}).items():
                step = int(row.get("step", -1))
                if step >= self.last_steps.get(key, -1):
                    self.last_steps[key] = step
                    self.latest[key] = value

    def _merge_server_last_steps(self, run) -> None:
        objs = getattr(run.data, "_metric_objs", None)
        if objs is None:  # fall back to the public (slower) history API
            objs = [m for key in run.data.metrics for m in self._client.get_metric_history(run.info.run_id, key)]
        for m in objs:
            if m.step > self.last_steps.get(m.key, -1):
                self.last_steps[m.key] = m.step


def make_tracker(recipe: Recipe, *, rank: int) -> Tracker:
    """MlflowTracker on the global rank 0 with tracking enabled; a do-nothing tracker otherwise."""
    if rank != 0 or not recipe.tracking.enabled:
        return NullTracker()
    from llama_train.config import dump_recipe
    from llama_train.tracking.params import base_model_label, source_tags, training_params

    return MlflowTracker(
        uri=resolve_uri(recipe),
        experiment=resolve_experiment(recipe.tracking),
        output_dir=recipe.output_dir,
        run_name=recipe.tracking.run_name,
        recipe_yaml=dump_recipe(recipe),
        default_params=training_params(recipe),
        default_tags={
            **source_tags(),
            "llama_train.recipe_sha256": recipe.sha256(),
            "llama_train.base_model": base_model_label(recipe.model, recipe.model.path or ""),
        },
        log_system_metrics=recipe.tracking.log_system_metrics,
    )
