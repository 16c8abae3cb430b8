"""SmolLM2's pad token is its eos, <|im_end|> (id 2), which ends every turn. Padding must be told
apart by position, never by id: a real <|im_end|> keeps its attention, its label and its count."""

from __future__ import annotations

import pytest
import torch

from llama_train.data.chat import IGNORE_INDEX, tokenize_messages
from llama_train.data.loader import collate, num_supervised
from llama_train.data.packing import position_ids_from_segments, segments

CONVS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add: 12 + 30"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And 1 + 1?"},
        {"role": "assistant", "content": "2"},
    ],
]


@pytest.fixture(scope="module")
def rows(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == 2
    return [tokenize_messages(c, tok) for c in CONVS]


def test_unpacked_batch_keeps_real_im_end(rows):
    lengths = [len(r["input_ids"]) for r in rows]
    assert lengths[0] < lengths[1]
    batch = collate(rows, pad_id=2)
    short = batch["input_ids"][0]
    assert int((short[lengths[0] :] == 2).sum()) == lengths[1] - lengths[0]  # the padding is id 2 too
    for i, r in enumerate(rows):
        eos_at = [j for j, t in enumerate(r["input_ids"]) if t == 2]
        assert len(eos_at) >= 3  # system, user and assistant turns each end with <|im_end|>
        assert batch["attention_mask"][i, : lengths[i]].tolist() == [1] * lengths[i]
        assert batch["attention_mask"][i, lengths[i] :].sum() == 0
        trained_eos = [j for j in eos_at if r["labels"][j] == 2]
        assert len(trained_eos) == sum(m["role"] == "assistant" for m in CONVS[i])
        assert all(batch["labels"][i, j] == 2 for j in trained_eos)
    assert (batch["labels"][0, lengths[0] :] == IGNORE_INDEX).all()
    assert batch["num_tokens"] == sum(lengths)
    assert num_supervised(batch) == sum(sum(l != IGNORE_INDEX for l in r["labels"][1:]) for r in rows)


def test_packed_row_splits_documents_by_length_not_by_id(rows):
    lengths = [len(r["input_ids"]) for r in rows]
    packed = {
        "input_ids": rows[0]["input_ids"] + rows[1]["input_ids"],
        "labels": rows[0]["labels"] + rows[1]["labels"],
        "doc_lens": lengths,
    }
    for attn in ("sdpa", "doc_sdpa"):
        batch = collate([packed, rows[0]], pad_id=2, attn_implementation=attn)
        pos = batch["position_ids"][0].tolist()
        assert pos == list(range(lengths[0])) + list(range(lengths[1]))
        assert batch["num_tokens"] == 2 * lengths[0] + lengths[1]
    expected = position_ids_from_segments(segments([lengths], sum(lengths)))[0].tolist()
    assert pos == expected


def test_loss_counts_real_im_end_and_ignores_padding(rows, smollm2_dir):
    from transformers import AutoModelForCausalLM

    from llama_train.loss import causal_lm_loss

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        batch = collate(rows, pad_id=2)
        loss_sum, n = causal_lm_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
        alone = [causal_lm_loss(model, torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])) for r in rows]
    assert n == sum(a[1] for a in alone) == num_supervised(batch)
    torch.testing.assert_close(loss_sum, sum(a[0] for a in alone), rtol=1e-4, atol=1e-4)
