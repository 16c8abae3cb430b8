"""The gate's behaviour check on the real SmolLM2 (pad == eos == <|im_end|>), generating in one
left-padded batch: rows that finish early are padded with the stop token's id, rows that do not
finish within gate.max_new_tokens are caught."""

from __future__ import annotations

import pytest

from llama_train.config import recipe_from_dict
from llama_train.gate_checks import Loaded, check_behaviour


@pytest.fixture(scope="module")
def loaded(smollm2_dir):
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")  # B = 0: the base
    model = peft.get_peft_model(base, cfg, adapter_name="candidate").eval()
    return Loaded(model, AutoTokenizer.from_pretrained(smollm2_dir), str(smollm2_dir))


def _recipe(tmp_path, smollm2_dir, max_new_tokens):
    return recipe_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "model": {"source": "hf", "path": str(smollm2_dir)},
            "data": {
                "builtin": {"tasks": ["date"], "num_train": 8, "num_eval": 6},
                "seq_len": 96,
                "cache_dir": str(tmp_path / "cache"),
            },
            "train": {"max_steps": 1},
            "gate": {"max_new_tokens": max_new_tokens},
        }
    )


def test_behaviour_passes_when_every_answer_stops(loaded, smollm2_dir, tmp_path):
    # The base restates the date in words ("July 2, 1999."): short answers of unequal length.
    check = check_behaviour(loaded, _recipe(tmp_path, smollm2_dir, 32), num_prompts=6)
    assert check.status == "passed", check
    assert check.figures == {"prompts": 6, "empty": 0, "no_end_of_turn": 0}


def test_behaviour_fails_when_answers_do_not_stop_in_budget(loaded, smollm2_dir, tmp_path):
    check = check_behaviour(loaded, _recipe(tmp_path, smollm2_dir, 2), num_prompts=6)
    assert check.status == "failed" and check.figures["no_end_of_turn"] == 6, check
    assert "without end-of-turn within 2 tokens" in check.message
