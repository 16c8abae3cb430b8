"""The vLLM/NIM compatibility lint: each rule, and the messages users read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from llama_train.adapter_lint import lint_adapter, required_max_lora_rank
from llama_train.errors import ExportError


def write_adapter(path, *, weights=True, bin_file=False, **overrides):
    """A PEFT-format adapter dir (config + a few LoRA tensors) without building a model."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {},
        "base_model_name_or_path": "tiny",
        **overrides,
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    r = cfg["r"]
    tensors = {}
    for mod in cfg["target_modules"] if isinstance(cfg["target_modules"], list) else []:
        prefix = f"base_model.model.model.layers.0.self_attn.{mod}"
        tensors[f"{prefix}.lora_A.weight"] = torch.zeros(r, 16)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(16, r)
    for mod in cfg["modules_to_save"] or []:
        tensors[f"base_model.model.{mod}.weight"] = torch.zeros(4, 4)
    if weights:
        save_file(tensors, str(path / "adapter_model.safetensors"))
    if bin_file:
        (path / "adapter_model.bin").write_bytes(b"pickle")
    return path


def rules(findings, severity="error"):
    return {f.rule for f in findings if f.severity == severity}


def test_clean_adapter_has_no_findings(tmp_path):
    assert lint_adapter(write_adapter(tmp_path / "a"), ["vllm", "nim"]) == []


def test_dora_is_rejected_with_fix(tmp_path):
    findings = lint_adapter(write_adapter(tmp_path / "a", use_dora=True), ["vllm"])
    assert rules(findings) == {"no_dora"}
    msg = findings[0].message
    assert "use_dora is true (DoRA)" in msg and "lora.use_dora: false" in msg and "merged" in msg


def test_real_peft_dora_adapter_is_rejected(tmp_path):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj"], use_dora=True)).save_pretrained(
        tmp_path / "dora"
    )
    assert "no_dora" in rules(lint_adapter(tmp_path / "dora", ["vllm", "nim"]))


def test_modules_to_save_and_lm_head_are_rejected(tmp_path):
    findings = lint_adapter(write_adapter(tmp_path / "a", modules_to_save=["lm_head"]), ["nim"])
    assert rules(findings) == {"no_modules_to_save", "no_lm_head_or_embeddings"}
    by_rule = {f.rule: f.message for f in findings}
    assert "modules_to_save is ['lm_head']" in by_rule["no_modules_to_save"]
    assert "lora.modules_to_save: []" in by_rule["no_modules_to_save"]
    assert "base_model.model.lm_head.weight" in by_rule["no_lm_head_or_embeddings"]


def test_rank_over_vllm_default_names_the_flag(tmp_path):
    adapter = write_adapter(tmp_path / "a", r=32)
    findings = lint_adapter(adapter, ["vllm"])
    assert rules(findings) == {"max_lora_rank"}
    msg = findings[0].message
    assert "LoRA rank 32 exceeds max_lora_rank 16 (vLLM's default)" in msg
    assert "--max-lora-rank 32" in msg and "export.max_lora_rank: 32" in msg
    assert findings[0].targets == ("vllm",)
    assert lint_adapter(adapter, ["vllm"], max_lora_rank=32) == []
    nim_only = lint_adapter(adapter, ["nim"])
    assert rules(nim_only) == set() and rules(nim_only, "warning") == {"max_lora_rank"}


def test_rank_not_in_vllm_set(tmp_path):
    findings = lint_adapter(write_adapter(tmp_path / "a", r=12), ["vllm"], max_lora_rank=64)
    assert rules(findings) == {"rank_allowed"}
    assert "LoRA rank 12 is not one vLLM/NIM accept (1, 8, 16, 32, 64" in findings[0].message
    assert "e.g. 16" in findings[0].message


def test_bias_targets_and_files(tmp_path):
    assert rules(lint_adapter(write_adapter(tmp_path / "b", bias="all"), ["vllm"])) == {"bias_none"}
    findings = lint_adapter(write_adapter(tmp_path / "t", target_modules=["q_proj", "fc1"]), ["vllm"])
    assert rules(findings) == {"target_modules"} and "['fc1']" in findings[0].message
    findings = lint_adapter(write_adapter(tmp_path / "bin", weights=False, bin_file=True), ["nim"])
    assert rules(findings) == {"files"}
    assert "adapter_model.safetensors is missing (found ['adapter_model.bin'])" in findings[0].message
    assert lint_adapter(tmp_path / "t", []) == []
    with pytest.raises(ExportError, match="unknown serving target"):
        lint_adapter(tmp_path / "t", ["tgi"])


def test_required_max_lora_rank():
    assert [required_max_lora_rank(r) for r in (1, 2, 8, 9, 16, 17, 300, 512)] == [1, 8, 8, 16, 16, 32, 320, 512]
    with pytest.raises(ExportError):
        required_max_lora_rank(1024)
