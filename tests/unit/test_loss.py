"""chunked_cross_entropy / causal_lm_loss equal the naive full-logits loss and its gradients."""

import pytest
import torch
import torch.nn.functional as F

from llama_train.loss import causal_lm_loss, chunked_cross_entropy

IGNORE = -100


def _naive(hidden, weight, labels):
    logits = hidden @ weight.T
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")


def _inputs(n=37, h=16, v=101, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = IGNORE  # every 5th token is a prompt token (-100: no loss, no gradient)
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, scale=1.0):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w, labels)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def _assert_close(a, b, rtol):
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=rtol * b.float().abs().max().item())


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 8, 10, 37, 1000])  # 8, 10 do not divide N=37
def test_fp32_matches_naive(chunk_size, recompute):
    hidden, weight, labels = _inputs()
    ref = _loss_and_grads(_naive, hidden, weight, labels, scale=0.5)
    got = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_size=chunk_size, recompute=recompute),
        hidden,
        weight,
        labels,
        scale=0.5,  # a non-unit upstream gradient must be applied
    )
    assert got[0].dtype == torch.float32 and got[0].ndim == 0
    for a, b in zip(got, ref):
        _assert_close(a, b, rtol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_bf16_hidden_matches_naive(recompute):
    hidden, weight, labels = _inputs(n=64, h=32, v=257, dtype=torch.bfloat16)
    ref = _loss_and_grads(_naive, hidden, weight, labels)
    got = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_size=16, recompute=recompute),
        hidden,
        weight,
        labels,
    )
    assert got[0].dtype == torch.float32
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
    _assert_close(got[0], ref[0], rtol=1e-5)  # same bf16 logits, fp32 reduction
    _assert_close(got[1], ref[1], rtol=2e-2)
    _assert_close(got[2], ref[2], rtol=2e-2)


@pytest.mark.parametrize("recompute", [False, True])
def test_all_ignored_chunk_gives_zero_loss_and_grad_there(recompute):
    hidden, weight, labels = _inputs(n=24)
    labels[8:16] = IGNORE  # the whole second chunk of 8
    loss, gh, gw = _loss_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_size=8, recompute=recompute), hidden, weight, labels
    )
    ref = _loss_and_grads(_naive, hidden, weight, labels)
    assert torch.count_nonzero(gh[8:16]) == 0
    for a, b in zip((loss, gh, gw), ref):
        _assert_close(a, b, rtol=1e-5)


def test_everything_ignored_is_zero():
    hidden, weight, labels = _inputs(n=9)
    labels[:] = IGNORE
    loss, gh, gw = _loss_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_size=4), hidden, weight, labels)
    assert loss.item() == 0.0 and torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


def test_frozen_weight_gets_no_grad_and_hidden_still_does():
    hidden, weight, labels = _inputs()
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone()  # frozen head (LoRA)
    chunked_cross_entropy(h, w, labels, chunk_size=8).backward()
    assert w.grad is None and h.grad is not None


def test_bad_shapes_raise():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="shape mismatch"):
        chunked_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, weight, labels, chunk_size=0)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).float()


def _hf_loss_sum(model, input_ids, labels):
    logits = model(input_ids=input_ids, use_cache=False).logits.float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def test_causal_lm_loss_matches_hf_full_finetune():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 97, (2, 11), generator=g)
    labels = input_ids.clone()
    labels[:, :4] = IGNORE  # prompt tokens
    ref = _hf_loss_sum(model, input_ids, labels)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss, num_tokens = causal_lm_loss(model, input_ids, labels, chunk_size=5)
    loss.backward()
    assert num_tokens == int((labels[:, 1:] != IGNORE).sum())
    _assert_close(loss, ref, rtol=1e-5)
    for n, p in model.named_parameters():
        _assert_close(p.grad, ref_grads[n], rtol=1e-4)
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_causal_lm_loss_through_peft_wrapper():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        _tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    input_ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    labels = input_ids.clone()
    ref = _hf_loss_sum(model, input_ids, labels)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    loss, num_tokens = causal_lm_loss(model, input_ids, labels, chunk_size=3)
    loss.backward()
    assert num_tokens == 8
    _assert_close(loss, ref, rtol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            _assert_close(p.grad, ref_grads[n], rtol=1e-4)


def test_under_cpu_autocast():
    hidden, weight, labels = _inputs(n=20, h=16, v=50, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, gh, gw = _loss_and_grads(
            lambda h, w, y: chunked_cross_entropy(h, w, y, chunk_size=6), hidden, weight, labels
        )
    ref = _loss_and_grads(_naive, hidden, weight, labels)
    _assert_close(loss, ref[0], rtol=1e-5)
    _assert_close(gh, ref[1], rtol=2e-2)
