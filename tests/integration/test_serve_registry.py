"""From the gate to what is served, against a real `mlflow server` and the real server process:
`--adapter support=models:/NAME@champion` follows the alias through promotion, rollback, a
tampered version (refused) and a registry outage, with requests running all along; vLLM's
load/unload_lora_adapter with the openai client; a live canary split.

Each served adapter's greedy output is compared with the same export served directly
(`--adapter directA=DIR`), so "the new adapter's output" is checked, not assumed."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from llama_train.export import export_run
from llama_train.tracking.registry import get_alias_version, promote, register_export
from tests.integration.conftest import start_server

try:
    from mlflow_fixtures import mlflow_server  # noqa: F401  (pytest fixture)
except ImportError:  # imported as a package module
    from .mlflow_fixtures import mlflow_server  # noqa: F401

pytestmark = pytest.mark.slow
NAME = "support-lora"
POLL_S = 0.5
PROMPT = [{"role": "user", "content": "Say something about the weather."}]


def _random_adapter(base: Path, out: Path, seed: int) -> Path:
    """An export (adapter/ + manifest.json) of a random LoRA whose greedy output differs from the base's."""
    from llama_train.tiny import build_random_lora

    build_random_lora(base, out / "run" / "adapter", seed=seed)
    export_run(out / "run", out / "export", formats=["adapter"])
    return out / "export"


@pytest.fixture(scope="module")
def env(tiny_model_dir, mlflow_server, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("serve_registry")
    exports = {k: _random_adapter(tiny_model_dir, tmp / k, seed) for k, seed in (("A", 11), ("B", 12), ("C", 13))}
    uri = mlflow_server.uri
    v1 = register_export(exports["A"] / "adapter", name=NAME, uri=uri, experiment="serve-registry")
    promote(NAME, v1, uri=uri)
    server = start_server(
        [
            "--base",
            str(tiny_model_dir),
            "--served-model-name",
            "tiny-base",
            "--adapter",
            f"support=models:/{NAME}@champion",
            "--adapter",
            f"directA={exports['A'] / 'adapter'}",
            "--adapter",
            f"directB={exports['B'] / 'adapter'}",
            "--adapter",
            f"directC={exports['C'] / 'adapter'}",
            "--registry-poll-s",
            str(POLL_S),
            "--json-logs",
            "--max-concurrency",
            "16",
        ],
        tmp,
        env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"},
    )
    try:
        client = server.client()
        out = {k: _say(client, f"direct{k}") for k in "ABC"}
        assert len(set(out.values())) == 3, f"the random adapters must answer differently: {out}"
        yield {
            "server": server,
            "client": client,
            "uri": uri,
            "exports": exports,
            "out": out,
            "mlflow": mlflow_server,
            "v1": v1,
            "tmp": tmp,
        }
    finally:
        server.stop()


def _say(client, model: str) -> str:
    r = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=8, temperature=0)
    return r.choices[0].message.content


class Traffic:
    """Clients sending requests to `support` continuously; every failure is kept."""

    def __init__(self, client, num_threads: int = 3):
        self.client, self.results, self.errors = client, [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(num_threads)]

    def _loop(self):
        while not self.stop.is_set():
            try:
                self.results.append((time.monotonic(), _say(self.client, "support")))
            except Exception as exc:  # noqa: BLE001  (what we count)
                self.errors.append(repr(exc))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)


def _wait_for_output(env, expected: str, timeout_s: float = 60) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _say(env["client"], "support") == expected:
            return time.monotonic()
        time.sleep(0.2)
    raise AssertionError(f"support never answered {expected!r}; log:\n{env['server'].log()[-3000:]}")


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # exposition order
    m = re.search(rf"^{name}{{{re.escape(want)}}} (\S+)$" if labels else rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _card(env, model: str) -> dict:
    return next(
        c
        for c in httpx.get(
            f"{env['server'].v1}/models", timeout=10, headers={"Authorization": f"Bearer {env['server'].api_key}"}
        ).json()["data"]
        if c["id"] == model
    )


def test_started_on_the_champion_with_its_registry_version_listed(env):
    assert _say(env["client"], "support") == env["out"]["A"]
    card = _card(env, "support")
    assert card["root"] == f"models:/{NAME}@champion"
    assert card["registry"] == {"registry_name": NAME, "version": env["v1"], "alias": "champion", "verified": True}


def test_promotion_under_load_switches_without_a_failed_request(env):
    v2 = register_export(env["exports"]["B"] / "adapter", name=NAME, uri=env["uri"], experiment="serve-registry")
    with Traffic(env["client"]) as traffic:
        time.sleep(1)
        promoted_at = time.monotonic()
        promote(NAME, v2, uri=env["uri"])
        switched_at = _wait_for_output(env, env["out"]["B"], timeout_s=30)
        time.sleep(1)
    assert traffic.errors == []
    outputs = [o for _, o in traffic.results]
    assert set(outputs) <= {env["out"]["A"], env["out"]["B"]}
    assert env["out"]["A"] in outputs and outputs[-1] == env["out"]["B"]
    assert switched_at - promoted_at < 15
    assert _card(env, "support")["registry"]["version"] == v2
    metrics = env["server"].metrics()
    assert _metric(metrics, "llama_train_adapter_switches_total", model="support", result="switched") == 1
    assert (
        _metric(metrics, "llama_train_adapter_info", model="support", role="main", version=v2, registry_name=NAME) == 1
    )
    env["v2"] = v2


def test_rollback_cli_under_load_returns_to_the_previous_version(env):
    assert get_alias_version(NAME, "previous", uri=env["uri"]) == env["v1"]
    with Traffic(env["client"]) as traffic:
        time.sleep(1)
        done = subprocess.run(
            [sys.executable, "-m", "llama_train.cli", "registry", "rollback", NAME, "--tracking-uri", env["uri"]],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        _wait_for_output(env, env["out"]["A"], timeout_s=30)
        time.sleep(1)
    assert traffic.errors == []
    assert f"champion is version {env['v1']} again (was {env['v2']})" in done.stdout
    assert traffic.results[-1][1] == env["out"]["A"]
    assert _card(env, "support")["registry"]["version"] == env["v1"]
    # previous is gone: a second rollback cannot re-promote the version just rolled back
    again = subprocess.run(
        [sys.executable, "-m", "llama_train.cli", "registry", "rollback", NAME, "--tracking-uri", env["uri"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1 and "has no `previous` alias" in again.stderr
    assert get_alias_version(NAME, "champion", uri=env["uri"]) == env["v1"]


def test_tampered_version_is_refused_and_the_old_one_keeps_serving(env):
    from mlflow import MlflowClient

    v3 = register_export(env["exports"]["C"] / "adapter", name=NAME, uri=env["uri"], experiment="serve-registry")
    run_id = MlflowClient(env["uri"]).get_model_version(NAME, v3).run_id
    stored = [p for p in env["mlflow"].artifacts.rglob("adapter_model.safetensors") if run_id in p.parts]
    assert len(stored) == 1, stored
    data = bytearray(stored[0].read_bytes())
    data[-1] ^= 0xFF  # one weight byte: still a loadable file, no longer the exported one
    stored[0].write_bytes(bytes(data))
    with Traffic(env["client"]) as traffic:
        promote(NAME, v3, uri=env["uri"])
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and _metric(env["server"].metrics(), "llama_train_adapter_switches_total", model="support", result="failed")
            < 1
        ):
            time.sleep(0.3)
        time.sleep(3 * POLL_S)  # refused once, not retried every poll
    assert traffic.errors == []
    assert {o for _, o in traffic.results} == {env["out"]["A"]}
    assert _metric(env["server"].metrics(), "llama_train_adapter_switches_total", model="support", result="failed") == 1
    assert "sha256 mismatch" in env["server"].log() and "adapter_model.safetensors" in env["server"].log()
    assert _card(env, "support")["registry"]["version"] == env["v1"]
    env["v3"] = v3


def test_registry_outage_keeps_serving_and_the_switch_happens_when_it_is_back(env):
    server, mlflow = env["server"], env["mlflow"]
    errors_before = _metric(server.metrics(), "llama_train_registry_poll_errors_total")
    mlflow.kill()
    try:
        with Traffic(env["client"]) as traffic:
            deadline = time.monotonic() + 30
            while _metric(server.metrics(), "llama_train_registry_poll_errors_total") < errors_before + 2:
                assert time.monotonic() < deadline, server.log()[-3000:]
                time.sleep(0.3)
        assert traffic.errors == [] and len(traffic.results) > 3
        assert {o for _, o in traffic.results} == {env["out"]["A"]}
    finally:
        mlflow.start()
    promote(NAME, env["v2"], uri=env["uri"])
    _wait_for_output(env, env["out"]["B"], timeout_s=60)
    assert "registry unreachable" in server.log() and "registry reachable again" in server.log()


def test_load_and_unload_lora_adapter_with_vllm_request_shapes(env):
    client, server = env["client"], env["server"]
    raw = {"cast_to": httpx.Response}
    r = client.post(
        "/load_lora_adapter", body={"lora_name": "extra", "lora_path": str(env["exports"]["C"] / "adapter")}, **raw
    )
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'extra' added successfully."
    assert "extra" in [m.id for m in client.models.list().data]
    assert _say(client, "extra") == env["out"]["C"]
    with pytest.raises(openai.BadRequestError, match="has already been loaded"):
        client.post("/load_lora_adapter", body={"lora_name": "extra", "lora_path": "/nowhere"}, **raw)
    with pytest.raises(openai.BadRequestError, match="lora_path /nowhere: no such directory"):
        client.post("/load_lora_adapter", body={"lora_name": "other", "lora_path": "/nowhere"}, **raw)
    with pytest.raises(openai.BadRequestError, match="lora_path"):
        client.post("/load_lora_adapter", body={"lora_name": "other"}, **raw)
    # in place, from the registry by version: pinned (not followed), listed with its version
    r = client.post(
        "/load_lora_adapter",
        body={"lora_name": "extra", "lora_path": f"models:/{NAME}/{env['v2']}", "load_inplace": True},
        **raw,
    )
    assert r.status_code == 200
    assert _say(client, "extra") == env["out"]["B"]
    assert _card(env, "extra")["registry"] == {
        "registry_name": NAME,
        "version": env["v2"],
        "alias": None,
        "verified": True,
    }
    with pytest.raises(openai.BadRequestError, match="does not match its export manifest"):
        client.post("/load_lora_adapter", body={"lora_name": "bad", "lora_path": f"models:/{NAME}/{env['v3']}"}, **raw)
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").post(
            "/load_lora_adapter", body={"lora_name": "x", "lora_path": "/nowhere"}, **raw
        )
    r = client.post("/unload_lora_adapter", body={"lora_name": "extra"}, **raw)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'extra' removed successfully."
    assert "extra" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError, match="cannot be found"):
        client.post("/unload_lora_adapter", body={"lora_name": "extra"}, **raw)
    with pytest.raises(openai.NotFoundError):
        _say(client, "extra")


def test_canary_serves_the_candidate_to_its_fraction_live(env):
    client = env["client"]
    promote(NAME, env["v2"], uri=env["uri"])  # champion B (no-op if it is already)
    from mlflow import MlflowClient

    MlflowClient(env["uri"]).set_registered_model_alias(NAME, "candidate", env["v1"])  # A as the canary
    _wait_for_output(env, env["out"]["B"])
    r = client.post(
        "/load_lora_adapter",
        body={"lora_name": "support", "lora_path": f"models:/{NAME}@candidate", "canary_fraction": 0.25},
        cast_to=httpx.Response,
    )
    assert r.status_code == 200
    assert _card(env, "support")["canary"] == {
        "registry_name": NAME,
        "version": env["v1"],
        "alias": "candidate",
        "verified": True,
        "fraction": 0.25,
    }
    before = {
        v: _metric(env["server"].metrics(), "llama_train_adapter_requests_total", model="support", version=v)
        for v in (env["v1"], env["v2"])
    }
    outputs = [_say(client, "support") for _ in range(200)]
    num_canary = outputs.count(env["out"]["A"])
    assert outputs.count(env["out"]["B"]) + num_canary == 200
    assert 0.25 - 0.1 < num_canary / 200 < 0.25 + 0.1  # ~3 standard deviations of 200 draws
    metrics = env["server"].metrics()
    assert (
        _metric(metrics, "llama_train_adapter_requests_total", model="support", version=env["v1"]) - before[env["v1"]]
        == num_canary
    )
    assert (
        _metric(
            metrics, "llama_train_adapter_info", model="support", role="canary", version=env["v1"], registry_name=NAME
        )
        == 1
    )
    r = client.post("/unload_lora_adapter", body={"lora_name": "support", "canary_only": True}, cast_to=httpx.Response)
    assert r.status_code == 200
    assert {_say(client, "support") for _ in range(20)} == {env["out"]["B"]}


def _sync(env, *args, extra_env=None):
    import os

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "llama_train.cli",
            "registry",
            "sync",
            f"models:/{NAME}@champion",
            "--tracking-uri",
            env["uri"],
            "--once",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(extra_env or {})},
    )


def test_registry_sync_sidecar_loads_the_champion_through_vllms_endpoint(env):
    """The vLLM sidecar's path, against this server's vLLM-compatible load_lora_adapter."""
    promote(NAME, env["v2"], uri=env["uri"])  # whatever the tests before left (tampered v3 included)
    champion = env["v2"]
    expected = env["out"]["B"]
    server = env["server"]
    done = _sync(
        env,
        "--dir",
        str(env["tmp"] / "vllm-adapters"),
        "--lora-name",
        "synced",
        "--vllm-url",
        server.base_url,
        extra_env={"VLLM_API_KEY": server.api_key},
    )
    assert done.returncode == 0, done.stderr
    assert (env["tmp"] / "vllm-adapters" / f"synced-v{champion}" / "adapter_model.safetensors").is_file()
    # a restarted vLLM loads --lora-modules synced=DIR/synced: the same version (from review)
    restart = env["tmp"] / "vllm-adapters" / "synced" / "adapter_model.safetensors"
    assert (
        restart.read_bytes()
        == (env["tmp"] / "vllm-adapters" / f"synced-v{champion}" / "adapter_model.safetensors").read_bytes()
    )
    assert _say(env["client"], "synced") == expected
    wrong_key = _sync(
        env,
        "--dir",
        str(env["tmp"] / "vllm2"),
        "--lora-name",
        "synced2",
        "--vllm-url",
        server.base_url,
        extra_env={"VLLM_API_KEY": "wrong"},
    )
    assert wrong_key.returncode == 1 and "answered 401" in wrong_key.stderr


def test_registry_sync_writes_the_nim_layout_and_refuses_a_tampered_version(env):
    from mlflow import MlflowClient

    MlflowClient(env["uri"]).set_registered_model_alias(NAME, "champion", env["v2"])
    nim = env["tmp"] / "nim-adapters"
    done = _sync(env, "--dir", str(nim), "--lora-name", "support")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (nim / "support").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    MlflowClient(env["uri"]).set_registered_model_alias(NAME, "champion", env["v3"])  # the tampered one
    try:
        refused = _sync(env, "--dir", str(nim / "other"), "--lora-name", "support")
    finally:
        MlflowClient(env["uri"]).set_registered_model_alias(NAME, "champion", env["v2"])
    assert refused.returncode == 1 and "does not match its export manifest" in refused.stderr
    assert not (nim / "other" / "support").exists()


def test_canary_flag_at_start(env, tiny_model_dir):
    from mlflow import MlflowClient

    MlflowClient(env["uri"]).set_registered_model_alias(NAME, "candidate", env["v1"])
    assert get_alias_version(NAME, "champion", uri=env["uri"]) == env["v2"]
    server = start_server(
        [
            "--base",
            str(tiny_model_dir),
            "--served-model-name",
            "tiny-base",
            "--adapter",
            f"support=models:/{NAME}@champion",
            "--canary",
            f"support=models:/{NAME}@candidate:0.3",
            "--registry-poll-s",
            str(POLL_S),
        ],
        env["tmp"],
        env={"MLFLOW_TRACKING_URI": env["uri"]},
    )
    try:
        client = server.client()
        deadline = time.monotonic() + 30
        while "canary" not in (
            card := next(c for c in client.models.list().model_dump()["data"] if c["id"] == "support")
        ):
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.2)
        assert card["canary"]["version"] == env["v1"] and card["canary"]["fraction"] == 0.3
        outputs = [_say(client, "support") for _ in range(200)]
        assert set(outputs) == {env["out"]["A"], env["out"]["B"]}
        assert 0.3 - 0.1 < outputs.count(env["out"]["A"]) / 200 < 0.3 + 0.1
    finally:
        server.stop()
