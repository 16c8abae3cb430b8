"""Label masking spelled out token by token on a real chat example."""

from __future__ import annotations

import pytest

from llama_train.data.chat import IGNORE_INDEX, tokenize_messages
from llama_train.errors import DataError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Add: 2 + 3"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Sort: 31"},
    {"role": "assistant", "content": "13"},
]


def _pieces(tok, ids):
    return [tok.decode([i]) for i in ids]


def test_assistant_turns_and_eot_are_the_only_labels(tiny_tokenizer):
    out = tokenize_messages(CONV, tiny_tokenizer, train_on="assistant")
    ids, labels = out["input_ids"], out["labels"]
    trained = [tiny_tokenizer.decode([i]) for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    # Exactly the two answers, each followed by the end-of-turn token the model must learn to emit.
    assert trained == ["5", "<|eot_id|>", "1", "3", "<|eot_id|>"]
    for i, l in zip(ids, labels):
        assert l in (IGNORE_INDEX, i)  # labels are the ids themselves where trained
    pieces = _pieces(tiny_tokenizer, ids)
    # The assistant header and everything the user/system said carry no loss.
    first_answer = pieces.index("5")
    header = pieces[: first_answer]
    assert header[-3:] == ["<|end_header_id|>", "\n", "\n"]
    start = len(header) - 1 - header[::-1].index("<|start_header_id|>")
    assert "".join(header[start + 1 : -3]) == "assistant"
    assert all(l == IGNORE_INDEX for l in labels[:first_answer])
    assert pieces[0] == "<|begin_of_text|>" and labels[0] == IGNORE_INDEX


def test_last_assistant_only(tiny_tokenizer):
    out = tokenize_messages(CONV, tiny_tokenizer, train_on="last_assistant")
    trained = [tiny_tokenizer.decode([i]) for i, l in zip(out["input_ids"], out["labels"]) if l != IGNORE_INDEX]
    assert trained == ["1", "3", "<|eot_id|>"]


def test_all_tokens(tiny_tokenizer):
    out = tokenize_messages(CONV, tiny_tokenizer, train_on="all")
    assert out["labels"] == out["input_ids"]


def test_exact_positions_on_short_example(tiny_tokenizer):
    conv = [{"role": "user", "content": "Sort: 21"}, {"role": "assistant", "content": "12"}]
    out = tokenize_messages(conv, tiny_tokenizer)
    pieces = _pieces(tiny_tokenizer, out["input_ids"])
    masked = [p if l != IGNORE_INDEX else "-100" for p, l in zip(pieces, out["labels"])]
    n = len(pieces)
    assert masked[-3:] == ["1", "2", "<|eot_id|>"]
    assert masked[: n - 3] == ["-100"] * (n - 3)
    assert pieces[n - 6 : n - 3] == ["<|end_header_id|>", "\n", "\n"]


def test_non_prefix_stable_template_is_reported(tiny_tokenizer):
    # A template that renders the last message differently from earlier ones breaks prefix search.
    tpl = ("{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
           "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match="chat template"):
        tokenize_messages(CONV[1:3], tiny_tokenizer, chat_template=tpl)
