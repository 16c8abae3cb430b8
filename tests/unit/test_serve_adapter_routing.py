"""Routing of requests to adapter versions (no model loaded): the canary split with a seeded RNG,
a request pinned to the version it was routed to, and the errors for bad models:/ references."""

from __future__ import annotations

import asyncio
from unittest import mock

import pytest

from llama_train.errors import LlamaTrainError
from llama_train.serve.engine import Engine, GenRequest, SamplingParams
from llama_train.serve.observe import Metrics
from llama_train.tracking.registry import parse_model_ref
from tests.conftest import run_cli


def _engine() -> Engine:
    engine = Engine("unused", {"support": "/adapters/a"})
    engine.metrics = Metrics(["unused", "support"])
    engine._versions = {"support": "1", "support__canary": "2"}
    return engine


def _submit(engine: Engine, loop) -> GenRequest:
    req = GenRequest([1, 2], SamplingParams(max_tokens=1), "support", "support", loop)
    engine.submit(req)
    return req


def _count(engine: Engine, version: str) -> float:
    return engine.metrics.adapter_requests.labels("support", version)._value.get()


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_canary_split_is_within_two_percent_over_5000_requests(fraction):
    loop = asyncio.new_event_loop()
    try:
        engine = _engine()
        engine.canary["support"] = ("support__canary", fraction)
        engine.rng.seed(1234)
        routed = [_submit(engine, loop).adapter for _ in range(5000)]
    finally:
        loop.close()
    assert set(routed) == {"support", "support__canary"}
    share = routed.count("support__canary") / len(routed)
    assert abs(share - fraction) < 0.02
    assert _count(engine, "2") == routed.count("support__canary")
    assert _count(engine, "1") == routed.count("support")


def test_without_a_canary_every_request_goes_to_the_main_version():
    loop = asyncio.new_event_loop()
    try:
        engine = _engine()
        assert {_submit(engine, loop).adapter for _ in range(100)} == {"support"}
    finally:
        loop.close()
    assert _count(engine, "1") == 100 and _count(engine, "2") == 0


def test_a_request_keeps_the_version_it_was_routed_to_after_a_switch():
    loop = asyncio.new_event_loop()
    try:
        engine = _engine()
        before = _submit(engine, loop)
        engine.routes["support"] = "support__canary"  # what a switch does (under the route lock)
        after = _submit(engine, loop)
    finally:
        loop.close()
    assert (before.adapter, after.adapter) == ("support", "support__canary")
    assert [q.adapter for q in engine._pending.queue] == ["support", "support__canary"]


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("models:/support@champion", ("support", None, "champion")),
        ("models:/support/3", ("support", "3", None)),
        ("models:/team/support/12", ("team/support", "12", None)),
    ],
)
def test_model_refs(ref, expected):
    assert parse_model_ref(ref) == expected


@pytest.mark.parametrize(
    "ref", ["models:/support", "models:/support/latest", "support@champion", "models:/@champion", "models:/support@"]
)
def test_bad_model_refs_say_which_forms_work(ref):
    with pytest.raises(LlamaTrainError, match=r"use models:/NAME/VERSION .* or models:/NAME@ALIAS"):
        parse_model_ref(ref, flag="--adapter support")


def _serve(tiny_dir, *args, env=None):
    """`llama-train serve` in this process, without $MLFLOW_TRACKING_URI. These flags must fail before
    the server starts; if one did not, the patched run fails the test instead of serving forever."""
    started = AssertionError("the server started: the flags were accepted")
    with mock.patch("uvicorn.Server.run", side_effect=started):
        return run_cli(
            "serve", "--base", tiny_dir, "--port", "0", *args, env={"MLFLOW_TRACKING_URI": None} | (env or {})
        )


def test_serve_flags_for_registry_adapters_fail_fast_with_the_fix(tiny_dir):
    bad = _serve(tiny_dir, "--adapter", "support=models:/support")
    assert bad.returncode == 2 and "--adapter support 'models:/support': use models:/NAME/VERSION" in bad.stderr
    no_uri = _serve(tiny_dir, "--adapter", "support=models:/support@champion")
    assert no_uri.returncode == 1
    assert "set $MLFLOW_TRACKING_URI or pass --registry-uri" in no_uri.stderr
    poll = _serve(tiny_dir, "--registry-poll-s", "0")
    assert poll.returncode == 2 and "--registry-poll-s 0.0: give a positive number of seconds" in poll.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["--canary", "support=models:/support@candidate"],
            (
                "--canary support=models:/support@candidate: end it "
                "with :FRACTION between 0 and 1, e.g. support=models:/support@candidate:0.1"
            ),
        ),
        (["--canary", "support=models:/support@candidate:1.5"], "end it with :FRACTION between 0 and 1"),
        (["--canary", "other=models:/support@candidate:0.1"], "--canary other: no --adapter other to split"),
    ],
)
def test_canary_flag_errors_name_the_flag_and_the_form(tiny_dir, args, needle):
    bad = _serve(tiny_dir, *args)
    assert bad.returncode == 2 and needle in bad.stderr
