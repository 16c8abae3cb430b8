"""Packing: best-fit-decreasing, and documents in a packed row isolated from each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llama_train.data.builtin import generate_examples
from llama_train.data.chat import IGNORE_INDEX, tokenize_messages
from llama_train.data.loader import collate, num_supervised
from llama_train.data.packing import best_fit_decreasing, pack_table, packing_efficiency

from ..conftest import assert_packed_docs_match_alone


def test_best_fit_decreasing_fills_bins_and_keeps_every_sample():
    lengths = [7, 5, 4, 3, 3, 2, 1, 9, 10]
    bins = best_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    # 44 tokens need at least 5 bins of 10; BFD reaches that here.
    assert len(bins) == 5
    with pytest.raises(ValueError):
        best_fit_decreasing([11], 10)


def test_packing_efficiency_on_lognormal_lengths():
    rng = np.random.default_rng(0)
    # Mean ~200 tokens, long right tail, like real SFT data; seq_len 2048.
    lengths = np.clip(rng.lognormal(np.log(200) - 0.5, 1.0, size=20_000).astype(int), 1, 2048)
    assert 180 < lengths.mean() < 220
    bins = best_fit_decreasing(lengths, 2048)
    eff = packing_efficiency(lengths, bins, 2048)
    assert eff >= 0.95, eff


def _docs(tok, n, seed=5):
    return [
        dict(tokenize_messages(e["messages"], tok), id=e["id"]) for e in generate_examples(num_examples=n, seed=seed)
    ]


def _packed_rows(docs, groups):
    import pyarrow as pa

    table = pa.table(
        {
            "input_ids": [d["input_ids"] for d in docs],
            "labels": [d["labels"] for d in docs],
            "id": [d["id"] for d in docs],
        }
    )
    return pack_table(table, groups).to_pylist()


def test_pack_table_layout(tiny_tokenizer):
    docs = _docs(tiny_tokenizer, 3)
    (row,) = _packed_rows(docs, [[2, 0, 1]])
    assert row["ids"] == [docs[2]["id"], docs[0]["id"], docs[1]["id"]]
    assert row["doc_lens"] == [len(docs[i]["input_ids"]) for i in (2, 0, 1)]
    assert row["input_ids"] == docs[2]["input_ids"] + docs[0]["input_ids"] + docs[1]["input_ids"]
    start = 0
    for i in (2, 0, 1):  # each document's first label is -100, the rest unchanged
        n = len(docs[i]["labels"])
        assert row["labels"][start : start + n] == [IGNORE_INDEX] + docs[i]["labels"][1:]
        start += n


def test_collate_packed_inputs(tiny_tokenizer):
    row = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, -100, 8, 9], "doc_lens": [2, 3], "ids": ["a", "b"]}
    short = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "doc_lens": [3], "ids": ["c"]}
    b = collate([row, short], pad_id=0)
    assert b["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 1]]
    allowed = (b["attention_mask"][:, 0] == 0).int().tolist()
    assert allowed[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    # Padding is a segment of its own (no empty softmax row), with labels -100.
    assert allowed[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert b["attention_mask"].dtype == torch.float32 and b["attention_mask"].min() == torch.finfo(torch.float32).min
    assert b["labels"][1, 3:].tolist() == [IGNORE_INDEX, IGNORE_INDEX] and b["num_tokens"] == 8
    flash = collate([row, short], pad_id=0, attn_implementation="flash_attention_2")
    assert "attention_mask" not in flash and flash["position_ids"].tolist() == b["position_ids"].tolist()
    plain = collate([{"input_ids": [1, 2], "labels": [1, 2]}], pad_id=0)
    assert set(plain) == {"input_ids", "labels", "attention_mask", "num_tokens"}


@pytest.fixture(scope="module")
def docs(tiny_tokenizer):
    return _docs(tiny_tokenizer, 6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_document_alone(tiny_dir, tiny_tokenizer, docs, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn).eval()
    rows = _packed_rows(docs, [[0, 1, 2], [3, 4]])  # the second row is shorter: padded in the batch
    batch = collate(rows, pad_id=tiny_tokenizer.pad_token_id, attn_implementation=attn)
    with torch.no_grad():
        # The default use_cache=True is the case where position ids alone leak across documents.
        packed = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits
        assert_packed_docs_match_alone(model, packed, docs, [[0, 1, 2], [3, 4]], rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tiny_dir, tiny_tokenizer, docs, attn):
    from transformers import AutoModelForCausalLM

    from llama_train.loss import causal_lm_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn).eval()
    pad = tiny_tokenizer.pad_token_id
    unpacked = collate(docs, pad_id=pad)
    packed = collate(_packed_rows(docs, [[0, 1, 2], [3, 4, 5]]), pad_id=pad, attn_implementation=attn)
    assert num_supervised(packed) == num_supervised(unpacked)
    with torch.no_grad():
        a_sum, a_n = causal_lm_loss(
            model, unpacked["input_ids"], unpacked["labels"], attention_mask=unpacked["attention_mask"]
        )
        b_sum, b_n = causal_lm_loss(
            model,
            packed["input_ids"],
            packed["labels"],
            attention_mask=packed["attention_mask"],
            position_ids=packed["position_ids"],
        )
    assert a_n == b_n
    torch.testing.assert_close(b_sum / b_n, a_sum / a_n, rtol=1e-5, atol=1e-6)
