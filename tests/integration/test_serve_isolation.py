"""One tenant can never hurt another (issue 20): bad sampling parameters, malformed bodies,
stalled bodies and disconnects end only the request that caused them, each with a clear answer,
while other clients' requests are served. Real uvicorn process, real `openai` client and raw
sockets for what a client library would not send."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from tests.integration.conftest import BASE_NAME, start_server

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "Reverse the word banana"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    srv = start_server(
        [
            "--base",
            str(tiny_model_dir),
            "--served-model-name",
            BASE_NAME,
            "--max-concurrency",
            "4",
            "--batch-wait-ms",
            "20",
            "--body-timeout-s",
            "3",
        ],
        tmp_path_factory.mktemp("isolation_logs"),
    )
    yield srv
    srv.stop()


def metric(server, name: str, **labels) -> float:
    from tests.integration.test_serve import counter

    return counter(server.metrics(), name, **labels)


def wait_idle(server, within_s: float) -> float:
    """Seconds until no generation request holds a slot (fails after within_s)."""
    t0 = time.monotonic()
    while metric(server, "llama_train_inflight_requests") > 0:
        assert time.monotonic() - t0 < within_s, "generation slots are still held"
        time.sleep(0.1)
    return time.monotonic() - t0


def stalled_socket(server, sent: bytes = b'{"mo', length: int = 100) -> socket.socket:
    """A client that announced `length` body bytes and sent only `sent`."""
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + server.api_key.encode() + b"\r\n"
        b"Content-Length: " + str(length).encode() + b"\r\n\r\n" + sent
    )
    return s


def post(server, route: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{server.v1}{route}",
        content=content,
        timeout=kw.pop("timeout", 120),
        headers={"authorization": f"Bearer {server.api_key}", "content-type": "application/json"},
        **kw,
    )


def raw(**fields) -> str:
    """A JSON body with escapes kept as written ("\\ud800" stays an escape, as a client sends it)."""
    return json.dumps({"model": BASE_NAME, **fields}).replace("\\\\u", "\\u")


def assert_400(r: httpx.Response, param: str | None) -> dict:
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    return err


def test_a_failing_sampler_ends_only_its_own_request(server):
    """Defect 1: a row whose sampling raises (here: repetition_penalty 1e-45 turns logits into inf,
    softmax into NaN) used to post its error to every row of the batch."""
    c = server.client()
    greedy = {
        "model": BASE_NAME,
        "messages": MSGS,
        "temperature": 0,
        "max_tokens": 120,
        "extra_body": {"ignore_eos": True},
    }
    want = c.chat.completions.create(**greedy).choices[0].message.content
    out: dict[str, object] = {}
    go = threading.Barrier(3)

    def innocent_stream():
        go.wait()
        chunks = list(server.client().chat.completions.create(**greedy, stream=True))
        out["stream"] = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    def innocent():
        go.wait()
        out["plain"] = server.client().chat.completions.create(**greedy).choices[0].message.content

    threads = [threading.Thread(target=f) for f in (innocent_stream, innocent)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.monotonic()  # the bad request joins the batch while both innocent ones are decoding
    while metric(server, "llama_train_num_requests_running", model=BASE_NAME) < 2:
        assert time.monotonic() - t0 < 60, "the innocent requests never ran together"
        time.sleep(0.01)
    bad = post(
        server,
        "/chat/completions",
        {"model": BASE_NAME, "messages": MSGS, "temperature": 1.0, "repetition_penalty": 1e-45, "max_tokens": 40},
    )
    for t in threads:
        t.join(120)
    assert out == {"stream": want, "plain": want}
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"]["code"] == "invalid_sampling" and "repetition_penalty" in bad.json()["error"]["message"]


def test_tiny_temperatures_are_greedy(server):
    """Defect 1: temperature 1e-45 (accepted by the schema) divided the logits into inf."""
    c = server.client()
    kw = {"model": BASE_NAME, "messages": MSGS, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
    greedy = c.chat.completions.create(temperature=0, **kw).choices[0].message.content
    for t in (1e-45, 1e-8, 9e-6):
        assert c.chat.completions.create(temperature=t, **kw).choices[0].message.content == greedy


def test_impossible_constraints_are_400(server, tiny_model_dir):
    """Defect 1: allowed_token_ids = [eos] with min_tokens > 0 leaves no token to sample."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    for temperature in (0, 1.0):
        r = post(
            server,
            "/chat/completions",
            {
                "model": BASE_NAME,
                "messages": MSGS,
                "max_tokens": 5,
                "temperature": temperature,
                "min_tokens": 2,
                "allowed_token_ids": [eos],
            },
        )
        assert "min_tokens" in assert_400(r, "allowed_token_ids")["message"]
    r = post(
        server,
        "/chat/completions",
        {
            "model": BASE_NAME,
            "messages": MSGS,
            "max_tokens": 5,
            "min_tokens": 2,
            "allowed_token_ids": [eos, 7],
            "stop_token_ids": [7],
        },
    )
    assert_400(r, "allowed_token_ids")


def test_client_errors_are_400_naming_the_field_and_keep_the_connection(server):
    """Defect 5: these were 500 (and uvicorn dropped the keep-alive connection) or a misleading 422."""
    headers = {"authorization": f"Bearer {server.api_key}", "content-type": "application/json"}
    with httpx.Client(base_url=server.v1, headers=headers, timeout=60) as client:
        cases = [
            ({"model": BASE_NAME, "prompt": "hi", "max_tokens": 2, "seed": 2**64}, "/completions", "seed"),
            ({"model": BASE_NAME, "prompt": "hi", "max_tokens": 2, "seed": -(2**63) - 1}, "/completions", "seed"),
            (raw(prompt="\\ud800 lone", max_tokens=2), "/completions", "prompt"),
            (raw(prompt=["ok", "\\udfff"], max_tokens=2), "/completions", "prompt.1"),
            (
                raw(messages=[{"role": "user", "content": "\\ud800"}], max_tokens=2),
                "/chat/completions",
                "messages.0.content",
            ),
            (raw(stop=["\\ud800"], prompt="x"), "/completions", "stop.0"),
            ("[" * 100_000 + "]" * 100_000, "/completions", None),
            (raw(prompt="x")[:-1] + ', "user": ' + "[" * 5000 + "]" * 5000 + "}", "/completions", None),
        ]
        for body, route, param in cases:
            r = client.post(route, content=body if isinstance(body, str) else json.dumps(body))
            assert_400(r, param)
        ok = client.post(
            "/completions",
            json={"model": BASE_NAME, "prompt": "hi", "max_tokens": 2, "seed": 2**63 - 1, "n": 2, "temperature": 1},
        )
        assert ok.status_code == 200, ok.text
        assert ok.extensions["network_stream"] is not None  # the same kept-alive connection served all
    assert "Traceback" not in server.log()


def test_max_tokens_0_with_echo_only_echoes(server):
    """Defect 6: echo + max_tokens 0 without logprobs generated a token."""
    r = server.client().completions.create(
        model=BASE_NAME, prompt="The quick brown", max_tokens=0, echo=True, temperature=0
    )
    assert r.choices[0].text == "The quick brown"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 0


def test_dependent_parameters_without_their_parent_are_400(server):
    """Defect 7: tool_choice without tools, stream_options without stream were silently ignored."""
    c = server.client()
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=BASE_NAME, messages=MSGS, max_tokens=2, tool_choice="auto")
    assert exc.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=BASE_NAME, messages=MSGS, max_tokens=2, stream_options={"include_usage": True})
    assert exc.value.body["param"] == "stream_options"
    with pytest.raises(openai.BadRequestError) as exc:
        c.completions.create(model=BASE_NAME, prompt="x", max_tokens=2, stream_options={"include_usage": True})
    assert exc.value.body["param"] == "stream_options"
    ok = c.chat.completions.create(model=BASE_NAME, messages=MSGS, max_tokens=2, tool_choice="none")
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_client_gone_before_its_body_is_complete_is_499_not_a_request(server):
    """A sender that closes its socket mid-body is counted as 499 (client went away); its partial
    body is not handed to the app as if it were complete."""
    route = "/v1/completions"
    before = metric(server, "llama_train_requests_total", route=route, status="499")
    bad_before = metric(server, "llama_train_requests_total", route=route, status="400")
    s = stalled_socket(server, sent=b'{"model": "x", "prompt": "hi"}', length=100)
    time.sleep(0.2)
    s.close()
    t0 = time.monotonic()
    while metric(server, "llama_train_requests_total", route=route, status="499") < before + 1:
        assert time.monotonic() - t0 < 20, "the abandoned body was not counted as 499"
        time.sleep(0.05)
    assert metric(server, "llama_train_requests_total", route=route, status="400") == bad_before


def test_stalled_bodies_hold_no_slot_and_get_408(server):
    """Defect 2: the slot was taken before the body was read, and the read had no deadline: four
    stalled senders (= --max-concurrency) made every real request 429."""
    socks = [stalled_socket(server) for _ in range(4)]
    stop = threading.Event()

    def trickle(s):  # one byte every 0.5 s on two of them: progress, but never done in time
        while not stop.wait(0.5):
            try:
                s.sendall(b" ")
            except OSError:
                return

    tricklers = [threading.Thread(target=trickle, args=(s,), daemon=True) for s in socks[:2]]
    try:
        for t in tricklers:
            t.start()
        time.sleep(0.5)
        r = server.client().completions.create(model=BASE_NAME, prompt="hi", max_tokens=2)
        assert r.choices[0].finish_reason in ("stop", "length")
        stop.set()  # stalled from here on (bytes arriving after the 408 would make the close a reset)
        t0 = time.monotonic()
        for s in socks:
            s.settimeout(20)
            answer = b""
            while chunk := s.recv(65536):  # "connection: close": read to the end
                answer += chunk
            head = answer.decode(errors="replace")
            assert head.startswith("HTTP/1.1 408"), head[:200]
            assert "body-timeout-s" in head, head
        assert time.monotonic() - t0 < 15
    finally:
        stop.set()
        for s in socks:
            s.close()
    assert metric(server, "llama_train_inflight_requests") == 0


def test_non_stream_request_is_aborted_when_the_client_disconnects(server):
    """Defect 3: the slot stayed held and every token was generated after the client left."""
    wait_idle(server, 60)
    before = metric(server, "llama_train_tokens_total", kind="completion")
    body = {"model": BASE_NAME, "prompt": "The quick brown", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/completions", body, timeout=httpx.Timeout(60, read=2))
    wait_idle(server, 30)
    generated = metric(server, "llama_train_tokens_total", kind="completion") - before
    assert 0 < generated < 1000  # stopped when the client left, not after all 1000 tokens
    assert metric(server, "llama_train_requests_total", route="/v1/completions", status="499") >= 1


def test_misbehaving_client_beside_well_behaved_ones(server):
    """One client sends bad sampling parameters, malformed bodies, stalled bodies and disconnects
    while two well-behaved clients run: every well-behaved request succeeds, with the greedy
    text it gets alone, within its deadline (generous: the point is that none fails or waits
    for the misbehaver)."""
    deadline_s = 60.0
    greedy = {
        "model": BASE_NAME,
        "messages": MSGS,
        "temperature": 0,
        "max_tokens": 24,
        "extra_body": {"ignore_eos": True},
    }
    want = server.client().chat.completions.create(**greedy).choices[0].message.content
    stop = threading.Event()  # the misbehaver is done
    failures: list[str] = []
    served: list[float] = []
    misbehaved: dict[str, int] = {}

    def well_behaved(k: int):
        client = server.client(timeout=deadline_s)
        i = 0
        while i < 3 or not stop.is_set():  # for as long as the misbehaver runs
            i += 1
            t0 = time.monotonic()
            try:
                if (i + k) % 2:
                    chunks = list(client.chat.completions.create(**greedy, stream=True))
                    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
                else:
                    text = client.chat.completions.create(**greedy).choices[0].message.content
            except Exception as exc:  # noqa: BLE001  (reported below)
                failures.append(f"client {k} request {i}: {type(exc).__name__}: {exc}")
                continue
            took = time.monotonic() - t0
            if text != want or took > deadline_s:
                failures.append(f"client {k} request {i}: {text!r} after {took:.1f} s")
            served.append(took)

    def bad(kind: str, fn):
        try:
            fn()
        except (httpx.HTTPError, OSError):
            pass
        misbehaved[kind] = misbehaved.get(kind, 0) + 1

    def stream_and_leave():
        with httpx.stream(
            "POST",
            f"{server.v1}/completions",
            timeout=30,
            headers={"authorization": f"Bearer {server.api_key}"},
            json={"model": BASE_NAME, "prompt": "x", "max_tokens": 500, "stream": True, "ignore_eos": True},
        ) as r:
            next(r.iter_lines())  # the first chunk, then the connection is closed

    def misbehaver():
        stalled = []
        actions = [
            (
                "bad sampling",
                lambda: post(
                    server,
                    "/chat/completions",
                    {
                        "model": BASE_NAME,
                        "messages": MSGS,
                        "temperature": 1.0,
                        "repetition_penalty": 1e-45,
                        "max_tokens": 24,
                    },
                ),
            ),
            (
                "tiny temperature",
                lambda: post(
                    server,
                    "/chat/completions",
                    {"model": BASE_NAME, "messages": MSGS, "temperature": 1e-45, "max_tokens": 24},
                ),
            ),
            ("stalled body", lambda: stalled.append(stalled_socket(server))),
            ("malformed", lambda: post(server, "/completions", raw(prompt="\\ud800", seed=2**64))),
            ("deep json", lambda: post(server, "/completions", "[" * 50_000)),
            (
                "non-stream disconnect",
                lambda: post(
                    server,
                    "/completions",
                    {"model": BASE_NAME, "prompt": "x", "max_tokens": 500, "ignore_eos": True},
                    timeout=httpx.Timeout(30, read=0.3),
                ),
            ),
            ("stream disconnect", stream_and_leave),
        ]
        for _ in range(2):
            for action in actions:
                bad(*action)
                time.sleep(0.05)
        stop.set()
        for s in stalled:
            s.close()

    good = [threading.Thread(target=well_behaved, args=(k,)) for k in range(2)]
    rogue = threading.Thread(target=misbehaver)
    rogue.start()
    for t in good:
        t.start()
    rogue.join(300)
    for t in good:
        t.join(300)
    assert not failures, failures
    assert len(served) >= 6
    assert misbehaved == {kind: 2 for kind in misbehaved} and len(misbehaved) == 7, misbehaved
    wait_idle(server, 30)  # nothing the misbehaver did still holds a slot
