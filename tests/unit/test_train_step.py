"""Optimizer-step numerics: gradient accumulation equivalence, LoRA freezes the base, full FT trains it."""

from __future__ import annotations

import pytest
import torch

from llama_train.config import recipe_from_dict
from llama_train.data.builtin import generate_examples
from llama_train.data.chat import tokenize_messages
from llama_train.data.loader import as_filler, collate, num_supervised
from llama_train.dist import DistContext
from llama_train.model import apply_finetuning, load_base_model, load_tokenizer
from llama_train.parallel import apply_strategy
from llama_train.step import optimizer_step

from ..conftest import tiny_recipe


def _setup(tmp_path, tiny_dir, **sections):
    recipe = recipe_from_dict(tiny_recipe(tmp_path, tiny_dir, **sections))
    tok = load_tokenizer(recipe, str(tiny_dir))
    model = apply_finetuning(load_base_model(recipe.model, str(tiny_dir)), recipe)
    strategy = apply_strategy(model, recipe, DistContext())
    rows = [tokenize_messages(e["messages"], tok) for e in generate_examples(num_examples=24, seed=3)]
    return recipe, tok, strategy, rows


def _batches(rows, tok, size):
    return [collate(rows[i : i + size], pad_id=tok.pad_token_id) for i in range(0, len(rows), size)]


def _trainable(strategy):
    return {n: p.detach().clone() for n, p in strategy.module.named_parameters() if p.requires_grad}


def _record_grads(strategy) -> list[dict]:
    """Wrap the optimizer's step to record the gradients it is about to apply."""
    grads, real_step = [], strategy.optimizer.step

    def step_and_record(*args, **kwargs):
        grads.append({n: p.grad.clone() for n, p in strategy.module.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    strategy.optimizer.step = step_and_record
    return grads


def _assert_grads_close(ga: dict, gb: dict) -> None:
    assert ga and ga.keys() == gb.keys()
    for n in ga:  # tolerance relative to the tensor's scale: summation order differs between kernels
        scale = float(ga[n].abs().max())
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-5 * scale + 1e-12)


@pytest.mark.parametrize("lora", [True, False])
def test_grad_accumulation_equals_one_big_batch(tmp_path, tiny_dir, tiny_tokenizer, lora):
    """4 micro batches of 2 give the same loss, grad norm and gradients as one batch of 8, at each of
    three steps started from the same weights (the real AdamW moves both runs; run B is re-synced to
    run A's weights before every step).

    Adam's update is about sign(g) where a gradient is near zero, so float noise from the summation
    order (which differs between CPU kernel families) becomes an update of +-lr: the updates
    themselves are compared below with plain SGD, whose update is linear in the gradient."""
    sections = {"lora": {"enabled": lora, "dropout": 0.0}, "train": {"max_grad_norm": None, "lr": 1e-3}}
    recipe, tok, big, rows = _setup(tmp_path, tiny_dir, **sections)
    _, _, small, _ = _setup(tmp_path, tiny_dir, **sections)
    g_big, g_small = _record_grads(big), _record_grads(small)
    for step in range(3):
        small.load_trainable_state_dict(_trainable(big))
        chunk = rows[step * 8 : (step + 1) * 8]
        a = optimizer_step(big, _batches(chunk, tok, 8), train=recipe.train)
        b = optimizer_step(small, _batches(chunk, tok, 2), train=recipe.train)
        assert not a.skipped and not b.skipped
        assert a.supervised == b.supervised
        assert a.loss == pytest.approx(b.loss, rel=1e-5)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
        _assert_grads_close(g_big[step], g_small[step])
    assert len(g_big) == len(g_small) == 3


@pytest.mark.parametrize("lora", [True, False])
def test_grad_accumulation_updates_equal_over_steps_with_sgd(tmp_path, tiny_dir, lora):
    """Three unsynchronized steps: the weights of both runs agree afterwards (SGD, so the comparison
    holds on every CPU kernel family; a per-micro-batch mean would move them differently)."""
    sections = {"lora": {"enabled": lora, "dropout": 0.0}, "train": {"max_grad_norm": None, "lr": 1e-2}}
    weights = []
    for size in (8, 2):
        recipe, tok, strategy, rows = _setup(tmp_path, tiny_dir, **sections)
        strategy.optimizer = torch.optim.SGD(
            [p for p in strategy.module.parameters() if p.requires_grad], lr=0.5 if lora else 1e-2
        )
        start = _trainable(strategy)
        for step in range(3):
            optimizer_step(strategy, _batches(rows[step * 8 : (step + 1) * 8], tok, size), train=recipe.train)
        weights.append((start, _trainable(strategy)))
    (start_a, a), (start_b, b) = weights
    for n in a:
        torch.testing.assert_close(start_a[n], start_b[n], rtol=0, atol=0)
        moved = float((a[n] - start_a[n]).abs().max())
        # 0.1% of the tensor's largest move, plus a few float32 roundings of its largest weight
        allowed = 1e-3 * moved + 4 * torch.finfo(torch.float32).eps * float(a[n].abs().max())
        assert float((a[n] - b[n]).abs().max()) <= allowed, n
    assert any(float((a[n] - start_a[n]).abs().max()) > 1e-4 for n in a)


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
        res = optimizer_step(strategy, _batches(rows[step * 8 : (step + 1) * 8], tok, 4), train=recipe.train)
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
    optimizer_step(strategy, _batches(rows[:8], tok, 4), train=recipe.train)
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
    res = optimizer_step(strategy, _batches(rows[:8], tok, 4), train=recipe.train)
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
            micro = [
                collate(real[:2], pad_id=tok.pad_token_id),
                collate([real[2], as_filler(rows[5])], pad_id=tok.pad_token_id),
                collate([as_filler(rows[6]), as_filler(rows[0])], pad_id=tok.pad_token_id),
            ]
        res = optimizer_step(strategy, micro, train=recipe.train)
        results.append((res, _trainable(strategy)))
    (a, wa), (b, wb) = results
    assert a.supervised == b.supervised > 0 and a.tokens == b.tokens
    assert a.loss == pytest.approx(b.loss, rel=1e-6) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=1e-5, atol=1e-6)
