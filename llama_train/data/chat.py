"""Chat template → token ids + labels, with -100 on every token that carries no loss.

Supervised spans are found by rendering the template on growing prefixes of the conversation:
the tokens between `template(messages[:i], add_generation_prompt=True)` and
`template(messages[:i+1])` are assistant turn i, including its end-of-turn token (the model must
learn to stop). This works for any template whose rendering of a prefix is a prefix of the whole
(true for Llama 3.x, where special tokens delimit turns); a template that is not is reported.
"""

from __future__ import annotations

from llama_train.errors import DataError

IGNORE_INDEX = -100


def render_ids(tokenizer, messages, *, add_generation_prompt=False, chat_template=None) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
        return_dict=True,
    )
    return list(out["input_ids"])


def render_text(tokenizer, messages, *, add_generation_prompt=False, chat_template=None) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template)


def tokenize_messages(
    messages: list[dict], tokenizer, *, train_on: str = "assistant", chat_template: str | None = None
) -> dict[str, list[int]]:
    """Token ids and labels for one conversation. `train_on`: assistant | last_assistant | all."""
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    if train_on == "all":
        turns = []
    # One template render per prefix, then one batched tokenizer call (the template supplies the
    # special tokens, as apply_chat_template(tokenize=True) does).
    texts = [render_text(tokenizer, messages, chat_template=chat_template)]
    for i in turns:
        texts.append(render_text(tokenizer, messages[:i], add_generation_prompt=True, chat_template=chat_template))
        texts.append(render_text(tokenizer, messages[: i + 1], chat_template=chat_template))
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = list(encoded[0])
    if train_on == "all":
        return {"input_ids": ids, "labels": list(ids)}
    labels = [IGNORE_INDEX] * len(ids)
    for k in range(len(turns)):
        prefix, upto = encoded[1 + 2 * k], encoded[2 + 2 * k]
        start = len(prefix)
        if ids[: len(upto)] != upto or ids[:start] != prefix or start > len(upto):
            raise DataError(
                "the chat template renders a conversation prefix differently from the whole "
                "conversation, so assistant turns cannot be located; set data.chat_template to a "
                "template whose turns are delimited by special tokens (Llama 3 style)"
            )
        labels[start : len(upto)] = ids[start : len(upto)]
    return {"input_ids": ids, "labels": labels}


def prompt_ids(messages: list[dict], tokenizer, *, chat_template: str | None = None) -> list[int]:
    """Ids of everything before the last assistant turn, ending with the assistant header."""
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    return render_ids(tokenizer, messages[:last], add_generation_prompt=True, chat_template=chat_template)
