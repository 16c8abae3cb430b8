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
    header = pieces[:first_answer]
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
    tpl = (
        "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="chat template"):
        tokenize_messages(CONV[1:3], tiny_tokenizer, chat_template=tpl)


# ChatML (SmolLM2-135M-Instruct, a real tokenizer from the model catalogue): an assistant turn
# renders as `<|im_start|>assistant\ncontent<|im_end|>\n`; the content and <|im_end|> are trained,
# the "\n" after it is layout and is not.
def test_chatml_labels_spelled_out(smollm2_tokenizer):
    tok = smollm2_tokenizer
    conv = [
        {"role": "user", "content": "Sort: 21"},
        {"role": "assistant", "content": "12"},
        {"role": "user", "content": "Add: 1 + 1"},
        {"role": "assistant", "content": "2"},
    ]
    out = tokenize_messages(conv, tok)
    masked = [
        (p, "-100" if l == IGNORE_INDEX else tok.decode([l]))
        for p, l in zip(_pieces(tok, out["input_ids"]), out["labels"])
    ]
    x = "-100"
    # No system message: SmolLM2's template adds its default system prompt.
    system = [
        "<|im_start|>",
        "system",
        "\n",
        "You",
        " are",
        " a",
        " helpful",
        " AI",
        " assistant",
        " named",
        " Sm",
        "ol",
        "LM",
        ",",
        " trained",
        " by",
        " H",
        "ugging",
        " Face",
        "<|im_end|>",
        "\n",
    ]
    header = ["<|im_start|>", "ass", "istant", "\n"]
    assert masked == [
        *[(p, x) for p in system],
        *[(p, x) for p in ["<|im_start|>", "user", "\n", "Sort", ":", " ", "2", "1", "<|im_end|>", "\n"]],
        *[(p, x) for p in header],
        ("1", "1"),
        ("2", "2"),
        ("<|im_end|>", "<|im_end|>"),
        ("\n", x),  # the "\n" after <|im_end|>: no loss
        *[(p, x) for p in ["<|im_start|>", "user", "\n", "Add", ":", " ", "1", " +", " ", "1", "<|im_end|>", "\n"]],
        *[(p, x) for p in header],
        ("2", "2"),
        ("<|im_end|>", "<|im_end|>"),
        ("\n", x),
    ]


def test_chatml_last_assistant_ends_at_im_end(smollm2_tokenizer):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
    ]
    out = tokenize_messages(conv, smollm2_tokenizer, train_on="last_assistant")
    trained = [smollm2_tokenizer.decode([i]) for i, l in zip(out["input_ids"], out["labels"]) if l != IGNORE_INDEX]
    assert "".join(trained) == "Hello there<|im_end|>"
    assert smollm2_tokenizer.decode(out["input_ids"][-1:]) == "\n"  # rendered, not trained


def test_llama3_turn_ends_at_eot_with_nothing_after(tiny_tokenizer):
    # The tiny tokenizer carries the Llama 3 template: nothing follows <|eot_id|> in a turn, so the
    # last token of the conversation is the last supervised one.
    out = tokenize_messages(CONV, tiny_tokenizer)
    assert tiny_tokenizer.decode(out["input_ids"][-1:]) == "<|eot_id|>"
    assert out["labels"][-1] == out["input_ids"][-1]
