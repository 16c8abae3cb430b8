"""DPO (train.objective: dpo): loss and metrics equal TRL's DPOTrainer on the same model, pairs and
beta; pair rows keep their sides apart (packed or not); gradient accumulation equals one batch."""

from __future__ import annotations

import pytest
import torch

from llama_train.data.loader import MODEL_INPUTS, collate
from llama_train.data.preference import normalize_pair, pair_token_ids, tokenize_pair
from llama_train.dpo import STAT_NAMES, DPOModule, step_metrics

PAIRS = [
    {
        "prompt": [{"role": "user", "content": "Reverse: a b c"}],
        "chosen": [{"role": "assistant", "content": "c b a"}],
        "rejected": [{"role": "assistant", "content": "a b c"}],
    },
    {
        "prompt": [{"role": "user", "content": "Add: 12 + 30"}],
        "chosen": [{"role": "assistant", "content": "42"}],
        "rejected": [{"role": "assistant", "content": "43 and some more words"}],
    },
    {
        "prompt": [{"role": "user", "content": "Sort: 93172"}],
        "chosen": [{"role": "assistant", "content": "12379"}],
        "rejected": [{"role": "assistant", "content": "97321"}],
    },
    {
        "prompt": [{"role": "user", "content": "Reverse: x y"}],
        "chosen": [{"role": "assistant", "content": "y x"}],
        "rejected": [{"role": "assistant", "content": "x y x y"}],
    },
]
TEXT_PAIRS = [
    {"prompt": "Add: 1 + 2 =", "chosen": " 3", "rejected": " 4"},
    {"prompt": "Reverse: a b =", "chosen": " b a", "rejected": " a b a"},
]


def _policy(tiny_dir, seed=0):
    """The tiny Llama with a LoRA adapter whose B is random (policy != reference from the start)."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="sdpa")
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(base, cfg)


def _ours(model, rows, *, beta, loss="sigmoid", ls=0.0, pad_id=0):
    module = DPOModule(model, beta=beta, loss=loss, label_smoothing=ls)
    batch = collate(rows, pad_id=pad_id, pairs=True)
    loss_sum, stats = module(**{k: v for k, v in batch.items() if k in MODEL_INPUTS})
    stats = [float(x) for x in stats]
    return loss_sum / stats[0], step_metrics(stats), stats[0]


def _trl(model, tokenizer, pairs, *, beta, loss_type, tmp_path):
    import datasets
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=beta,
        loss_type=[loss_type],
        report_to=[],
        per_device_train_batch_size=len(pairs),
        max_length=None,
        use_cpu=True,
        dataset_num_proc=None,
        logging_steps=1,
    )
    ds = datasets.Dataset.from_list(pairs)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    # Given a PeftModel, TRL copies its adapter as the reference ("ref"); without that copy its reference
    # is the base with adapters disabled, as ours (the adapter here is random, not a fresh zero one).
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
    assert trainer.model.active_adapter == "default"
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, inputs, False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return trainer, float(loss.detach()), metrics


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("pairs", [PAIRS, TEXT_PAIRS], ids=["conversational", "text"])
def test_loss_and_metrics_equal_trl(tmp_path, tiny_dir, tiny_tokenizer, loss_type, pairs):
    beta = 0.3
    model = _policy(tiny_dir)
    trainer, trl_loss, trl = _trl(model, tiny_tokenizer, pairs, beta=beta, loss_type=loss_type, tmp_path=tmp_path)
    # the same token ids as TRL's preprocessing
    for i, pair in enumerate(pairs):
        ref = trainer.train_dataset[i]
        assert pair_token_ids(normalize_pair(pair), tiny_tokenizer) == (
            ref["prompt_ids"],
            ref["chosen_ids"],
            ref["rejected_ids"],
        )
    rows = [tokenize_pair(normalize_pair(p), tiny_tokenizer) for p in pairs]
    ours_loss, ours, n = _ours(trainer.model, rows, beta=beta, loss=loss_type, pad_id=tiny_tokenizer.pad_token_id)
    assert n == len(pairs)
    assert abs(float(ours_loss) - trl_loss) <= 1e-5, (float(ours_loss), trl_loss)
    for name in STAT_NAMES[1:-1]:
        assert abs(ours[name] - trl[name]) <= 1e-5, (name, ours[name], trl[name])
    # the adapter made the policy differ from the reference: the comparison is not of zeros
    assert abs(trl["rewards/margins"]) > 1e-4 and trl_loss != pytest.approx(0.6931, abs=1e-3)


def test_label_smoothing_is_conservative_dpo(tiny_dir, tiny_tokenizer):
    """e > 0 mixes the flipped-label loss in: (1-e) * l(m) + e * l(-m), l = -logsigmoid(beta m)."""
    model = _policy(tiny_dir)
    rows = [tokenize_pair(normalize_pair(p), tiny_tokenizer) for p in PAIRS]
    plain, m, _ = _ours(model, rows, beta=0.5)
    smoothed, _, _ = _ours(model, rows, beta=0.5, ls=0.2)
    module = DPOModule(model, beta=0.5, loss="sigmoid", label_smoothing=0.0)
    batch = collate(rows, pad_id=tiny_tokenizer.pad_token_id, pairs=True)
    from llama_train.dpo import completion_logps

    with torch.no_grad():
        with model.disable_adapter():
            ref, counts = completion_logps(
                model,
                batch["input_ids"],
                batch["labels"],
                batch["doc_ids"],
                num_docs=8,
                position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"],
            )
        pol, _ = completion_logps(
            model,
            batch["input_ids"],
            batch["labels"],
            batch["doc_ids"],
            num_docs=8,
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
        )
    margin = (pol[0::2] - ref[0::2]) - (pol[1::2] - ref[1::2])
    f = torch.nn.functional.logsigmoid
    expected = (-(0.8) * f(0.5 * margin) - 0.2 * f(-0.5 * margin)).mean()
    assert float(smoothed) == pytest.approx(float(expected), abs=1e-6)
    assert float(plain) == pytest.approx(float(-f(0.5 * margin).mean()), abs=1e-6)
    assert module.label_smoothing == 0.0 and m["rewards/accuracies"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_pair_sides_isolated_packed_equals_unpacked(tiny_dir, tiny_tokenizer):
    """Two pairs packed in one row (4 documents) give the log-probs of each side run alone."""
    import pyarrow as pa

    from llama_train.data.packing import pack_table

    model = _policy(tiny_dir)
    rows = [tokenize_pair(normalize_pair(p), tiny_tokenizer) for p in PAIRS]
    table = pa.table(
        {
            "input_ids": [r["input_ids"] for r in rows],
            "labels": [r["labels"] for r in rows],
            "id": [str(i) for i in range(len(rows))],
            "doc_lens": [r["doc_lens"] for r in rows],
        }
    )
    packed = pack_table(table, [[0, 1], [2, 3]]).to_pylist()
    assert [len(r["doc_lens"]) for r in packed] == [4, 4] and packed[0]["ids"] == ["0", "1"]
    a_loss, a, _ = _ours(model, rows, beta=0.2, pad_id=tiny_tokenizer.pad_token_id)
    b_loss, b, n = _ours(model, packed, beta=0.2, pad_id=tiny_tokenizer.pad_token_id)
    assert n == 4
    torch.testing.assert_close(b_loss, a_loss, rtol=1e-5, atol=1e-6)
    for k in a:
        assert b[k] == pytest.approx(a[k], abs=1e-5)
    # every side's completion log-prob in the packed rows equals that side run alone
    from llama_train.dpo import completion_logps

    batch = collate(packed, pad_id=tiny_tokenizer.pad_token_id, pairs=True)
    with torch.no_grad():
        in_rows, counts = completion_logps(
            model,
            batch["input_ids"],
            batch["labels"],
            batch["doc_ids"],
            num_docs=8,
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        )
        alone = []
        for row in rows:
            a = row["doc_lens"][0]
            for lo, hi in ((0, a), (a, len(row["input_ids"]))):
                ids, labels = torch.tensor([row["input_ids"][lo:hi]]), torch.tensor([row["labels"][lo:hi]])
                alone.append(float(completion_logps(model, ids, labels, torch.zeros_like(ids), num_docs=1)[0][0]))
    torch.testing.assert_close(in_rows, torch.tensor(alone), rtol=1e-5, atol=1e-5)
    assert all(c > 0 for c in counts.tolist())


def test_filler_pairs_count_for_nothing(tiny_dir, tiny_tokenizer):
    from llama_train.data.loader import as_filler

    model = _policy(tiny_dir)
    rows = [tokenize_pair(normalize_pair(p), tiny_tokenizer) for p in PAIRS]
    loss, m, n = _ours(model, rows[:2], beta=0.2, pad_id=tiny_tokenizer.pad_token_id)
    loss_f, m_f, n_f = _ours(model, rows[:2] + [as_filler(rows[2])], beta=0.2, pad_id=tiny_tokenizer.pad_token_id)
    batch = collate(rows[:2] + [as_filler(rows[2])], pad_id=tiny_tokenizer.pad_token_id, pairs=True)
    assert batch["num_pairs"] == 2 and n == n_f == 2
    torch.testing.assert_close(loss_f, loss, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_equals_one_batch(tmp_path, tiny_dir):
    """4 pairs in one micro batch vs 2 micro batches of 2 vs 4 of 1: the same loss, metrics and
    gradients (the adapter starts from the same random B, so the policy differs from the reference)."""
    from llama_train.config import recipe_from_dict
    from llama_train.data.dataset import load_data
    from llama_train.dist import DistContext
    from llama_train.model import apply_finetuning, load_base_model, load_tokenizer
    from llama_train.parallel import apply_strategy
    from llama_train.step import optimizer_step
    from tests.conftest import tiny_recipe
    from tests.unit.test_train_step import _assert_grads_close, _record_grads

    grads, losses, metrics = [], [], []
    for mb, accum in ((4, 1), (2, 2), (1, 4)):
        recipe = recipe_from_dict(
            tiny_recipe(
                tmp_path,
                tiny_dir,
                train={"objective": "dpo", "micro_batch_size": mb, "grad_accum_steps": accum},
                data={
                    "sources": [{"path": "builtin:preferences", "format": "preference"}],
                    "builtin": {"num_train": 8, "num_eval": 2},
                    "seq_len": 96,
                },
            )
        )
        tok = load_tokenizer(recipe, str(tiny_dir))
        data = load_data(recipe, tok)
        model = apply_finetuning(load_base_model(recipe.model, str(tiny_dir)), recipe)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in sorted(model.named_parameters()):
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        strategy = apply_strategy(model, recipe, DistContext())
        recorded = _record_grads(strategy)
        rows = [data.train[i] for i in range(4)]
        micro = [collate(rows[i : i + mb], pad_id=tok.pad_token_id, pairs=True) for i in range(0, 4, mb)]
        res = optimizer_step(strategy, micro, train=recipe.train)
        losses.append(res.loss)
        metrics.append(res.metrics)
        grads.append(recorded[0])
    for g, loss, m in zip(grads[1:], losses[1:], metrics[1:]):
        _assert_grads_close(grads[0], g)
        assert loss == pytest.approx(losses[0], abs=1e-5)
        for k in m:
            assert m[k] == pytest.approx(metrics[0][k], abs=1e-5)
    assert losses[0] != pytest.approx(0.6931, abs=1e-4) and metrics[0]["rewards/margins"] != 0


def test_nonfinite_dpo_step_is_skipped(tmp_path, tiny_dir):
    """The non-finite guard holds for DPO: a NaN loss skips the update (no parameter moves)."""
    from llama_train.config import recipe_from_dict
    from llama_train.data.dataset import load_data
    from llama_train.dist import DistContext
    from llama_train.model import apply_finetuning, load_base_model, load_tokenizer
    from llama_train.parallel import apply_strategy
    from llama_train.step import optimizer_step
    from tests.conftest import tiny_recipe

    recipe = recipe_from_dict(
        tiny_recipe(
            tmp_path,
            tiny_dir,
            train={"objective": "dpo", "micro_batch_size": 2},
            data={
                "sources": [{"path": "builtin:preferences", "format": "preference"}],
                "builtin": {"num_train": 4, "num_eval": 2},
                "seq_len": 96,
            },
        )
    )
    tok = load_tokenizer(recipe, str(tiny_dir))
    data = load_data(recipe, tok)
    strategy = apply_strategy(
        apply_finetuning(load_base_model(recipe.model, str(tiny_dir)), recipe), recipe, DistContext()
    )
    micro = [collate([data.train[0], data.train[1]], pad_id=tok.pad_token_id, pairs=True)]
    before = {n: p.detach().clone() for n, p in strategy.module.named_parameters() if p.requires_grad}
    res = optimizer_step(strategy, micro, train=recipe.train, inject_nan=True)
    assert res.skipped and res.bad_ranks == [0]
    for n, p in strategy.module.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n
    res = optimizer_step(strategy, micro, train=recipe.train)
    assert not res.skipped and res.loss == pytest.approx(0.6931, abs=1e-4)
    assert any(not torch.equal(p, before[n]) for n, p in strategy.module.named_parameters() if p.requires_grad)


def test_full_finetuning_uses_a_frozen_reference_copy(tmp_path, tiny_dir):
    """lora.enabled: false: the reference is a copy of the base taken before training; it stays frozen
    (not trained, not in the optimizer or the state dict) while the policy moves away from it."""
    from llama_train.config import recipe_from_dict
    from llama_train.data.dataset import load_data
    from llama_train.dist import DistContext
    from llama_train.model import apply_finetuning, load_base_model, load_tokenizer
    from llama_train.parallel import apply_strategy
    from llama_train.step import optimizer_step
    from tests.conftest import tiny_recipe

    recipe = recipe_from_dict(
        tiny_recipe(
            tmp_path,
            tiny_dir,
            train={"objective": "dpo", "micro_batch_size": 4, "lr": 1e-4},
            lora={"enabled": False},
            data={
                "sources": [{"path": "builtin:preferences", "format": "preference"}],
                "builtin": {"num_train": 8, "num_eval": 2},
                "seq_len": 96,
            },
        )
    )
    assert recipe.dpo.reference == "auto"
    tok = load_tokenizer(recipe, str(tiny_dir))
    data = load_data(recipe, tok)
    strategy = apply_strategy(
        apply_finetuning(load_base_model(recipe.model, str(tiny_dir)), recipe), recipe, DistContext()
    )
    ref = strategy.train_module.reference_model
    assert ref is not None and ref is not strategy.module
    assert not any(p.requires_grad for p in ref.parameters())
    assert not any(k.startswith("reference_model") for k in strategy.train_module.state_dict())
    opt_params = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in ref.parameters()}
    ref_before = {n: p.clone() for n, p in ref.named_parameters()}
    micro = [collate([data.train[i] for i in range(4)], pad_id=tok.pad_token_id, pairs=True)]
    first = optimizer_step(strategy, micro, train=recipe.train)
    second = optimizer_step(strategy, micro, train=recipe.train)
    assert first.loss == pytest.approx(0.6931, abs=1e-4)  # policy == reference before the first update
    assert second.loss < first.loss and second.metrics["rewards/margins"] > 0  # the same pairs, trained on
    for n, p in ref.named_parameters():
        assert torch.equal(p, ref_before[n]), n
    assert any(not torch.equal(p, ref_before[n]) for n, p in strategy.module.named_parameters())


def test_chunked_token_logps_equal_the_full_logits_with_the_same_gradients():
    """Completion log-probs go through lm_head `chunk_size` tokens at a time (recomputed in
    backward): values and gradients equal one [N, V] log_softmax."""
    from llama_train.dpo import token_logps

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    full = (hidden @ weight.T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    g_full = torch.autograd.grad(full.sum(), (hidden, weight))
    chunked = token_logps(hidden, weight, targets, chunk_size=8)
    g_chunked = torch.autograd.grad(chunked.sum(), (hidden, weight))
    torch.testing.assert_close(chunked, full)
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b)


def test_dpo_evaluates_the_held_out_pairs_during_training(tmp_path, tiny_dir):
    """train.eval_every_n_steps under dpo logs the preference evaluation (not the SFT loss only) at
    every eval step, between the evaluations before (step 0) and after training."""
    import json
    from pathlib import Path

    from llama_train.config import recipe_from_dict
    from llama_train.trainer import train
    from tests.conftest import tiny_recipe

    recipe = tiny_recipe(
        tmp_path,
        tiny_dir,
        data={"sources": [{"path": "builtin:preferences", "format": "preference"}], "seq_len": 96},
        train={"objective": "dpo", "max_steps": 3, "micro_batch_size": 4, "eval_every_n_steps": 1},
        tracking={"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlruns.db'}", "log_system_metrics": False},
    )
    recipe["data"]["builtin"] = {"num_train": 16, "num_eval": 4}
    train(recipe_from_dict(recipe))
    lines = [json.loads(x) for x in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = sorted({e["step"] for e in lines if "eval/preference_accuracy" in e.get("metrics", e)})
    assert steps == [0, 1, 2, 3]
