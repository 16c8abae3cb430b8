"""Chat template → token ids + labels, with -100 on every token that carries no loss.

Supervised spans are found by rendering the template on growing prefixes of the conversation:
the tokens between `template(messages[:i], add_generation_prompt=True)` and
`template(messages[:i+1])` are assistant turn i, including its end-of-turn token (the model must
learn to stop). The span ends at that end-of-turn token: ChatML renders an assistant turn as
`content<|im_end|>\n`, and the `\n` after `<|im_end|>` is template layout the model never has to
generate (generation stops at `<|im_end|>`), so it carries no loss. This works for any template
whose rendering of a prefix is a prefix of the whole (true for Llama 3.x and ChatML, where special
tokens delimit turns); a template that is not is reported.
"""

from __future__ import annotations

from llama_train.errors import DataError

IGNORE_INDEX = -100
# Tokens that end a turn in the templates we support (Llama 3, ChatML, Phi-style), besides eos.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>")


def end_of_turn_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's end-of-turn tokens: eos and those of END_OF_TURN_TOKENS it has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids.update(token_id(tokenizer, t) for t in END_OF_TURN_TOKENS)
    return ids - {None}


def token_id(tokenizer, token: str) -> int | None:
    """The id of `token` if the vocabulary has it (not the unknown token's id), else None.
    (Not get_vocab(): that builds a dict of the whole vocabulary on every call.)"""
    tid = tokenizer.convert_tokens_to_ids(token)
    return tid if isinstance(tid, int) and tokenizer.convert_ids_to_tokens(tid) == token else None


def render_ids(tokenizer, messages, *, add_generation_prompt=False, chat_template=None) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
        return_dict=True,
    )
    return list(out["input_ids"])


def render_text(tokenizer, messages, *, add_generation_prompt=False, chat_template=None, tools=None) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template, tools=tools
    )


def tokenize_messages(
    messages: list[dict],
    tokenizer,
    *,
    train_on: str = "assistant",
    chat_template: str | None = None,
    tools: list[dict] | None = None,
) -> dict[str, list[int]]:
    """Token ids and labels for one conversation. `train_on`: assistant | last_assistant | all.
    An assistant turn that calls tools is supervised like any assistant turn (the call as the
    template renders it, and its end-of-turn token); `tool` results are context, never trained on.
    `tools`: the function definitions the template renders (OpenAI shape)."""
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    if train_on == "all":
        turns = []
    # One template render per prefix, then one batched tokenizer call (the template supplies the
    # special tokens, as apply_chat_template(tokenize=True) does).
    texts = [render_text(tokenizer, messages, chat_template=chat_template, tools=tools)]
    for i in turns:
        texts.append(
            render_text(tokenizer, messages[:i], add_generation_prompt=True, chat_template=chat_template, tools=tools)
        )
        texts.append(render_text(tokenizer, messages[: i + 1], chat_template=chat_template, tools=tools))
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = list(encoded[0])
    if train_on == "all":
        return {"input_ids": ids, "labels": list(ids)}
    labels = [IGNORE_INDEX] * len(ids)
    eot = end_of_turn_ids(tokenizer)
    for k in range(len(turns)):
        prefix, upto = encoded[1 + 2 * k], encoded[2 + 2 * k]
        start = len(prefix)
        if ids[: len(upto)] != upto or ids[:start] != prefix or start > len(upto):
            raise DataError(
                "the chat template renders a conversation prefix differently from the whole "
                "conversation, so assistant turns cannot be located; set data.chat_template to a "
                "template whose turns are delimited by special tokens (Llama 3 style)"
            )
        end = len(upto)
        last_eot = max((j for j in range(start, end) if ids[j] in eot), default=None)
        if last_eot is not None:  # no loss on the layout after the end-of-turn token (ChatML's "\n")
            end = last_eot + 1
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "labels": labels}


def prompt_ids(messages: list[dict], tokenizer, *, chat_template: str | None = None) -> list[int]:
    """Ids of everything before the last assistant turn, ending with the assistant header."""
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    return render_ids(tokenizer, messages[:last], add_generation_prompt=True, chat_template=chat_template)
