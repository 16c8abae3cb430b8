"""The tiny model and tokenizer are deterministic and look like Llama 3."""

from __future__ import annotations

import hashlib

from llama_train.tiny import build_tiny


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_same_seed_identical_files_other_seed_differs(tmp_path, tiny_dir):
    again = build_tiny(tmp_path / "again", seed=0)
    assert _digest(again) == _digest(tiny_dir)
    other = build_tiny(tmp_path / "other", seed=1)
    assert _digest(other)["model.safetensors"] != _digest(tiny_dir)["model.safetensors"]


def test_loads_with_transformers_and_has_llama3_template(tiny_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, use_safetensors=True)
    assert model.config.model_type == "llama"
    text = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    for tok in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert tiny_tokenizer.convert_tokens_to_ids(tok) < 8  # special tokens come first
    assert tiny_tokenizer.eos_token == "<|eot_id|>"
    assert [tiny_tokenizer.decode([i]) for i in tiny_tokenizer("1234").input_ids] == ["1", "2", "3", "4"]
