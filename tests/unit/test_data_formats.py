"""Every format → conversation → token ids and labels, spelled out on the tiny tokenizer
("-100" marks a position without loss; other entries are the token the label trains)."""

from __future__ import annotations

import pytest

from llama_train.data.chat import IGNORE_INDEX
from llama_train.data.formats import RowError, normalize
from llama_train.data.pipeline import tokenize_sample

M = "-100"
USER_HEADER = ["<|start_header_id|>", "user", "<|end_header_id|>", "\n", "\n"]
ASSISTANT_HEADER = ["<|start_header_id|>", "a", "ss", "istant", "<|end_header_id|>", "\n", "\n"]


def _run(tok, row, fmt, train_on="assistant"):
    out = tokenize_sample(normalize(row, fmt), tok, train_on=train_on, chat_template=None)
    pieces = [tok.decode([i]) for i in out["input_ids"]]
    masked = [p if lab != IGNORE_INDEX else M for p, lab in zip(pieces, out["labels"])]
    for i, lab in zip(out["input_ids"], out["labels"]):
        assert lab in (IGNORE_INDEX, i)
    return pieces, masked


def test_completion_labels(tiny_tokenizer):
    pieces, masked = _run(tiny_tokenizer, {"prompt": "Sort: 21", "completion": "12"}, "completion")
    assert pieces == (
        ["<|begin_of_text|>"]
        + USER_HEADER
        + ["Sort", ":", " ", "2", "1", "<|eot_id|>"]
        + ASSISTANT_HEADER
        + ["1", "2", "<|eot_id|>"]
    )
    assert masked == [M] * 19 + ["1", "2", "<|eot_id|>"]


def test_alpaca_labels_join_instruction_and_input(tiny_tokenizer):
    pieces, masked = _run(tiny_tokenizer, {"instruction": "Add", "input": "2 + 3", "output": "5"}, "alpaca")
    assert pieces == (
        ["<|begin_of_text|>"]
        + USER_HEADER
        + ["Add", "\n", "\n", "2", " +", " ", "3", "<|eot_id|>"]
        + ASSISTANT_HEADER
        + ["5", "<|eot_id|>"]
    )
    assert masked == [M] * 21 + ["5", "<|eot_id|>"]
    # `input` is optional
    pieces, masked = _run(tiny_tokenizer, {"instruction": "Add", "output": "5"}, "alpaca")
    assert pieces[6:8] == ["Add", "<|eot_id|>"] and masked[-2:] == ["5", "<|eot_id|>"]


def test_sharegpt_labels_equal_completion_labels(tiny_tokenizer):
    row = {"conversations": [{"from": "human", "value": "Sort: 21"}, {"from": "gpt", "value": "12"}]}
    assert _run(tiny_tokenizer, row, "sharegpt") == _run(
        tiny_tokenizer, {"prompt": "Sort: 21", "completion": "12"}, "completion"
    )


CONV = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add: 2 + 3"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Sort: 31"},
        {"role": "assistant", "content": "13"},
    ]
}


@pytest.mark.parametrize(
    "train_on, trained",
    [
        ("assistant", [(37, "5"), (38, "<|eot_id|>"), (57, "1"), (58, "3"), (59, "<|eot_id|>")]),
        ("last_assistant", [(57, "1"), (58, "3"), (59, "<|eot_id|>")]),
    ],
)
def test_multi_turn_messages_with_system(tiny_tokenizer, train_on, trained):
    pieces, masked = _run(tiny_tokenizer, CONV, "messages", train_on)
    assert len(pieces) == 60
    assert pieces[:8] == ["<|begin_of_text|>", "<|start_header_id|>", "s", "yst", "em", "<|end_header_id|>", "\n", "\n"]
    assert pieces[30:37] == ASSISTANT_HEADER
    assert [(i, p) for i, p in enumerate(masked) if p != M] == trained


def test_train_on_all_and_text(tiny_tokenizer):
    pieces, masked = _run(tiny_tokenizer, CONV, "messages", "all")
    assert masked == pieces
    # Text (continued pre-training): every token trained, EOS appended so the model learns to stop.
    pieces, masked = _run(tiny_tokenizer, {"text": "the lazy dog"}, "text", "assistant")
    assert pieces == masked == ["t", "he", " lazy", " dog", "<|eot_id|>"]


@pytest.mark.parametrize(
    "row, fmt, category",
    [
        ({"id": 1}, "messages", "missing_field"),
        ({"messages": "hi"}, "messages", "wrong_type"),
        ({"messages": []}, "messages", "missing_field"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages", "wrong_type"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "wrong_type"),
        ({"messages": [{"role": "user"}]}, "messages", "missing_field"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
            "messages",
            "empty_response",
        ),
        ({"instruction": "x"}, "alpaca", "missing_field"),
        ({"instruction": "x", "output": ""}, "alpaca", "empty_response"),
        ({"prompt": "x", "completion": 5}, "completion", "wrong_type"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "wrong_type"),
        ({"text": ""}, "text", "empty_response"),
        ([1, 2], "text", "wrong_type"),
    ],
)
def test_bad_rows_are_categorized(row, fmt, category):
    with pytest.raises(RowError) as exc:
        normalize(row, fmt)
    assert exc.value.category == category
