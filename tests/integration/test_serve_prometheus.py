"""The server's /metrics with real Prometheus tools (Debian package `prometheus`, installed by
scripts/ci_system_deps.sh): `promtool check metrics` lints the exposition, `promtool check rules`
the alert rules, and a real Prometheus (2 s scrapes, 127.0.0.1 only) scraping a loaded server
answers every Grafana dashboard query with the expected values, including an error ratio that
sees one burst of errors between two scrapes (status series exist at 0 from the start)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import ADAPTER_NAME, BASE_NAME, free_port, start_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROMTOOL, PROMETHEUS = shutil.which("promtool"), shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMTOOL is None or PROMETHEUS is None,
    reason="promtool/prometheus not on PATH: `bash scripts/ci_system_deps.sh` installs Debian's prometheus",
)
SCRAPE_S = 2
MSGS = [{"role": "user", "content": "Reverse the word banana"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapter_dir, tmp_path_factory):
    srv = start_server(
        [
            "--base",
            str(tiny_model_dir),
            "--served-model-name",
            BASE_NAME,
            "--adapter",
            f"{ADAPTER_NAME}={tiny_adapter_dir}",
            "--max-concurrency",
            "8",
        ],
        tmp_path_factory.mktemp("prom_server"),
    )
    yield srv
    srv.stop()


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


@needs_prometheus
def test_exposition_passes_promtool_and_has_every_series_before_traffic(server):
    text = server.metrics()
    proc = subprocess.run(
        [PROMTOOL, "check", "metrics"], check=False, input=text, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = samples(text)
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/models"):
        for status in ("200", "400", "404", "429", "500", "503", "504"):
            assert f'llama_train_requests_total{{route="{route}",status="{status}"}}' in s
    for model in (BASE_NAME, ADAPTER_NAME):
        for name in (
            "llama_train_num_requests_running",
            "llama_train_num_requests_waiting",
            "llama_train_generation_tokens_total",
            "llama_train_prompt_tokens_total",
            "llama_train_time_to_first_token_seconds_count",
            "llama_train_inter_token_latency_seconds_count",
            "llama_train_request_queue_time_seconds_count",
            "llama_train_e2e_request_latency_seconds_count",
        ):
            assert f'{name}{{model="{model}"}}' in s, name
        for reason in ("stop", "length", "abort", "error"):
            assert f'llama_train_requests_finished_total{{finish_reason="{reason}",model="{model}"}}' in s
    assert s["process_cpu_seconds_total"] > 0 and s["process_resident_memory_bytes"] > 0
    assert any(k.startswith("llama_train_build_info{") and v == 1 for k, v in s.items())
    assert not any('route="/metrics"' in k or 'route="/health"' in k or 'route="/ready"' in k for k in s)


@needs_prometheus
def test_generation_tokens_are_counted_while_a_request_runs(server):
    """Per decode step, not at request end: a long stream shows up before it finishes."""
    name = f'llama_train_generation_tokens_total{{model="{BASE_NAME}"}}'
    before = samples(server.metrics())[name]
    body = {
        "model": BASE_NAME,
        "prompt": "The quick brown",
        "max_tokens": 600,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream(
        "POST",
        f"{server.v1}/completions",
        json=body,
        timeout=120,
        headers={"authorization": f"Bearer {server.api_key}"},
    ) as r:
        lines = r.iter_lines()
        for _ in range(20):  # 20 chunks in
            next(lines)
        mid = samples(server.metrics())
        assert mid[f'llama_train_num_requests_running{{model="{BASE_NAME}"}}'] == 1
        assert 0 < mid[name] - before < 600
        assert samples(server.metrics())["llama_train_inflight_requests"] == 1


def load(server, stop: threading.Event, counts: dict) -> None:
    """Well-formed traffic on both models, streaming and not, until stopped."""
    c = server.client()
    i = 0
    while not stop.is_set():
        model = (BASE_NAME, ADAPTER_NAME)[i % 2]
        if i % 3 == 0:
            list(c.chat.completions.create(model=model, messages=MSGS, max_tokens=8, stream=True))
        else:
            c.chat.completions.create(model=model, messages=MSGS, max_tokens=8)
        counts[model] = counts.get(model, 0) + 1
        i += 1


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads((ROOT / "k8s/monitoring/grafana-dashboard.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$namespace", "llama-train").replace("$model", ".*").replace("$__rate_interval", "20s")


@needs_prometheus
def test_real_prometheus_answers_every_dashboard_query(server, tmp_path):
    rules = yaml.safe_load((ROOT / "k8s/monitoring/prometheus-rules.yaml").read_text())
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rules["spec"]["groups"]}))
    check = subprocess.run([PROMTOOL, "check", "rules", str(rules_file)], check=False, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
                "rule_files": [str(rules_file)],
                "scrape_configs": [
                    {
                        "job_name": "llama-train",
                        "static_configs": [
                            {
                                "targets": [f"127.0.0.1:{server.port}"],
                                "labels": {"namespace": "llama-train", "pod": "server-0"},
                            }
                        ],
                    }
                ],
            }
        )
    )
    prom = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prom.log").open("w"),
    )
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr: str) -> list[dict]:
        r = httpx.get(f"{api}/query", params={"query": expr}, timeout=30).json()
        assert r["status"] == "success", (expr, r)
        return r["data"]["result"]

    def values(expr: str) -> dict[str, float]:
        return {json.dumps(x["metric"], sort_keys=True): float(x["value"][1]) for x in query(expr)}

    def scraped_at_least(n: int) -> None:
        deadline = time.monotonic() + 60
        while True:
            up = query('count_over_time(up{job="llama-train"}[5m])')
            if up and float(up[0]["value"][1]) >= n:
                return
            assert time.monotonic() < deadline, (tmp_path / "prom.log").read_text()[-2000:]
            time.sleep(0.5)

    stop, counts = threading.Event(), {}
    loader = threading.Thread(target=load, args=(server, stop, counts))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.3)
        scraped_at_least(2)  # the status series are seen at 0 first
        loader.start()
        time.sleep(4 * SCRAPE_S)
        # one burst of client errors, all between two scrapes
        headers = {"authorization": f"Bearer {server.api_key}"}
        burst = [
            httpx.post(
                f"{server.v1}/chat/completions",
                json={"model": BASE_NAME, "messages": MSGS, "temperature": 9},
                headers=headers,
            )
            for _ in range(5)
        ]
        assert [r.status_code for r in burst] == [400] * 5
        time.sleep(4 * SCRAPE_S)
        stop.set()
        loader.join(120)
        time.sleep(2 * SCRAPE_S)

        for title, expr in dashboard_queries():  # every dashboard query answers, with data
            assert query(grafana_to_promql(expr)), f"{title}: no data for {expr}"
        q = {title: grafana_to_promql(expr) for title, expr in dashboard_queries()}  # a panel's last target
        w = "[40s]"
        four = values(grafana_to_promql(q["Client error ratio (4xx)"]).replace("[20s]", w))
        assert len(four) == 1 and 0 < next(iter(four.values())) < 1, four  # the single burst is seen
        five = values(q["Server error ratio (5xx)"])
        assert list(five.values()) == [0.0], five  # 0, not "No data"
        assert list(values(q["Rejected for saturation (429) / s"]).values()) == [0.0]
        routes = values(q["Requests / s by route and status (/v1)"].replace("[20s]", w))
        assert any('"/v1/chat/completions"' in k and '"200"' in k for k in routes), routes
        assert any('"400"' in k for k in routes), routes
        assert not any("/metrics" in k or "/health" in k or "/ready" in k for k in values("llama_train_requests_total"))
        for title in (
            "Time to first token p50 / p95 by model",
            "Inter-token latency p50 / p95 by model",
            "Tokens / s by model (prompt, generation)",
        ):
            got = values(q[title].replace("[20s]", w))
            models = {json.loads(k).get("model") for k in got}
            assert {BASE_NAME, ADAPTER_NAME} <= models, (title, got)
            assert all(v > 0 for v in got.values()), (title, got)
        gen = values("sum by (model) (llama_train_generation_tokens_total)")
        assert gen[json.dumps({"model": BASE_NAME})] > 0 and gen[json.dumps({"model": ADAPTER_NAME})] > 0
        running = values(q["Requests running / waiting by model"])  # idle again: 0 for both
        assert all(v == 0 for v in running.values()) and len(running) == 2, running
        finished = values('sum by (model) (llama_train_requests_finished_total{finish_reason=~"stop|length"})')
        for model, n in counts.items():
            assert finished[json.dumps({"model": model})] >= n, (finished, counts)
        for title, expr in dashboard_queries():  # every query also runs over a range, as Grafana does
            r = httpx.get(
                f"{api}/query_range",
                params={
                    "query": grafana_to_promql(expr),
                    "start": time.time() - 60,
                    "end": time.time(),
                    "step": SCRAPE_S,
                },
                timeout=30,
            ).json()
            assert r["status"] == "success" and r["data"]["result"], (title, r)
        for g in rules["spec"]["groups"]:  # the alert expressions evaluate (and are quiet)
            for rule in g["rules"]:
                assert query(rule["expr"]) == [], rule["alert"]
    finally:
        stop.set()
        prom.terminate()
        prom.wait(30)
