"""Tool calling and structured output through the real server process and the official `openai`
client, on the tiny random model (its Llama 3.1-style template renders tools): constrained decoding
makes even a random model produce valid calls and schema-valid JSON."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from tests.integration.conftest import start_server

pytestmark = pytest.mark.slow

MODEL = "tiny-tools"
# Bounded values: the grammar makes every output valid, but only the model decides when a free
# string ends; a random model rarely closes one, so strings are bounded to keep outputs short.
WEATHER = {
    "type": "object",
    "additionalProperties": False,
    "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["celsius", "fahrenheit"]}},
}
TIME = {
    "type": "object",
    "additionalProperties": False,
    "required": ["zone"],
    "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time", "parameters": TIME}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
REPORT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["ok", "score", "tags", "label"],
    "properties": {
        "ok": {"type": "boolean"},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "label": {"type": "string", "maxLength": 6},
    },
}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    s = start_server(
        [
            "--base",
            str(tiny_model_dir),
            "--served-model-name",
            MODEL,
            "--max-concurrency",
            "64",
            "--max-batch-size",
            "32",
            "--batch-wait-ms",
            "20",
        ],
        tmp_path_factory.mktemp("tools_server"),
    )
    yield s
    s.stop()


def _validate_call(call, tools=TOOLS):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in schemas
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_tool_call_round_trip_with_required(server, tiny_model_dir):
    c = server.client()
    first = c.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=3, max_tokens=100
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    _validate_call(call)
    # The call and its result go back in the history; the final answer is plain content.
    history = ASK + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"},
    ]
    final = c.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8
    )
    assert final.choices[0].message.tool_calls is None
    assert isinstance(final.choices[0].message.content, str) and final.choices[0].finish_reason in ("stop", "length")
    # The history was rendered, not dropped: the prompt is exactly the template's rendering of the
    # call (as Llama 3.1's JSON) and of the tool's result (an ipython turn), with the tools.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = json.loads(call.function.arguments)
    rendered = tok.apply_chat_template(
        ASK
        + [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}
                ],
            },
            history[-1],
        ],
        tools=TOOLS,
        add_generation_prompt=True,
        tokenize=False,
    )
    assert f'{{"name": "{call.function.name}", "parameters": {json.dumps(args)}}}<|eot_id|>' in rendered
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n21 degrees and sunny<|eot_id|>" in rendered
    assert final.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])


def test_named_tool_choice_calls_that_function(server):
    r = server.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        n=4,
        temperature=1.0,
        max_tokens=60,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    for choice in r.choices:
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_time" and choice.finish_reason == "tool_calls"
        _validate_call(call)


def test_streamed_tool_call_reassembles_to_the_same_call(server):
    c = server.client()
    kw = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=11, max_tokens=100)
    whole = c.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = list(c.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    calls: dict[int, dict] = {}
    for ch in chunks:
        for d in ch.choices[0].delta.tool_calls or []:
            if d.id:  # the first delta of a call: index, id, type, name
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments}
            else:
                calls[d.index]["arguments"] += d.function.arguments
    assert len(calls) == 1 and calls[0]["id"].startswith("call_")
    assert (calls[0]["name"], calls[0]["arguments"]) == (whole.function.name, whole.function.arguments)
    arg_chunks = [ch for ch in chunks if ch.choices[0].delta.tool_calls and not ch.choices[0].delta.tool_calls[0].id]
    # the arguments arrive as they are generated (a piece per token or so), not at the end
    assert len(arg_chunks) >= len(whole.function.arguments) / 4
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason] == ["tool_calls"]


def _streamed_call(chunks) -> tuple[dict, list]:
    call: dict = {}
    for ch in chunks:
        for d in ch.choices[0].delta.tool_calls or []:
            if d.id:
                call = {"name": d.function.name, "arguments": d.function.arguments}
            else:
                call["arguments"] += d.function.arguments
    return call, [ch.choices[0].finish_reason for ch in chunks if ch.choices[0].finish_reason]


@pytest.mark.parametrize(
    "cut", [{"max_tokens": 52}, {"stop": ["unit"], "max_tokens": 100}], ids=["length", "stop_string"]
)
def test_a_forced_call_cut_short_is_the_same_partial_call_streamed_or_not(server, cut):
    """A forced call cut by max_tokens or by a user stop string: both paths give the call so far
    (the name and the argument text up to the cut) with the cut's finish reason, not "tool_calls"
    for an incomplete call, and not the raw text as content in one path only."""
    c = server.client()
    kw = dict(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        temperature=1.0,
        seed=5,
        **cut,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    whole = c.chat.completions.create(**kw).choices[0]
    reason = "length" if "stop" not in cut else "stop"
    assert whole.finish_reason == reason and whole.message.content is None
    (call,) = whole.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.function.arguments)  # incomplete
    if "stop" in cut:  # cut right before the stop string, which is not included
        assert call.function.arguments.startswith('{"city": "') and call.function.arguments.endswith('"')
    streamed, reasons = _streamed_call(list(c.chat.completions.create(stream=True, **kw)))
    assert streamed == {"name": "get_weather", "arguments": call.function.arguments}
    assert reasons == [reason]


def test_json_schema_outputs_validate_on_100_sampled_requests(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT, "strict": True}}

    def one(i):
        r = server.client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Report {i}"}],
            response_format=fmt,
            temperature=1.0,
            max_tokens=120,
        )
        return r.choices[0]

    with ThreadPoolExecutor(32) as pool:
        choices = list(pool.map(one, range(100)))
    docs = []
    for ch in choices:
        assert ch.finish_reason == "stop", ch.message.content
        doc = json.loads(ch.message.content)
        jsonschema.validate(doc, REPORT)
        docs.append(json.dumps(doc, sort_keys=True))
    assert len(set(docs)) > 50  # really sampled at temperature 1, not one fixed answer


def test_unconstrained_rows_in_a_constrained_batch_are_unchanged(server):
    """The grammar masks only its own rows: a greedy plain request gives the same text alone and
    in a batch with constrained rows."""
    c = server.client()
    plain = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Sort: 4312"}],
        temperature=0,
        max_tokens=24,
        extra_body={"ignore_eos": True},
    )
    alone = c.chat.completions.create(**plain).choices[0].message.content
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT}}

    def constrained(i):
        return server.client().chat.completions.create(
            model=MODEL, messages=ASK, response_format=fmt, temperature=1.0, max_tokens=120
        )

    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(constrained, i) for i in range(8)]
        mixed = pool.submit(lambda: server.client().chat.completions.create(**plain))
        assert mixed.result().choices[0].message.content == alone
        for f in futures:
            jsonschema.validate(json.loads(f.result().choices[0].message.content), REPORT)


def test_auto_reads_a_call_only_when_the_output_is_one(server):
    r = server.client().chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=0, max_tokens=10)
    # a random model writes no call: plain content, no tool_calls
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason != "tool_calls"


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_tool_and_format_parameters_are_400_naming_the_field(server, extra, param):
    with pytest.raises(openai.BadRequestError) as exc:
        server.client().chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **extra)
    assert exc.value.status_code == 400 and exc.value.body["param"] == param


HERMES_TEMPLATE = __import__("pathlib").Path(__file__).with_name("hermes_tools.jinja")


def test_hermes_template_via_chat_template_flag(tiny_model_dir, tmp_path):
    """`--chat-template` with a Hermes-style (<tool_call>) template: the forced call is written in
    its tags, read back as tool_calls, streamed, and the history renders the call and the result."""
    s = start_server(
        ["--base", str(tiny_model_dir), "--served-model-name", MODEL, "--chat-template", str(HERMES_TEMPLATE)], tmp_path
    )
    try:
        c = s.client()
        kw = dict(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=5, max_tokens=100
        )
        r = c.chat.completions.create(**kw)
        (call,) = r.choices[0].message.tool_calls
        _validate_call(call)
        assert r.choices[0].finish_reason == "tool_calls"
        streamed = "".join(
            d.function.arguments
            for ch in c.chat.completions.create(stream=True, **kw)
            for d in ch.choices[0].delta.tool_calls or []
        )
        assert streamed == call.function.arguments
        history = ASK + [
            r.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
        ]
        final = c.chat.completions.create(
            model=MODEL, messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=4
        )
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        rendered = tok.apply_chat_template(
            ASK
            + [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)},
                        }
                    ],
                },
                history[-1],
            ],
            tools=TOOLS,
            add_generation_prompt=True,
            tokenize=False,
            chat_template=HERMES_TEMPLATE.read_text(),
        )
        assert '<tool_call>\n{"name": "' in rendered and "<tool_response>\nsunny\n</tool_response>" in rendered
        assert final.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    finally:
        s.stop()


def test_grammar_holds_with_penalties_bias_and_greedy(server):
    """Greedy rows and rows with logit_bias, penalties, top_k, min_p stay under the grammar (a
    forbidden token is -inf whatever bias or penalty is added to it)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": REPORT}}
    c = server.client()
    for kw in (
        {"temperature": 0},
        {"frequency_penalty": 2.0, "presence_penalty": 2.0},
        {"logit_bias": {str(t): 100 for t in range(40, 60)}, "temperature": 0.5},
        {"extra_body": {"repetition_penalty": 1.5, "top_k": 5, "min_p": 0.1}},
    ):
        r = c.chat.completions.create(model=MODEL, messages=ASK, response_format=fmt, max_tokens=120, **kw)
        assert r.choices[0].finish_reason == "stop", kw
        jsonschema.validate(json.loads(r.choices[0].message.content), REPORT)
