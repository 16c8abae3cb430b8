"""The OpenAI-compatible server, as a real uvicorn process, driven by the official `openai` client."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest

from tests.integration.conftest import ADAPTER_NAME, BASE_NAME, start_server

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "What is 12 plus 7?"}]
GREEDY = {"temperature": 0, "max_tokens": 12}


def counter(text: str, name: str, **labels) -> float:
    """Value of one Prometheus sample (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            return float(m.group(2))
    return 0.0


def test_health_and_ready_need_no_key(served):
    assert httpx.get(f"{served.base_url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{served.base_url}/ready").json() == {"status": "ready"}


def test_models_lists_base_and_adapter_with_parent(served):
    models = {m.id: m for m in served.client().models.list()}
    assert set(models) == {BASE_NAME, ADAPTER_NAME}
    assert models[ADAPTER_NAME].model_extra["parent"] == BASE_NAME
    assert models[BASE_NAME].model_extra["parent"] is None


def test_chat_non_streaming_has_text_and_usage(served):
    r = served.client().chat.completions.create(model=BASE_NAME, messages=MSGS, **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    # Llama-3 template: bos + header(user) + content + eot + header(assistant)
    assert r.usage.prompt_tokens > 5
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_non_streaming_and_reports_usage(served):
    c = served.client()
    full = c.chat.completions.create(model=ADAPTER_NAME, messages=MSGS, **GREEDY)
    chunks = list(
        c.chat.completions.create(
            model=ADAPTER_NAME, messages=MSGS, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_raw_sse_format_ends_with_done(served):
    body = {
        "model": BASE_NAME,
        "prompt": "The quick",
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream(
        "POST", f"{served.v1}/completions", json=body, timeout=60, headers={"authorization": f"Bearer {served.api_key}"}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    docs = [json.loads(e[6:]) for e in events[:-1]]
    assert {d["object"] for d in docs} == {"text_completion"}
    assert docs[-1]["choices"][0]["finish_reason"] == "length"


def test_adapter_selection_changes_greedy_output(served):
    c = served.client()
    base = [c.chat.completions.create(model=BASE_NAME, messages=MSGS, **GREEDY) for _ in range(2)]
    lora = [c.chat.completions.create(model=ADAPTER_NAME, messages=MSGS, **GREEDY) for _ in range(2)]
    b = [r.choices[0].message.content for r in base]
    a = [r.choices[0].message.content for r in lora]
    assert b[0] == b[1] and a[0] == a[1]  # greedy is deterministic per model
    assert a[0] != b[0]  # and the adapter is really applied
    assert lora[0].model == ADAPTER_NAME


def test_concurrent_batched_requests_match_sequential(served):
    """Left-padded batches over both models give the same greedy text as one request at a time."""
    c = served.client()
    jobs = [(m, p) for m in (BASE_NAME, ADAPTER_NAME) for p in ("hi", "Reverse the word banana")]
    sequential = {
        job: c.chat.completions.create(model=job[0], messages=[{"role": "user", "content": job[1]}], **GREEDY)
        .choices[0]
        .message.content
        for job in jobs
    }
    results, errors = {}, []

    def run(job):
        try:
            r = served.client().chat.completions.create(
                model=job[0], messages=[{"role": "user", "content": job[1]}], **GREEDY
            )
            results[job] = r.choices[0].message.content
        except Exception as exc:  # noqa: BLE001  (surfaced below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == sequential


def test_completions_sampling_seed_n_and_stop(served):
    c = served.client()
    kw = {
        "model": BASE_NAME,
        "prompt": "The quick brown",
        "max_tokens": 8,
        "temperature": 0.9,
        "top_p": 0.95,
        "seed": 42,
        "n": 2,
        "extra_body": {"ignore_eos": True},
    }
    r1, r2 = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.text for ch in r1.choices] == [ch.text for ch in r2.choices]  # seeded
    assert [ch.index for ch in r1.choices] == [0, 1]
    assert r1.usage.completion_tokens == 16
    greedy = (
        c.completions.create(
            model=BASE_NAME, prompt="The quick brown", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = greedy.strip()[2:4] if len(greedy.strip()) >= 4 else None
    if stop:
        cut = c.completions.create(
            model=BASE_NAME,
            prompt="The quick brown",
            max_tokens=12,
            temperature=0,
            stop=[stop],
            extra_body={"ignore_eos": True},
        )
        assert cut.choices[0].finish_reason == "stop"
        assert cut.choices[0].text == greedy[: greedy.find(stop)]


def test_wrong_or_missing_key_is_401(served):
    with pytest.raises(openai.AuthenticationError) as exc:
        served.client(api_key="wrong-key").models.list()
    assert exc.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{served.v1}/chat/completions", json={"model": BASE_NAME, "messages": MSGS})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_bad_parameters_are_400_and_server_keeps_serving(served):
    c = served.client()
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=BASE_NAME, messages=MSGS, temperature=7)
    assert exc.value.body["param"] == "temperature" and "less than or equal to 2" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=BASE_NAME, messages=[], max_tokens=2)
    assert exc.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=BASE_NAME, messages=MSGS, max_tokens=100_000)
    assert exc.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 1024" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(
            model=BASE_NAME, messages=MSGS, tools=[{"type": "function", "function": {"name": "f g"}}]
        )
    assert exc.value.body["param"] == "tools.0.function.name"
    headers = {"authorization": f"Bearer {served.api_key}", "content-type": "application/json"}
    r = httpx.post(f"{served.v1}/chat/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(
        f"{served.v1}/completions", headers=headers, content=json.dumps({"model": BASE_NAME, "prompt": "x" * (5 << 20)})
    )
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    ok = c.chat.completions.create(model=BASE_NAME, messages=MSGS, max_tokens=2, temperature=0)
    assert ok.choices[0].message.content is not None


def test_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError) as exc:
        served.client().chat.completions.create(model="no-such-model", messages=MSGS)
    assert exc.value.body["code"] == "model_not_found"
    assert ADAPTER_NAME in exc.value.body["message"]  # lists what is served


def test_metrics_count_requests_and_tokens(served):
    before = served.metrics()
    c = served.client()
    r = c.chat.completions.create(model=BASE_NAME, messages=MSGS, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=MSGS)
    after = served.metrics()
    route = "/v1/chat/completions"
    for status, n in (("200", 1), ("404", 1)):
        assert (
            counter(after, "llama_train_requests_total", route=route, status=status)
            == counter(before, "llama_train_requests_total", route=route, status=status) + n
        )
    assert (
        counter(after, "llama_train_tokens_total", kind="completion")
        - counter(before, "llama_train_tokens_total", kind="completion")
        == r.usage.completion_tokens
    )
    assert (
        counter(after, "llama_train_tokens_total", kind="prompt")
        - counter(before, "llama_train_tokens_total", kind="prompt")
        == r.usage.prompt_tokens
    )
    assert (
        counter(after, "llama_train_request_latency_seconds_count", route=route)
        >= counter(before, "llama_train_request_latency_seconds_count", route=route) + 2
    )
    assert "# TYPE llama_train_request_latency_seconds histogram" in after
    assert "# TYPE llama_train_inflight_requests gauge" in after


def test_json_logs_are_one_object_per_line(served):
    lines = [ln for ln in served.log().splitlines() if ln.strip()]
    docs = [json.loads(ln) for ln in lines]  # every line parses
    assert any(d.get("msg") == "request" and d.get("path") == "/v1/chat/completions" for d in docs)


def test_over_concurrency_limit_is_429_then_recovers(served):
    """max_concurrency=4: four open streams hold the slots; the fifth request is refused."""
    c = served.client()
    streams = []
    try:
        for _ in range(4):
            s = c.chat.completions.create(
                model=BASE_NAME,
                messages=MSGS,
                stream=True,
                temperature=0,
                max_tokens=900,
                extra_body={"ignore_eos": True},
            )
            next(iter(s))  # the request is in flight (headers and a first chunk received)
            streams.append(s)
        with pytest.raises(openai.RateLimitError) as exc:
            c.chat.completions.create(model=BASE_NAME, messages=MSGS, max_tokens=2)
        assert exc.value.body["code"] == "rate_limit_exceeded"
    finally:
        for s in streams:
            s.close()
    deadline = time.monotonic() + 60
    while counter(served.metrics(), "llama_train_inflight_requests") > 0:
        assert time.monotonic() < deadline, "streams closed by the client still hold slots"
        time.sleep(0.2)
    ok = c.chat.completions.create(model=BASE_NAME, messages=MSGS, max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_request_timeout_is_504_and_frees_the_slot(tiny_model_dir, tmp_path):
    """--request-timeout-s 0.5: a 900-token generation gets 504 (non-streaming) or an in-band error
    event after its first chunks (streaming, headers already sent); generation stops for it, the
    in-flight gauge returns to 0, and the next short request is served."""
    server = start_server(
        [
            "--base",
            str(tiny_model_dir),
            "--served-model-name",
            BASE_NAME,
            "--request-timeout-s",
            "0.5",
            "--max-concurrency",
            "1",
        ],
        tmp_path,
    )
    try:
        long = {"model": BASE_NAME, "messages": MSGS, "max_tokens": 900, "temperature": 0, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {server.api_key}"}
        t0 = time.monotonic()
        r = httpx.post(f"{server.v1}/chat/completions", json=long, headers=headers, timeout=60)
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout" and "request-timeout-s" in r.json()["error"]["message"]
        assert time.monotonic() - t0 < 30  # answered at the deadline, not after 900 tokens
        with httpx.stream(
            "POST", f"{server.v1}/chat/completions", json={**long, "stream": True}, headers=headers, timeout=60
        ) as s:
            assert s.status_code == 200
            events = [line[len("data: ") :] for line in s.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
        error = json.loads(events[-2] if events[-1] == "[DONE]" else events[-1])
        assert error["error"]["code"] == "timeout", events[-3:]
        deadline = time.monotonic() + 30
        while counter(server.metrics(), "llama_train_inflight_requests") > 0:
            assert time.monotonic() < deadline, "a timed-out request still holds its slot"
            time.sleep(0.2)
        ok = server.client().chat.completions.create(model=BASE_NAME, messages=MSGS, max_tokens=2, temperature=0)
        assert ok.choices[0].finish_reason in ("stop", "length")
    finally:
        server.stop()


def test_bad_flags_and_files_exit_before_the_server_starts(tiny_model_dir, tiny_adapter_dir, tmp_path, monkeypatch):
    """Checked up front: otherwise the server runs unready (/health 503) with the error in its log."""
    import socket

    import typer
    import uvicorn
    from typer.testing import CliRunner

    from llama_train.errors import LlamaTrainError
    from llama_train.serve.cli import serve_command

    def never(*a, **k):
        raise AssertionError("the server started despite a bad flag")

    monkeypatch.setattr(uvicorn, "run", never)
    app = typer.Typer()
    app.command("serve")(serve_command)
    app.command("noop")(lambda: None)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_bytes((tiny_adapter_dir / "adapter_config.json").read_bytes())
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    base = ["--base", str(tiny_model_dir)]
    cases = [
        (base + ["--log-level", "BOGUS"], 2, "--log-level"),
        (base + ["--port", "99999"], 2, "--port 99999"),
        (base + ["--dtype", "float8"], 2, "--dtype"),
        (base + ["--adapter", "nameless"], 2, "--adapter"),
        (["--base", str(tmp_path / "nonexistent")], 1, "--base"),
        (base + ["--adapter", f"a={no_weights}"], 1, "no adapter_model.safetensors"),
        (base + ["--port", str(busy.getsockname()[1])], 1, "choose another --port"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((base + ["--device", "cuda"], 4, "CUDA is not available"))
    try:
        for argv, code, needle in cases:
            result = CliRunner().invoke(app, ["serve", *argv])
            exc = result.exception
            assert isinstance(exc, LlamaTrainError), (argv, result.output, exc)
            assert exc.exit_code == code and needle in str(exc), (argv, exc)
    finally:
        busy.close()
