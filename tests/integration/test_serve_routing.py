"""Routing: a front server proxies a model name to an upstream OpenAI-compatible server (the
session `served` server), streaming included, next to its own local model."""

from __future__ import annotations

import openai
import pytest

from tests.integration.conftest import ADAPTER_NAME, API_KEY, free_port, start_server

pytestmark = pytest.mark.slow

MSGS = [{"role": "user", "content": "Name a prime number."}]
FRONT_KEY = "front-key"


@pytest.fixture(scope="module")
def front(served, tiny_model_dir, tmp_path_factory):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    server = start_server(
        [
            "--base",
            str(tiny_model_dir),
            "--served-model-name",
            "front-local",
            "--upstream",
            f"remote={served.v1}#{ADAPTER_NAME}",
            "--upstream",
            f"gone={dead}",
            "--request-timeout-s",
            "60",
        ],
        tmp_path_factory.mktemp("front_logs"),
        api_key=FRONT_KEY,
        env={"LLAMA_TRAIN_UPSTREAM_KEY_REMOTE": API_KEY},
    )
    yield server
    server.stop()


def test_upstream_models_are_listed(front):
    ids = {m.id for m in front.client().models.list()}
    assert ids == {"front-local", "remote", "gone"}


def test_proxied_chat_equals_direct_call(front, served):
    kw = {"messages": MSGS, "temperature": 0, "max_tokens": 8}
    direct = served.client().chat.completions.create(model=ADAPTER_NAME, **kw)
    proxied = front.client().chat.completions.create(model="remote", **kw)
    assert proxied.choices[0].message.content == direct.choices[0].message.content
    assert proxied.usage.completion_tokens == direct.usage.completion_tokens
    local = front.client().chat.completions.create(model="front-local", **kw)
    assert local.model == "front-local"


def test_proxied_streaming(front, served):
    kw = {"messages": MSGS, "temperature": 0, "max_tokens": 8}
    direct = served.client().chat.completions.create(model=ADAPTER_NAME, **kw)
    chunks = list(front.client().chat.completions.create(model="remote", stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.choices[0].message.content


def test_upstream_errors_pass_through_and_unreachable_is_502(front):
    c = front.client()
    with pytest.raises(openai.BadRequestError) as exc:  # the upstream's own 400
        c.chat.completions.create(model="remote", messages=MSGS, temperature=9)
    assert exc.value.body["param"] == "temperature"
    with pytest.raises(openai.InternalServerError) as exc:
        c.chat.completions.create(model="gone", messages=MSGS, max_tokens=2)
    assert exc.value.status_code == 502 and exc.value.body["code"] == "upstream_unreachable"
    with pytest.raises(openai.AuthenticationError):  # the front's key guards proxied routes too
        front.client(api_key=API_KEY).chat.completions.create(model="remote", messages=MSGS)
