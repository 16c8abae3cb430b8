"""Tool-use conversations in training: the `messages` format's assistant `tool_calls` and `tool`
messages are rendered by the chat template (the tiny model's Llama 3.1-style one), the assistant's
call is supervised, the tool's result and the tool definitions are not; bad calls are counted."""

from __future__ import annotations

import json

import pytest

from llama_train.config import recipe_from_dict
from llama_train.data.chat import IGNORE_INDEX, tokenize_messages
from llama_train.data.dataset import check_data
from llama_train.data.formats import RowError, normalize

from ..conftest import tiny_recipe

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
]
ROW = {
    "tools": TOOLS,
    "messages": [
        {"role": "user", "content": "Add: 2 + 3"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        {"role": "assistant", "content": "7"},  # not the tool's "5": the result must not be a label
    ],
}


def _masked(tok, out):
    return [tok.decode([i]) if l != IGNORE_INDEX else "-100" for i, l in zip(out["input_ids"], out["labels"])]


def test_tool_call_labels_spelled_out(tiny_tokenizer):
    conv = normalize(ROW, "messages")
    assert conv["tools"] == TOOLS
    # OpenAI sends arguments as a JSON string; templates render an object with tojson
    assert conv["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 3}
    out = tokenize_messages(conv["messages"], tiny_tokenizer, tools=conv["tools"])
    masked = _masked(tiny_tokenizer, out)
    trained = [p for p in masked if p != "-100"]
    call = '{"name": "add", "parameters": {"a": 2, "b": 3}}'
    # The call exactly as Llama 3.1 writes it, its end of turn, then the final answer and its end.
    assert "".join(trained[:-3]) == call and trained[-3:] == ["<|eot_id|>", "7", "<|eot_id|>"]
    text = tiny_tokenizer.decode(out["input_ids"])
    # Tool definitions (system turn) and the tool's result (ipython turn) are in the input, untrained.
    assert '"name": "add", "description": "Add two integers"' in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n5<|eot_id|>" in text
    n = masked.index("{")  # everything before the call: the header opening the assistant turn
    assert masked[:n] == ["-100"] * n
    assert tiny_tokenizer.decode(out["input_ids"][:n]).endswith(
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # between the two supervised turns: the ipython turn and the next assistant header, all -100
    end_call = len(masked) - masked[::-1].index("<|eot_id|>", 2) - 1  # the call's <|eot_id|>
    answer = len(masked) - 2
    assert masked[end_call] == "<|eot_id|>" and masked[answer] == "7"
    assert masked[end_call + 1 : answer] == ["-100"] * (answer - end_call - 1)


def test_plain_conversation_renders_as_before(tiny_tokenizer):
    """Without tools, the Llama 3.1-style template renders the Llama 3 layout unchanged."""
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
    ]
    assert tiny_tokenizer.apply_chat_template(conv, tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nok<|eot_id|>"
    )


@pytest.mark.parametrize(
    "call, where",
    [
        ({"type": "function", "function": {"name": "add", "arguments": "{not json"}}, "arguments` is not valid JSON"),
        ({"type": "function", "function": {"name": "add", "arguments": "[1, 2]"}}, "must be a JSON object"),
        ({"type": "function", "function": {"arguments": "{}"}}, "function.name` must be a non-empty string"),
        ({"type": "retrieval", "function": {"name": "add"}}, 'only "function"'),
        ({"name": "add", "arguments": "{}"}, 'must be {"type": "function"'),
    ],
)
def test_malformed_tool_calls_are_their_own_category(call, where):
    row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]}]}
    with pytest.raises(RowError) as exc:
        normalize(row, "messages")
    assert exc.value.category == "malformed_tool_call" and where in str(exc.value)


def test_preflight_counts_malformed_tool_calls(tmp_path, tiny_dir, tiny_tokenizer):
    bad_args = json.loads(json.dumps(ROW))
    bad_args["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"a": 2,'
    on_user = {
        "messages": [
            {"role": "user", "content": "x", "tool_calls": ROW["messages"][1]["tool_calls"]},
            {"role": "assistant", "content": "y"},
        ]
    }
    no_answer = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [ROW, bad_args, on_user, no_answer]) + "\n")
    recipe = recipe_from_dict(
        tiny_recipe(
            tmp_path,
            tiny_dir,
            data={"sources": [{"path": str(path), "format": "messages"}], "seq_len": 1024, "max_dropped_fraction": 1.0},
        )
    )
    data, report = check_data(recipe, tiny_tokenizer)
    assert report["counts"]["malformed_tool_call"] == 2 and report["counts"]["missing_field"] == 1
    assert report["kept"] == 1, (report["counts"], report["examples"])
    assert any("arguments` is not valid JSON" in e for e in report["examples"]["malformed_tool_call"])
    labels = data.train[0]["labels"]
    trained = tiny_tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained == '{"name": "add", "parameters": {"a": 2, "b": 3}}<|eot_id|>7<|eot_id|>'


def test_tool_rows_in_the_eval_file_are_scored_with_tools_and_prompted_as_messages(tmp_path, tiny_dir, tiny_tokenizer):
    train, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text(json.dumps(ROW) + "\n")
    ev.write_text(json.dumps({**ROW, "id": "e1"}) + "\n")
    recipe = recipe_from_dict(
        tiny_recipe(
            tmp_path,
            tiny_dir,
            data={
                "sources": [{"path": str(train), "format": "messages"}],
                "seq_len": 1024,
                "eval": {"path": str(ev), "format": "messages"},
            },
        )
    )
    data, _ = check_data(recipe, tiny_tokenizer)
    # generation prompts (gate, evaluation) get the messages; the loss is computed with the tools
    assert [m["role"] for m in data.eval_rows[0]["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert data.eval[0]["input_ids"] == data.train[0]["input_ids"]  # same row: tools rendered in both
    assert '"description": "Add two integers"' in tiny_tokenizer.decode(data.eval[0]["input_ids"])
