"""Optimizer-step numerics: gradient accumulation equivalence, LoRA freezes the base, full FT trains it."""

from __future__ import annotations

import pytest
import torch

from llama_train.config import recipe_from_dict
from llama_train.data.builtin import generate_examples
from llama_train.data.chat import tokenize_messages
from llama_train.data.loader import as_filler, collate, num_supervised
from llama_train.model import apply_finetuning, load_base_model, load_tokenizer
from llama_train.parallel import DistContext, apply_strategy
from llama_train.trainer import optimizer_step

from ..conftest import tiny_recipe


def _setup(tmp_path, tiny_dir, **sections):
    recipe = recipe_from_dict(tiny_recipe(tmp_path, tiny_dir, **sections))
    tok = load_tokenizer(recipe, str(tiny_dir))
    model = apply_finetuning(load_base_model(recipe, str(tiny_dir)), recipe)
    strategy = apply_strategy(model, recipe, DistContext())
    rows = [tokenize_messages(e["messages"], tok) for e in generate_examples(num_examples=24, seed=3)]
    return recipe, tok, strategy, rows


def _batches(rows, tok, size):
    return [collate(rows[i : i + size], pad_id=tok.pad_token_id) for i in range(0, len(rows), size)]


def _trainable(strategy):
    return {n: p.detach().clone() for n, p in strategy.module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [True, False])
def test_grad_accumulation_equals_one_big_batch(tmp_path, tiny_dir, tiny_tokenizer, lora):
    """4 micro batches of 2 give the same gradients (hence the same update) as one batch of 8."""
    results = {}
    for name, size in (("one_batch_of_8", 8), ("four_micro_batches_of_2", 2)):
        recipe, tok, strategy, rows = _setup(tmp_path, tiny_dir, lora={"enabled": lora, "dropout": 0.0},
                                             train={"max_grad_norm": None, "lr": 1e-3})
        grads, steps = [], []
        real_step = strategy.optimizer.step

        def step_and_record(*args, **kwargs):  # observe the gradients the optimizer is about to apply
            grads.append({n: p.grad.clone() for n, p in strategy.module.named_parameters() if p.grad is not None})
            return real_step(*args, **kwargs)

        strategy.optimizer.step = step_and_record
        for step in range(3):
            chunk = rows[step * 8 : (step + 1) * 8]
            steps.append(optimizer_step(strategy, _batches(chunk, tok, size), recipe=recipe))
        results[name] = (steps, grads, _trainable(strategy))
    (a_steps, a_g, a_w), (b_steps, b_g, b_w) = results["one_batch_of_8"], results["four_micro_batches_of_2"]
    for a, b in zip(a_steps, b_steps):
        assert a.supervised == b.supervised
        assert a.loss == pytest.approx(b.loss, rel=1e-5, abs=1e-6)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5, abs=1e-7)
    assert len(a_g) == len(b_g) == 3 and a_g[0]
    for ga, gb in zip(a_g, b_g):
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-5)
    for n in a_w:  # after three AdamW steps the weights agree too
        torch.testing.assert_close(a_w[n], b_w[n], rtol=1e-4, atol=1e-4)


def test_mean_of_micro_batch_means_would_differ(tmp_path, tiny_dir, tiny_tokenizer):
    """The rows have different supervised-token counts, so the test above can fail: the naive mean of
    per-micro-batch means is a different number from the per-token mean over the step."""
    rows = [tokenize_messages(e["messages"], tiny_tokenizer) for e in generate_examples(num_examples=8, seed=3)]
    counts = [num_supervised(b) for b in _batches(rows, tiny_tokenizer, 2)]
    assert len(set(counts)) > 1


def test_lora_leaves_base_bit_identical(tmp_path, tiny_dir):
    recipe, tok, strategy, rows = _setup(tmp_path, tiny_dir, train={"lr": 1e-2})
    before = {n: p.detach().clone() for n, p in strategy.module.named_parameters()}
    for step in range(2):
        res = optimizer_step(strategy, _batches(rows[step * 8 : (step + 1) * 8], tok, 4), recipe=recipe)
        assert not res.skipped
    changed = frozen_changed = 0
    for n, p in strategy.module.named_parameters():
        if "lora_" in n:
            changed += not torch.equal(before[n], p)
        else:
            assert not p.requires_grad
            frozen_changed += not torch.equal(before[n], p)
    assert changed > 0 and frozen_changed == 0


def test_full_finetuning_changes_base_weights(tmp_path, tiny_dir):
    recipe, tok, strategy, rows = _setup(tmp_path, tiny_dir, lora={"enabled": False}, train={"lr": 1e-3})
    before = {n: p.detach().clone() for n, p in strategy.module.named_parameters()}
    optimizer_step(strategy, _batches(rows[:8], tok, 4), recipe=recipe)
    names = [n for n, p in strategy.module.named_parameters() if not torch.equal(before[n], p)]
    assert any("q_proj" in n for n in names) and any("embed_tokens" in n for n in names)
    assert len(names) == len(before)


def test_nan_loss_skips_the_update(tmp_path, tiny_dir):
    recipe, tok, strategy, rows = _setup(tmp_path, tiny_dir)
    before = _trainable(strategy)
    lora_a = next(p for n, p in strategy.module.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        saved = lora_a.clone()
        lora_a[0, 0] = float("nan")
    res = optimizer_step(strategy, _batches(rows[:8], tok, 4), recipe=recipe)
    assert res.skipped and res.bad_ranks == [0]
    with torch.no_grad():
        lora_a.copy_(saved)
    after = _trainable(strategy)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_filler_rows_change_nothing(tmp_path, tiny_dir):
    """The short last step of an epoch is topped up with filler rows (labels masked): loss, grad norm,
    supervised and counted tokens, and the update equal those of the real rows alone."""
    results = []
    for with_fillers in (False, True):
        recipe, tok, strategy, rows = _setup(tmp_path, tiny_dir, lora={"dropout": 0.0}, train={"lr": 1e-3})
        real = rows[:3]
        micro = [collate(real[:2], pad_id=tok.pad_token_id), collate(real[2:], pad_id=tok.pad_token_id)]
        if with_fillers:  # same shapes as a full step of 2 x 2, the 4th row and a whole micro batch filler
            micro = [collate(real[:2], pad_id=tok.pad_token_id),
                     collate([real[2], as_filler(rows[5])], pad_id=tok.pad_token_id),
                     collate([as_filler(rows[6]), as_filler(rows[0])], pad_id=tok.pad_token_id)]
        res = optimizer_step(strategy, micro, recipe=recipe)
        results.append((res, _trainable(strategy)))
    (a, wa), (b, wb) = results
    assert a.supervised == b.supervised > 0 and a.tokens == b.tokens
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=1e-5, atol=1e-6)
