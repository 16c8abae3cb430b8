"""serve/structured.py with the real llguidance and the tiny tokenizer: request checks (400s name
the field), the call formats read back, and grammars that make random logits produce valid calls."""

from __future__ import annotations

import json

import pytest
import torch

from llama_train.serve.schemas import APIError
from llama_train.serve.structured import HERMES, LLAMA_JSON, Grammars, parse_calls, plan

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
HERMES_TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}"
    + CHATML
    + "{# calls: <tool_call>{...}</tool_call> #}"
)
ARGS = {
    "type": "object",
    "additionalProperties": False,
    "required": ["n"],
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
}
TOOLS = [
    {"type": "function", "function": {"name": "double", "parameters": ARGS}},
    {"type": "function", "function": {"name": "halve", "parameters": ARGS}},
]


def test_a_template_that_does_not_render_tools_is_a_400_naming_tools():
    with pytest.raises(APIError) as exc:
        plan({"tools": TOOLS}, CHATML)
    assert exc.value.status == 400 and exc.value.param == "tools" and "does not render tools" in exc.value.message
    assert plan({"tools": TOOLS}, HERMES_TEMPLATE).call_format == HERMES


def test_choices_decide_parsing_and_grammar(tiny_tokenizer):
    t = tiny_tokenizer.chat_template
    assert plan({"tools": TOOLS}, t).parse_calls and plan({"tools": TOOLS}, t).grammar is None  # auto
    none = plan({"tools": TOOLS, "tool_choice": "none"}, t)
    assert not none.parse_calls and none.grammar is None and none.tools == TOOLS  # rendered, not read back
    assert plan({"tools": TOOLS, "tool_choice": "required"}, t).grammar is not None
    assert plan({"response_format": {"type": "json_object"}}, t).grammar is not None
    assert plan({"response_format": {"type": "text"}}, t).grammar is None


@pytest.mark.parametrize(
    "text, fmt, want",
    [
        ('{"name": "double", "parameters": {"n": 2}}', LLAMA_JSON, ("double", {"n": 2})),
        ('<|python_tag|>{"name": "halve", "arguments": {"n": 4}}', LLAMA_JSON, ("halve", {"n": 4})),
        ('{"name": "other", "parameters": {}}', LLAMA_JSON, None),  # not one of the tools
        ('The answer is {"name": "double"}', LLAMA_JSON, None),  # prose
        ('Sure.\n<tool_call>\n{"name": "double", "arguments": {"n": 1}}\n</tool_call>', HERMES, ("double", {"n": 1})),
        ('<tool_call>{"name": "double", "arguments": [1]}</tool_call>', HERMES, None),
    ],
)
def test_parse_calls(text, fmt, want):
    got = parse_calls(text, fmt, {"double", "halve"})
    if want is None:
        assert got is None
        return
    content, (call,) = got
    assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == want
    assert content == ("Sure." if text.startswith("Sure") else None)


@pytest.mark.parametrize("template, fmt", [(None, LLAMA_JSON), (HERMES_TEMPLATE, HERMES)])
def test_forced_call_grammar_turns_random_logits_into_valid_calls(tiny_tokenizer, template, fmt):
    p = plan({"tools": TOOLS, "tool_choice": "required"}, template or tiny_tokenizer.chat_template)
    assert p.call_format == fmt
    grammars = Grammars(tiny_tokenizer, len(tiny_tokenizer))
    eos = tiny_tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(0)
    import llguidance.torch as llt

    for _ in range(10):
        m = grammars.matcher(p.grammar)
        mask = llt.allocate_token_bitmask(1, len(tiny_tokenizer))
        ids = []
        while True:
            llt.fill_next_token_bitmask(m, mask, 0)
            logits = torch.randn(1, len(tiny_tokenizer), generator=gen)
            llt.apply_token_bitmask_inplace(logits, mask)
            t = int(torch.multinomial(torch.softmax(logits[0], -1), 1, generator=gen))
            if t == eos:
                break
            assert m.consume_token(t) and len(ids) < 200
            ids.append(t)
        _, (call,) = parse_calls(tiny_tokenizer.decode(ids), fmt, {"double", "halve"})
        assert 0 <= json.loads(call["function"]["arguments"])["n"] <= 9


def test_a_schema_llguidance_cannot_compile_is_a_400_naming_response_format(tiny_tokenizer):
    p = plan(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
        tiny_tokenizer.chat_template,
    )
    with pytest.raises(APIError) as exc:
        Grammars(tiny_tokenizer, len(tiny_tokenizer)).check(p.grammar, "response_format")
    assert exc.value.param == "response_format" and "foo" in exc.value.message


def test_engine_unpacks_llguidance_masks_as_llguidance_applies_them(tiny_tokenizer):
    """The engine applies masks with its own bit unpacking (llguidance's CPU apply was ~100 ms a
    row on a 49k vocabulary): same allowed tokens as llguidance's own, at every step."""
    import llguidance.torch as llt

    from llama_train.serve.sampling import unpack_bitmask as _unpack_bitmask

    vocab = len(tiny_tokenizer) + 37  # logits wider than the tokenizer (padded embeddings), not a multiple of 32
    p = plan({"response_format": {"type": "json_object"}}, tiny_tokenizer.chat_template)
    m = Grammars(tiny_tokenizer, vocab).matcher(p.grammar)
    mask = llt.allocate_token_bitmask(1, vocab)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        llt.fill_next_token_bitmask(m, mask, 0)
        logits = torch.randn(1, vocab, generator=gen)
        ref = logits.clone()
        llt.apply_token_bitmask_inplace(ref, mask)
        mine = logits[0].masked_fill(~_unpack_bitmask(mask[0], vocab), float("-inf"))
        assert torch.equal(mine, ref[0]) and 0 < int(torch.isfinite(mine).sum()) < vocab
        assert m.consume_token(int(mine.argmax()))


@pytest.mark.parametrize(
    "fmt, text",
    [
        (LLAMA_JSON, '{"name": "double", "parameters": {"n": 7, "s": "a}\\"b"}}'),
        (HERMES, '<tool_call>\n{"name": "double", "arguments": {"n": 7, "s": "a}\\"b"}}\n</tool_call>'),
    ],
)
def test_call_stream_sends_name_then_arguments_as_generated(fmt, text):
    """Fed the text a few characters at a time (as tokens arrive), the stream names the function
    once and its argument pieces join to exactly the arguments of the whole response."""
    from llama_train.serve.structured import CallStream

    s = CallStream(fmt)
    names, pieces = [], []
    for end in range(1, len(text) + 1, 3):
        name, piece = s.feed(text[:end])
        names += [name] if name else []
        pieces += [piece] if piece else []
    name, piece = s.feed(text)
    pieces += [piece] if piece else []
    _, (call,) = parse_calls(text, fmt, {"double"})
    assert names == ["double"] and "".join(pieces) == call["function"]["arguments"] == '{"n": 7, "s": "a}\\"b"}'
    assert len(pieces) > 5


@pytest.mark.parametrize(
    "fmt, text",
    [
        (LLAMA_JSON, '{"name": "double", "parameters": {"n": 7, "s": "abcdef'),
        (HERMES, '<tool_call>\n{"name": "double", "arguments": {"n": 7, "s": "abcdef'),
    ],
)
def test_call_stream_cut_short_releases_what_it_held_back(fmt, text):
    """From review: a forced call cut by max_tokens has no closing characters; what the stream
    held back as possibly closing is argument text, and `rest` releases it."""
    from llama_train.serve.structured import CallStream

    s = CallStream(fmt)
    _, piece = s.feed(text)
    assert piece + s.rest(text) == '{"n": 7, "s": "abcdef' and s.rest(text) == ""
    assert CallStream(fmt).rest("no call yet") == ""
