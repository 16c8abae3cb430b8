"""Per-document attention (llama_train.attention): packed rows give exactly what each document
gives alone, the loss and gradients equal the unpacked ones, and unpacked/generation paths still
behave like sdpa."""

from __future__ import annotations

import random

import pytest
import torch

from llama_train import attention
from llama_train.data.chat import IGNORE_INDEX
from llama_train.data.loader import collate, num_supervised

from ..conftest import assert_packed_docs_match_alone


def _docs(n: int, *, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        length = rng.randint(5, 40)
        ids = [rng.randint(10, 300) for _ in range(length)]
        cut = rng.randint(1, length - 2)  # a prompt of `cut` tokens, then the supervised answer
        docs.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return docs


def _packed(docs: list[dict], groups: list[list[int]]) -> list[dict]:
    rows = []
    for g in groups:
        ids, labels = [], []
        for i in g:
            ids += docs[i]["input_ids"]
            labels += [IGNORE_INDEX] + docs[i]["labels"][1:]  # no target for a document's first token
        rows.append({"input_ids": ids, "labels": labels, "doc_lens": [len(docs[i]["input_ids"]) for i in g]})
    return rows


@pytest.fixture(scope="module")
def model(tiny_dir):
    from transformers import AutoModelForCausalLM

    attention.register()
    return AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="doc_sdpa").eval()


GROUPS = [[0, 1, 2], [3, 4]]  # the second row is shorter: it is padded in the batch


@pytest.fixture
def per_doc_calls(monkeypatch):
    """Counts calls of the per-document path (to tell it from the sdpa fallback)."""
    calls = []
    inner = attention._per_document_sdpa

    def counting(q, k, v, bounds, scaling):
        calls.append(tuple(bounds))
        return inner(q, k, v, bounds, scaling)

    monkeypatch.setattr(attention, "_per_document_sdpa", counting)
    return calls


def test_document_bounds():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert attention.document_bounds(pos) == (0, 3, 5, 6, 10, 12)


def test_collate_emits_position_ids_only():
    row = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, -100, 8, 9], "doc_lens": [2, 3]}
    for name in attention.NAMES:
        b = collate([row], pad_id=0, attn_implementation=name)
        assert "attention_mask" not in b and b["position_ids"].tolist() == [[0, 1, 0, 1, 2]]


@pytest.mark.parametrize("use_cache", [False, True])
def test_packed_logits_equal_each_document_alone(model, tiny_dir, tiny_tokenizer, use_cache, per_doc_calls):
    from transformers import AutoModelForCausalLM

    docs = _docs(5)
    rows = _packed(docs, GROUPS)
    batch = collate(rows, pad_id=tiny_tokenizer.pad_token_id, attn_implementation="doc_sdpa")
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    masked = collate(rows, pad_id=tiny_tokenizer.pad_token_id, attn_implementation="sdpa")
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=use_cache).logits
        # One call per layer, over 3 + 2 documents and the padding of the shorter row.
        assert len(per_doc_calls) == model.config.num_hidden_layers and len(per_doc_calls[0]) == 7
        ref = sdpa(
            input_ids=masked["input_ids"], attention_mask=masked["attention_mask"], position_ids=masked["position_ids"]
        ).logits
        ends = assert_packed_docs_match_alone(model, packed, docs, GROUPS, rtol=1e-5)
        for r, end in enumerate(ends):
            # Real tokens agree with the 4D-mask sdpa path (padding positions are never trained).
            torch.testing.assert_close(packed[r, :end], ref[r, :end], rtol=1e-5, atol=1e-5)


def test_unpacked_padded_batch_matches_sdpa(model, tiny_dir, tiny_tokenizer, per_doc_calls):
    from transformers import AutoModelForCausalLM

    sdpa = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    batch = collate(_docs(3), pad_id=tiny_tokenizer.pad_token_id)  # 2D padding mask
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = sdpa(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert per_doc_calls == []  # no packing info: plain sdpa


def _lora(tiny_dir, attn: str):
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn)
    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )  # B != 0: gradients reach A too
    return peft.get_peft_model(base, cfg)


def test_lora_loss_and_grads_equal_unpacked(tiny_dir, tiny_tokenizer, per_doc_calls):
    from llama_train.loss import causal_lm_loss

    attention.register()
    docs = _docs(6, seed=1)
    pad = tiny_tokenizer.pad_token_id
    unpacked = collate(docs, pad_id=pad)
    packed = collate(_packed(docs, [[0, 1, 2], [3, 4, 5]]), pad_id=pad, attn_implementation="doc_sdpa")
    assert num_supervised(packed) == num_supervised(unpacked)
    results = []
    for attn, batch in (("sdpa", unpacked), ("doc_sdpa", packed)):
        model = _lora(tiny_dir, attn)
        loss_sum, n = causal_lm_loss(
            model,
            batch["input_ids"],
            batch["labels"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
        )
        (loss_sum / n).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append(((loss_sum / n).item(), n, grads))
    assert per_doc_calls
    (a_loss, a_n, a_grads), (b_loss, b_n, b_grads) = results
    assert a_n == b_n
    assert abs(a_loss - b_loss) < 1e-5
    for k in a_grads:
        torch.testing.assert_close(b_grads[k], a_grads[k], rtol=1e-4, atol=1e-6)


def test_generate_works_and_matches_sdpa(model, tiny_dir, tiny_tokenizer, per_doc_calls):
    from transformers import AutoModelForCausalLM

    sdpa = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    prompts = [[1, 20, 30, 40, 50, 60], [1, 70, 80]]
    width = max(map(len, prompts))
    pad = tiny_tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left-padded, as eval does
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": pad}
    got = model.generate(input_ids=ids, **kw)
    want = sdpa.generate(input_ids=ids, **kw)
    assert got.shape[1] > width
    assert got.tolist() == want.tolist()
    assert per_doc_calls == []  # padding mask, then KV-cache decoding: the sdpa fallback


def test_default_attention_is_the_per_document_path_and_saves_as_plain_sdpa(tmp_path, tiny_dir):
    """`model.attn_implementation: auto` (the default) trains packed rows per document (doc_sdpa on
    CPU: no 4D mask in the batch), and what the trained model saves names no kernel that only
    llama-train registers, so vLLM or plain transformers load it."""
    import json

    from llama_train.config import recipe_from_dict
    from llama_train.model import load_base_model

    from ..conftest import tiny_recipe

    recipe = recipe_from_dict(tiny_recipe(tmp_path, tiny_dir))
    assert recipe.model.attn_implementation == "auto"
    assert attention.resolve("auto") == ("doc_varlen" if torch.cuda.is_available() else "doc_sdpa")
    assert attention.resolve("sdpa") == "sdpa"
    model = load_base_model(recipe.model, str(tiny_dir))
    assert model.config._attn_implementation == attention.resolve("auto")
    batch = collate(
        _packed(_docs(3), [[0, 1, 2]]),
        pad_id=0,
        attn_implementation=attention.resolve(recipe.model.attn_implementation),
    )
    assert "attention_mask" not in batch and "position_ids" in batch
    model.save_pretrained(tmp_path / "saved")
    assert "doc_" not in (tmp_path / "saved" / "config.json").read_text()
    assert json.loads((tmp_path / "saved" / "config.json").read_text()).get("model_type") == "llama"


def test_varlen_is_taken_only_for_one_half_precision_dtype():
    """From review: `auto` is doc_varlen on CUDA, whose flash kernel takes fp16/bf16 with one
    dtype; float32 runs and autocast's mixed q/k vs v take the per-document SDPA loop instead."""
    f32, bf16 = torch.zeros(1, dtype=torch.float32), torch.zeros(1, dtype=torch.bfloat16)
    assert attention._flash_dtypes(bf16, bf16, bf16)
    assert attention._flash_dtypes(bf16.half(), bf16.half(), bf16.half())
    assert not attention._flash_dtypes(f32, f32, f32)
    assert not attention._flash_dtypes(f32, f32, bf16)
