"""Preference pairs (train.objective: dpo): rows → one tokenized pair → a row of two documents.

Accepted rows (data format `preference`; `columns` renames prompt/chosen/rejected):
  conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  text            {"prompt": str, "chosen": str, "rejected": str}   (EOS is appended to each side)

Tokenization follows TRL's DPOTrainer, so the same pair gives the same token ids: the prompt is
rendered with the generation prompt, each side as prompt + completion, and the completion starts
where the tokenized prompt and both tokenized sides stop agreeing.

A pair is stored as ONE training sample of two documents, `prompt+chosen` then `prompt+rejected`
(`doc_lens` = [len chosen side, len rejected side]), labels -100 on the prompt tokens. The
document-boundary mechanism of SFT packing (position ids restarting per document plus a
block-diagonal mask, or the doc_* attention kernels) keeps the two sides, and with data.packing
several pairs in one row, from attending to each other. In a collated batch the documents are
numbered in order, so document 2k is the chosen side and 2k+1 the rejected side of pair k.
"""

from __future__ import annotations

from llama_train.data.chat import IGNORE_INDEX, render_ids
from llama_train.data.formats import RowError

SIDES = ("prompt", "chosen", "rejected")


def _side(row: dict, name: str):
    value = row.get(name)
    if value is None:
        raise RowError("missing_field", f"missing field `{name}`")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RowError("wrong_type", f"`{name}` must be a string or a list of messages, got {type(value).__name__}")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError("wrong_type", f'`{name}[{k}]` must be {{"role": str, "content": str}}')
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _empty(value) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not value or all(not m["content"].strip() for m in value)


def _implicit_prompt(row: dict) -> dict:
    """`chosen` and `rejected` as whole conversations (no `prompt`, or `prompt` as a plain string
    beside them, as in UltraFeedback-style sets): the messages they share are the prompt."""
    c, r = row.get("chosen"), row.get("rejected")
    if not (isinstance(c, list) and isinstance(r, list)) or isinstance(row.get("prompt"), list):
        return row
    n = 0
    while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
        n += 1
    return {**row, "prompt": c[:n], "chosen": c[n:], "rejected": r[n:]} if n else row


def normalize_pair(row) -> dict:
    """A raw row → {prompt, chosen, rejected} (all strings, or all lists of messages). RowError
    categories: missing_field, wrong_type, empty_response (an empty side), identical_pair."""
    if not isinstance(row, dict):
        raise RowError("wrong_type", f"a row must be a JSON object, got {type(row).__name__}")
    row = _implicit_prompt(row)
    pair = {name: _side(row, name) for name in SIDES}
    kinds = {type(v) for v in pair.values()}
    if len(kinds) != 1:
        raise RowError(
            "wrong_type", "`prompt`, `chosen` and `rejected` must all be strings or all be lists of messages"
        )
    for name in SIDES:
        if _empty(pair[name]):
            raise RowError("empty_response", f"`{name}` is empty")
    if isinstance(pair["chosen"], list):
        for name in ("chosen", "rejected"):
            if pair[name][-1]["role"] != "assistant":
                raise RowError("wrong_type", f"`{name}` must end with an assistant message")
    if pair["chosen"] == pair["rejected"]:
        raise RowError("identical_pair", "`chosen` and `rejected` are identical (nothing to prefer)")
    return pair


def is_pair(conv) -> bool:
    return isinstance(conv, dict) and "chosen" in conv and "rejected" in conv


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def pair_token_ids(pair: dict, tokenizer, *, chat_template: str | None = None) -> tuple[list, list, list]:
    """(prompt_ids, chosen_ids, rejected_ids) of a normalized pair, as TRL's DPOTrainer tokenizes it."""
    if isinstance(pair["prompt"], list):
        prompt = render_ids(tokenizer, pair["prompt"], add_generation_prompt=True, chat_template=chat_template)
        full_c = render_ids(tokenizer, pair["prompt"] + pair["chosen"], chat_template=chat_template)
        full_r = render_ids(tokenizer, pair["prompt"] + pair["rejected"], chat_template=chat_template)
    else:
        eos = tokenizer.eos_token
        chosen = pair["chosen"] if pair["chosen"].endswith(eos) else pair["chosen"] + eos
        rejected = pair["rejected"] if pair["rejected"].endswith(eos) else pair["rejected"] + eos
        prompt = list(tokenizer(pair["prompt"]).input_ids)
        full_c = list(tokenizer(pair["prompt"] + chosen).input_ids)
        full_r = list(tokenizer(pair["prompt"] + rejected).input_ids)
    n = min(_common_prefix(prompt, full_c), _common_prefix(prompt, full_r))
    return prompt[:n], full_c[n:], full_r[n:]


def tokenize_pair(pair: dict, tokenizer, *, chat_template: str | None = None) -> dict:
    """{input_ids, labels, doc_lens}: prompt+chosen then prompt+rejected, loss on completions only."""
    prompt, chosen, rejected = pair_token_ids(pair, tokenizer, chat_template=chat_template)
    ids, labels = [], []
    for completion in (chosen, rejected):
        ids += prompt + completion
        side = [IGNORE_INDEX] * len(prompt) + completion
        if not prompt and side:  # nothing precedes it in its document: unscored (as in TRL), and the
            side[0] = IGNORE_INDEX  # rejected side's first token is not predicted from the chosen side
        labels += side
    return {"input_ids": ids, "labels": labels, "doc_lens": [len(prompt) + len(chosen), len(prompt) + len(rejected)]}
