"""What a user sees of a training run in MLflow, against a real `mlflow server`: eval charts from
step 0, the eval examples table, dataset lineage, clean params, tags, the model version's
description and tags, summary and system metrics; an offline run synced later keeps its times;
and the MLflow UI itself, read by headless Chromium.

One short training run (tiny model, 6 steps, eval every 3) is tracked to the module's server by
`llama-train run`, as a user runs it; the tests read it back.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from llama_train.config import recipe_from_dict
from llama_train.tracking.datasets import dataset_records
from llama_train.tracking.params import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from llama_train.tracking.sync import STATE_FILE, sync_run
from llama_train.tracking.tracker import make_tracker

try:
    import browser
    from mlflow_fixtures import free_port, mlflow_server
except ImportError:  # imported as a package module
    from . import browser
    from .mlflow_fixtures import free_port, mlflow_server  # noqa: F401

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "story-lora"
HUB_ID = "llama-train/tiny-llama"
STEPS, EVAL_EVERY, NUM_TRAIN, MICRO = 6, 3, 64, 8


@dataclass
class StoryRun:
    out: Path
    run_id: str
    experiment_id: str
    summary: dict
    uri: str
    recipe_path: Path
    seconds: float

    @property
    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)


@pytest.fixture(scope="module")
def story(mlflow_server, tmp_path_factory) -> StoryRun:
    from llama_train.tiny import build_tiny

    root = tmp_path_factory.mktemp("story")
    # the base as a Hugging Face cache snapshot, as `from_pretrained(hub id)` leaves it on disk
    base = build_tiny(root / "hub" / f"models--{HUB_ID.replace('/', '--')}" / "snapshots" / "0123abcd", seed=0)
    recipe = {
        "output_dir": str(root / "run"),
        "model": {"source": "hf", "path": str(base)},
        "data": {"builtin": {"num_train": NUM_TRAIN, "num_eval": 8}, "seq_len": 64},
        "train": {
            "max_steps": STEPS,
            "micro_batch_size": MICRO,
            "lr": 3e-3,
            "warmup_steps": 0,
            "eval_every_n_steps": EVAL_EVERY,
            "num_threads": 1,
        },
        "checkpoint": {"save_final": False},
        "tracking": {"uri": mlflow_server.uri, "experiment": "story", "registered_model_name": MODEL_NAME},
    }
    recipe_path = root / "story.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "llama_train.cli", "run", str(recipe_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - t0
    print(f"story run: {seconds:.1f} s")
    assert res.returncode == 0, res.stderr[-4000:]
    out = root / "run"
    summary = json.loads((out / "run.json").read_text())
    state = json.loads((out / STATE_FILE).read_text())
    run = StoryRun(out, state["run_id"], "", summary, mlflow_server.uri, recipe_path, seconds)
    run.experiment_id = run.client.get_run(run.run_id).info.experiment_id
    assert "?workflowType=machine_learning" in res.stderr  # the closing line links the run's page
    return run


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_eval_is_charted_at_step_0_during_and_after_training(story):
    client = story.client
    before, after = story.summary["eval"]["before"], story.summary["eval"]["after"]
    loss = _history(client, story.run_id, "eval/loss")
    assert [s for s, _ in loss] == [0, EVAL_EVERY, STEPS]
    assert loss[0][1] == pytest.approx(before["loss"]) and loss[-1][1] == pytest.approx(after["loss"])
    assert loss[-1][1] < loss[0][1]  # the fine-tune's point, on one chart
    match = _history(client, story.run_id, "eval/exact_match")
    assert match == [(0, pytest.approx(before["exact_match"])), (STEPS, pytest.approx(after["exact_match"]))]
    assert [s for s, _ in _history(client, story.run_id, "eval/perplexity")] == [0, EVAL_EVERY, STEPS]


def test_eval_examples_are_an_mlflow_table(story, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", story.uri)  # load_table searches runs with the global URI
    client = story.client
    tagged = json.loads(client.get_run(story.run_id).data.tags["mlflow.loggedArtifacts"])
    assert {"path": "eval_examples.json", "type": "table"} in tagged
    table = client.load_table(story.experiment_id, "eval_examples.json", run_ids=[story.run_id])
    assert list(table.columns[:6]) == ["stage", "step", "prompt", "reference", "prediction", "exact_match"]
    examples = story.summary["eval"]["after"]["examples"]
    after = table[table["stage"] == "after"]
    assert list(after["prediction"]) == [e["prediction"] for e in examples]
    assert list(after["reference"]) == [e["reference"] for e in examples]
    assert set(after["step"]) == {STEPS} and set(table[table["stage"] == "before"]["step"]) == {0}
    assert all(isinstance(p, str) and p for p in table["prompt"])


def test_training_and_eval_datasets_are_run_inputs(story):
    inputs = story.client.get_run(story.run_id).inputs.dataset_inputs
    by_context = {[t.value for t in i.tags if t.key == "mlflow.data.context"][0]: i.dataset for i in inputs}
    assert set(by_context) == {"training", "evaluation"}
    train, ev = by_context["training"], by_context["evaluation"]
    assert train.name == "builtin:tasks:train" and ev.name == "builtin:tasks:eval"
    assert train.source_type == "code" and json.loads(train.source)["num_rows"] == NUM_TRAIN
    assert len(train.digest) == 16 and train.digest != ev.digest
    assert (
        json.loads(train.profile)["fingerprint"]
        == story.client.get_run(story.run_id).data.tags["llama_train.dataset_fingerprint"]
    )


def test_every_source_kind_is_logged_with_source_and_digest(mlflow_server, tmp_path):
    """Built-in, local file and hub id sources, and an eval file: one input each."""
    import hashlib

    data = tmp_path / "chat.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n"
    )
    evals = tmp_path / "eval.jsonl"
    evals.write_text(data.read_text())
    recipe = recipe_from_dict(
        {
            "output_dir": str(tmp_path / "sources"),
            "train": {"max_steps": 1},
            "data": {
                "sources": [
                    {"path": "builtin:tasks"},
                    {"path": str(data), "weight": 2.0},
                    {"path": "org/some-chat-set", "split": "train_sft", "revision": "abc123"},
                ],
                "eval": {"path": str(evals)},
            },
            "tracking": {"uri": mlflow_server.uri, "experiment": "story-sources", "log_system_metrics": False},
        }
    )
    tracker = make_tracker(recipe, rank=0)
    run_id = tracker.start(params={}, tags={})
    tracker.log_datasets(dataset_records(recipe, fingerprint="f" * 16, num_train_rows=10, num_eval_rows=1))
    tracker.finish()
    from mlflow import MlflowClient

    inputs = MlflowClient(mlflow_server.uri).get_run(run_id).inputs.dataset_inputs
    got = {(i.dataset.name, i.dataset.source_type, i.tags[0].value): i.dataset for i in inputs}
    assert set(got) == {
        ("builtin:tasks:train", "code", "training"),
        ("chat.jsonl", "local", "training"),
        ("org/some-chat-set:train_sft", "hugging_face", "training"),
        ("eval.jsonl", "local", "evaluation"),
    }
    local = got[("chat.jsonl", "local", "training")]
    assert local.digest == hashlib.sha256(data.read_bytes()).hexdigest()[:16]
    assert json.loads(local.source) == {"uri": data.resolve().as_uri()}
    hub = json.loads(got[("org/some-chat-set:train_sft", "hugging_face", "training")].source)
    assert hub == {"path": "org/some-chat-set", "split": "train_sft", "revision": "abc123"}
    assert json.loads(local.profile)["weight"] == 2.0


def test_params_are_clean_values_of_what_shapes_training(story):
    import torch

    run = story.client.get_run(story.run_id)
    params = run.data.params
    assert not [k for k, v in params.items() if v in ("None", "null", "")]
    assert not [
        k for k in params if k.split(".")[0] in ("export", "gate", "k8s", "tracking", "checkpoint", "output_dir")
    ]
    assert "train.num_threads" not in params and "data.cache_dir" not in params
    for key in ("lora.target_modules", "data.sources", "train.betas", "data.builtin.tasks"):
        assert isinstance(json.loads(params[key]), list), key
    assert json.loads(params["data.sources"])[0]["path"] == "builtin:tasks"
    assert params["lora.enabled"] == "true" and params["train.lr"] == "0.003"
    assert params["train.effective_global_batch_size"] == str(MICRO)
    assert params["parallel.world_size"] == "1" and params["train.total_steps"] == str(STEPS)
    assert int(params["model.num_trainable_params"]) > 0
    assert int(params["model.num_total_params"]) > int(params["model.num_trainable_params"])
    assert params["version.torch"] == torch.__version__ and params["version.mlflow"]
    # the whole normalized recipe is still there, settings of every stage included
    (story.out / "dl").mkdir(exist_ok=True)
    path = story.client.download_artifacts(story.run_id, "recipe.yaml", str(story.out / "dl"))
    recipe = yaml.safe_load(Path(path).read_text())
    assert recipe["tracking"]["registered_model_name"] == MODEL_NAME and "gate" in recipe


def test_user_source_and_experiment_kind_tags(story):
    client = story.client
    tags = client.get_run(story.run_id).data.tags
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.name"] == str(story.recipe_path.resolve())
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["llama_train.command"].startswith("llama-train run ")
    assert client.get_experiment(story.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_model_version_has_a_description_and_one_tag_per_fact(story):
    client = story.client
    version = story.summary["registered_version"]
    mv = client.get_model_version(MODEL_NAME, version)
    before, after = story.summary["eval"]["before"], story.summary["eval"]["after"]
    sha = story.summary["recipe_sha256"]
    assert HUB_ID in mv.description and sha in mv.description
    assert f"{before['loss']:.4g} before → {after['loss']:.4g} after" in mv.description
    assert "exact_match" in mv.description
    expected = {
        "llama_train.base_model",
        "llama_train.recipe_sha256",
        "llama_train.dataset_fingerprint",
        *(f"eval_{stage}.{k}" for stage in ("before", "after") for k in ("loss", "perplexity", "exact_match")),
    }
    assert set(mv.tags) == expected, set(mv.tags) ^ expected  # no metric copies, no train/* noise
    assert mv.tags["llama_train.recipe_sha256"] == sha
    assert float(mv.tags["eval_before.loss"]) == pytest.approx(before["loss"], rel=1e-5)
    assert float(mv.tags["eval_after.exact_match"]) == pytest.approx(after["exact_match"])
    assert mv.tags["llama_train.base_model"] == HUB_ID
    # the registered adapter names its base by hub id, not the training machine's cache path
    from llama_train.tracking.registry import download_adapter

    local = download_adapter(f"models:/{MODEL_NAME}/{version}", dst=story.out / "registered", uri=story.uri)
    assert json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID


def test_epoch_and_end_of_training_summary_metrics(story):
    client, s = story.client, story.summary
    epochs = _history(client, story.run_id, "train/epoch")
    assert epochs == [(k, pytest.approx(k * MICRO / NUM_TRAIN)) for k in range(1, STEPS + 1)]
    metrics = client.get_run(story.run_id).data.metrics
    assert metrics["summary/train_runtime_s"] == pytest.approx(s["train_runtime_s"])
    assert metrics["summary/total_tokens"] == s["consumed_tokens"] > 0
    assert metrics["summary/supervised_tokens"] == s["supervised_tokens_total"] > 0
    assert metrics["summary/eval_loss_change"] == pytest.approx(
        s["eval"]["after"]["loss"] - s["eval"]["before"]["loss"]
    )
    assert [st for st, _ in _history(client, story.run_id, "summary/total_tokens")] == [STEPS]


def test_system_metrics_are_in_metrics_jsonl_and_on_the_server(story):
    rows = [json.loads(x) for x in (story.out / "metrics.jsonl").read_text().splitlines()]
    cpu = [
        (r["step"], r["metrics"]["system/cpu_utilization_percentage"])
        for r in rows
        if "system/cpu_utilization_percentage" in r["metrics"]
    ]
    mem = [r["step"] for r in rows if "system/process_rss_megabytes" in r["metrics"]]
    assert len(mem) >= 2 and mem == sorted(set(mem)), mem  # at start, every second, at the end
    assert cpu and max(v for _, v in cpu) > 0, cpu  # measured over an interval, not psutil's first 0.0
    server = [s for s, _ in _history(story.client, story.run_id, "system/process_rss_megabytes")]
    assert server == mem


def test_offline_run_synced_later_keeps_its_times_and_says_how(mlflow_server, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = tmp_path / "offline"
    recipe = recipe_from_dict(
        {
            "output_dir": str(out),
            "train": {"max_steps": 3},
            "tracking": {"uri": dead, "experiment": "story-offline", "log_system_metrics": False},
        }
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = make_tracker(recipe, rank=0)  # preempted after step 2, resumed (still offline)
        assert first.start(params={}, tags={}) is None
        for step in (1, 2):
            first.log_metrics({"train/loss": 1.0 / step}, step=step)
        first.finish("KILLED")
        started = json.loads((out / STATE_FILE).read_text())["start_time_ms"]
        tracker = make_tracker(recipe, rank=0)
        assert tracker.start(params={}, tags={}, resume_run_id=None) is None
        tracker.log_metrics({"train/loss": 1.0 / 3}, step=3)
        tracker.finish()
    last = str(caught[-1].message)
    assert f"llama-train track sync {out}" in last and "retrying in" not in last, last
    state = json.loads((out / STATE_FILE).read_text())
    assert state["start_time_ms"] == started  # the resumed attempt keeps when training started
    time.sleep(2.0)  # the sync happens measurably later than the run
    sync_ms = time.time() * 1000
    summary = sync_run(out, uri=mlflow_server.uri)
    from mlflow import MlflowClient

    info = MlflowClient(mlflow_server.uri).get_run(summary["run_id"]).info
    assert info.status == "FINISHED"
    assert info.start_time == state["start_time_ms"] and info.end_time == state["end_time_ms"]
    assert info.end_time < sync_ms - 1500  # when the run ended, not when it was synced
    assert _history(MlflowClient(mlflow_server.uri), summary["run_id"], "train/loss") == [
        (1, 1.0),
        (2, 0.5),
        (3, pytest.approx(1 / 3)),
    ]


def test_mlflow_ui_shows_dataset_eval_chart_and_version_description(story, tmp_path):
    """Headless Chromium reads the MLflow UI's pages of the run and of its model version."""
    if browser.chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; CI: scripts/ci_system_deps.sh)")
    base = story.uri.rstrip("/")
    run_page = f"{base}/#/experiments/{story.experiment_id}/runs/{story.run_id}?workflowType=machine_learning"
    charts_page = f"{base}/#/experiments/{story.experiment_id}/runs/{story.run_id}/model-metrics"
    version_page = f"{base}/#/models/{MODEL_NAME}/versions/{story.summary['registered_version']}"
    pages = {"run": run_page, "charts": charts_page, "version": version_page}
    try:
        overview = browser.page_text(browser.dump_dom(run_page))
        assert any(line.startswith("builtin:tasks:train (") for line in overview), overview[:200]
        about = overview[overview.index("About this run") :]
        assert about[about.index("Created by") + 1] == getpass.getuser()
        assert about[about.index("Source") + 1] == story.recipe_path.name  # the UI shows the file name
        for budget_ms in (60000, 120000):  # the charts load lazily, after the page
            charts = browser.dump_dom(charts_page, budget_ms=budget_ms)
            if browser.chart_points(charts, "eval/loss"):
                break
        assert browser.chart_points(charts, "eval/loss") == 3  # steps 0, 3 and 6
        assert browser.chart_points(charts, "eval/exact_match") == 2
        version = " ".join(browser.page_text(browser.dump_dom(version_page)))
        assert "LoRA adapter trained by llama-train run" in version
        assert story.summary["recipe_sha256"] in version and "before →" in version
    except AssertionError:
        shots = [browser.screenshot(url, tmp_path / f"{name}.png") for name, url in pages.items()]
        keep = os.environ.get("LLAMA_TRAIN_TEST_ARTIFACTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shots = [Path(shutil.copy(s, Path(keep) / s.name)) for s in shots if s]
        print("screenshots of the MLflow UI:", *[str(s) for s in shots if s], sep="\n  ")
        raise
