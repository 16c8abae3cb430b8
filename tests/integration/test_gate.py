"""The validation gate on the quickstart adapter: a good adapter passes and is promoted; broken,
regressed, unservable and tampered adapters fail with the right reason and move no alias."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from llama_train.export import export_run
from llama_train.gate import run_gate
from llama_train.tracking.registry import get_alias_version

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
NAME = "quickstart-gate"


@pytest.fixture(scope="module")
def gate_env(quickstart_run, tmp_path_factory):
    """A smaller eval set for speed, a fresh local registry, and the good export."""
    tmp = tmp_path_factory.mktemp("gate")
    recipe = yaml.safe_load((quickstart_run / "recipe.yaml").read_text())
    recipe["data"]["eval"]["max_samples"] = 48
    recipe["tracking"]["registered_model_name"] = NAME
    recipe["tracking"]["uri"] = f"sqlite:///{tmp}/registry.db"
    recipe_path = tmp / "gate_recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    good = tmp / "good"
    export_run(quickstart_run, good, formats=["adapter"])
    return {
        "tmp": tmp,
        "recipe": str(recipe_path),
        "uri": recipe["tracking"]["uri"],
        "good": good,
        "run": quickstart_run,
    }


def _gate(env, candidate, **kw):
    return run_gate(str(candidate), recipe_path=env["recipe"], tracking_uri=env["uri"], **kw)


def _status(report):
    return {c.name: c.status for c in report.checks}


def _variant(env, name, mutate, **export_kw) -> Path:
    """Copy the quickstart run's adapter, mutate it, and export it (so its manifest is consistent)."""
    src = env["tmp"] / f"run_{name}"
    (src / "adapter").mkdir(parents=True)
    adapter = env["run"] / "adapter"
    for f in adapter.iterdir():
        (src / "adapter" / f.name).write_bytes(f.read_bytes())
    for f in ("run.json", "recipe.yaml"):
        (src / f).write_bytes((env["run"] / f).read_bytes())
    mutate(src / "adapter")
    out = env["tmp"] / f"export_{name}"
    export_run(src, out, formats=["adapter"], **export_kw)
    return out


def _aliases(env):
    return {a: get_alias_version(NAME, a, uri=env["uri"]) for a in ("champion", "previous")}


@pytest.fixture(scope="module")
def promoted(gate_env):
    """The good adapter passes every check and becomes champion."""
    report = _gate(gate_env, gate_env["good"], promote=True)
    assert report.passed, report.to_markdown()
    return report


def test_good_adapter_passes_and_is_promoted(gate_env, promoted):
    assert _status(promoted) == {s: "passed" for s in ("format", "load", "quality", "behaviour", "serving")}
    assert _aliases(gate_env)["champion"] == promoted.model_version
    figs = promoted.figures
    assert figs["candidate"]["exact_match"] >= figs["base"]["exact_match"] + 0.05
    md = (gate_env["good"] / "gate_report.md").read_text()
    assert "PASSED" in md and "| candidate |" in md and "| base |" in md
    assert json.loads((gate_env["good"] / "gate_report.json").read_text())["passed"] is True


def test_promoted_export_carries_its_manifest_so_a_server_can_verify_it(gate_env, promoted, tmp_path):
    from llama_train.tracking.client import mlflow_client
    from llama_train.tracking.registry import fetch_verified

    client = mlflow_client(gate_env["uri"])
    local, verified = fetch_verified(NAME, promoted.model_version, tmp_path / "dl", client=client)
    assert verified is True
    assert sorted(p.name for p in local.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_second_candidate_is_compared_with_champion_and_moves_previous(gate_env, promoted):
    again = gate_env["tmp"] / "good_again"
    export_run(gate_env["run"], again, formats=["adapter"])
    report = _gate(gate_env, again, promote=True, serving=False)
    assert report.passed, report.to_markdown()
    assert "champion" in report.figures  # candidate vs base vs champion
    assert "| champion |" in report.to_markdown()
    assert _aliases(gate_env) == {"champion": report.model_version, "previous": promoted.model_version}


def _shape_mismatch(adapter: Path):
    w = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in w if "lora_A" in k)
    w[key] = w[key][:-1].contiguous()  # rank r-1 where the config says r
    save_file(w, str(adapter / "adapter_model.safetensors"))


def _nan(adapter: Path):
    w = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in w if "lora_B" in k)
    w[key][0, 0] = float("nan")
    save_file(w, str(adapter / "adapter_model.safetensors"))


def _dora(adapter: Path):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "name, mutate, stage, needle",
    [
        ("shape", _shape_mismatch, "load", "could not load"),
        ("nan", _nan, "load", "non-finite"),
        ("dora", _dora, "format", "DoRA"),
    ],
)
def test_broken_adapters_fail_at_the_right_check(gate_env, promoted, name, mutate, stage, needle):
    before = _aliases(gate_env)
    candidate = _variant(gate_env, name, mutate, allow_incompatible=True)
    report = _gate(gate_env, candidate, promote=True)
    status = _status(report)
    assert not report.passed and status[stage] == "failed"
    failed = next(c for c in report.checks if c.status == "failed")
    assert failed.name == stage and needle.lower() in failed.message.lower(), failed.message
    later = list(status)[list(status).index(stage) + 1 :]
    assert all(status[s] == "skipped" for s in later)
    assert _aliases(gate_env) == before and report.promoted is None


def test_tampered_file_fails_format_with_cli_exit_code(gate_env, promoted):
    before = _aliases(gate_env)
    candidate = gate_env["tmp"] / "tampered"
    export_run(gate_env["run"], candidate, formats=["adapter"])
    cfg = candidate / "adapter" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"r": 16', '"r":  16'))  # same meaning, other bytes
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama_train.cli",
            "gate",
            str(candidate),
            "--recipe",
            gate_env["recipe"],
            "--tracking-uri",
            gate_env["uri"],
            "--promote",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 10, res.stderr
    report = json.loads(res.stdout)
    fmt = next(c for c in report["checks"] if c["name"] == "format")
    assert fmt["status"] == "failed" and "sha256 mismatch" in fmt["message"]
    assert "adapter/adapter_config.json" in fmt["message"]
    assert _aliases(gate_env) == before


def test_regressed_adapter_trained_on_shuffled_answers_fails_quality(gate_env, promoted):
    from llama_train.data.builtin import generate_splits, write_jsonl

    train, _ = generate_splits(num_train=1500, num_eval=96, seed=0)
    answers = [r["messages"][1]["content"] for r in train]
    random.Random(0).shuffle(answers)
    for r, a in zip(train, answers):
        r["messages"][1]["content"] = a
    data = write_jsonl(train, gate_env["tmp"] / "shuffled.jsonl")
    out = gate_env["tmp"] / "shuffled_run"
    run = json.loads((gate_env["run"] / "run.json").read_text())
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama_train.cli",
            "run",
            "recipes/quickstart.yaml",
            f"output_dir={out}",
            f"model.path={run['base_model']}",
            f"data.sources=[{{path: {data}, format: messages}}]",
            "data.eval.fraction=0.02",
            "data.eval.max_samples=8",
            "train.max_steps=60",
            "checkpoint.every_n_steps=0",
            "checkpoint.save_final=false",
            "tracking.enabled=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    before = _aliases(gate_env)
    candidate = gate_env["tmp"] / "export_shuffled"
    export_run(out, candidate, formats=["adapter"])
    report = _gate(gate_env, candidate, promote=True)
    quality = next(c for c in report.checks if c.name == "quality")
    assert not report.passed and quality.status == "failed"
    assert "does not beat the base" in quality.message or "regresses the champion" in quality.message
    assert report.figures["candidate"]["exact_match"] < report.figures["champion"]["exact_match"]
    assert _aliases(gate_env) == before


def _truncate_weights(export: Path):
    f = export / "adapter" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:200])


def _break_json(rel):
    return lambda export: (export / rel).write_text('{"r": ')


@pytest.mark.parametrize(
    "name, corrupt, needle",
    [
        ("truncated", _truncate_weights, "cannot be read as safetensors"),
        ("bad_config", _break_json("adapter/adapter_config.json"), "adapter_config.json is not valid JSON"),
        ("bad_manifest", _break_json("manifest.json"), "manifest.json is unreadable"),
    ],
)
def test_unreadable_files_fail_the_format_check_with_a_report(gate_env, name, corrupt, needle):
    import shutil

    candidate = gate_env["tmp"] / f"corrupt_{name}"
    shutil.copytree(gate_env["good"], candidate)
    for f in ("gate_report.json", "gate_report.md"):
        (candidate / f).unlink(missing_ok=True)
    corrupt(candidate)
    # no --recipe for the broken manifest: it names the run, so the gate must still report on it
    kw = {} if name == "bad_manifest" else {"recipe_path": gate_env["recipe"]}
    report = run_gate(str(candidate), tracking_uri=gate_env["uri"], serving=False, **kw)
    fmt = report.checks[0]
    assert not report.passed and fmt.name == "format" and fmt.status == "failed"
    assert needle in fmt.message, fmt.message
    assert json.loads((candidate / "gate_report.json").read_text())["passed"] is False


def test_usage_errors_stop_the_gate_before_any_check(gate_env, tmp_path, monkeypatch):
    from llama_train import gate as gate_mod
    from llama_train.errors import GateError

    def no_checks(*a, **k):
        raise AssertionError("a check ran before the usage error was reported")

    monkeypatch.setattr(gate_mod, "check_format", no_checks)
    with pytest.raises(GateError, match=r"models:/quickstart-gate/999: version 999 does not exist") as exc:
        _gate(gate_env, f"models:/{NAME}/999")
    assert exc.value.exit_code == 9
    (tmp_path / "file").write_text("x")
    with pytest.raises(GateError, match="--report-dir .* is an existing file"):
        _gate(gate_env, gate_env["good"], report_dir=tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    recipe = yaml.safe_load(Path(gate_env["recipe"]).read_text())
    recipe["tracking"]["registered_model_name"] = None
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(GateError, match="--promote needs a registered model"):
        run_gate(
            str(gate_env["good"]),
            recipe_path=str(tmp_path / "r.yaml"),
            tracking_uri=gate_env["uri"],
            promote=True,
            report_dir=tmp_path / "reports",
        )
