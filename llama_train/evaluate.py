"""Held-out evaluation: token loss and the task metric (exact match / contains) by greedy decoding."""

from __future__ import annotations

import contextlib
import math

import torch

from llama_train.attention import resolve as resolve_attention
from llama_train.data.chat import end_of_turn_ids, prompt_ids, token_id
from llama_train.data.loader import MODEL_INPUTS, collate
from llama_train.dpo import eval_preferences
from llama_train.model import DTYPES
from llama_train.tracking.params import eval_metrics


@torch.no_grad()
def eval_loss(model, rows: list[dict], *, pad_id: int, batch_size: int, device) -> float:
    """Mean token loss; `model` is the (possibly DDP/FSDP-wrapped) TrainModule."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i : i + batch_size], pad_id=pad_id)
        loss_sum, n = model(**{k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS})
        total += float(loss_sum)
        count += int(n)
    model.train(was_training)
    return total / max(count, 1)


def stop_token_ids(tokenizer) -> list[int]:
    """eos, the end-of-turn tokens of the chat templates we support, and Llama 3's end of text."""
    return sorted((end_of_turn_ids(tokenizer) | {token_id(tokenizer, "<|end_of_text|>")}) - {None})


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    max_new_tokens: int,
    batch_size: int,
    device,
    chat_template: str | None = None,
) -> list[str]:
    """Greedy answers for the last assistant turn of each conversation (left-padded batches).
    `model` is anything with HF `generate` (a TrainModule, possibly inside DDP)."""
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    out: list[str] = []
    for i in range(0, len(conversations), batch_size):
        prompts = [prompt_ids(c, tokenizer, chat_template=chat_template) for c in conversations[i : i + batch_size]]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=stop_token_ids(tokenizer),
        )
        for row in gen[:, width:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return out


def score(predictions: list[str], references: list[str], metric: str = "exact_match") -> float:
    if not references:
        return float("nan")
    if metric == "contains":
        hits = sum(r.strip() in p for p, r in zip(predictions, references))
    else:
        hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return hits / len(references)


def evaluate(model, tokenizer, tok_eval: list[dict], eval_rows: list[dict], *, recipe, device) -> dict:
    """{'loss', 'perplexity', 'exact_match', 'num_samples'} on the held-out rows."""
    bs = max(recipe.train.micro_batch_size, 16)
    loss = eval_loss(model, tok_eval, pad_id=tokenizer.pad_token_id, batch_size=bs, device=device)
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num_samples": len(tok_eval)}
    convs = [r["messages"] for r in eval_rows if r.get("messages")]
    if convs:
        preds = generate_answers(
            model,
            tokenizer,
            convs,
            max_new_tokens=recipe.data.eval.max_new_tokens,
            batch_size=bs,
            device=device,
            chat_template=recipe.data.chat_template,
        )
        refs = [c[-1]["content"] for c in convs]
        result[recipe.gate.metric] = score(preds, refs, recipe.gate.metric)
        if recipe.gate.metric != "exact_match":
            result["exact_match"] = score(preds, refs, "exact_match")
        result["examples"] = [
            {"prompt": c[-2]["content"] if len(c) > 1 else "", "reference": r, "prediction": p}
            for c, r, p in list(zip(convs, refs, preds))[:5]
        ]
    return result


def eager(compiled: bool):
    """Evaluation and generation run the compiled layers eagerly (train.compile): their shapes
    (padded eval batches, a growing KV cache) would each cost a compilation."""
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


def evaluate_objective(model, tokenizer, tok_eval: list[dict], eval_rows: list[dict], *, recipe, device) -> dict:
    """The held-out evaluation of train.objective, before and after training: `evaluate` for sft;
    for dpo the preference accuracy and reward margin of the held-out pairs."""
    if recipe.train.objective == "dpo":
        return eval_preferences(
            model,
            tok_eval,
            pad_id=tokenizer.pad_token_id,
            batch_size=recipe.train.micro_batch_size,
            device=device,
            attn_implementation=resolve_attention(recipe.model.attn_implementation),
            mask_dtype=DTYPES[recipe.model.dtype],
        )
    return evaluate(model, tokenizer, tok_eval, eval_rows, recipe=recipe, device=device)


def evaluate_during(model, tokenizer, tok_eval: list[dict], *, recipe, device) -> dict[str, float]:
    """The `eval/*` metrics every train.eval_every_n_steps: for sft the loss and perplexity only
    (generation waits for the end), for dpo the whole preference evaluation."""
    if recipe.train.objective == "dpo":
        return eval_metrics(evaluate_objective(model, tokenizer, tok_eval, [], recipe=recipe, device=device))
    bs = max(recipe.train.micro_batch_size, 16)
    ev = eval_loss(model, tok_eval, pad_id=tokenizer.pad_token_id, batch_size=bs, device=device)
    return {"eval/loss": ev, "eval/perplexity": math.exp(min(ev, 50.0))}


def format_eval(ev: dict) -> str:
    """One line for the log: the loss and the objective's headline numbers."""
    parts = [f"loss {ev['loss']:.4f}"]
    if "preference_accuracy" in ev:
        parts += [f"preference accuracy {ev['preference_accuracy']:.3f}", f"reward margin {ev['reward_margin']:.4f}"]
    if "exact_match" in ev:
        parts.append(f"exact_match {ev['exact_match']:.3f}")
    return ", ".join(parts) + f" on {ev['num_samples']} rows"
