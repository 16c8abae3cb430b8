"""FLOPs-per-token formula, MFU and peak lookup."""

from types import SimpleNamespace
from unittest import mock

import pytest
import torch

from llama_train.perf import flops_per_token, matmul_param_counts, mfu, peak_flops

LLAMA_8B = SimpleNamespace(num_hidden_layers=32, hidden_size=4096)


def test_lora_formula():
    got = flops_per_token(LLAMA_8B, num_trainable=10, num_frozen=1000, seq_len=4096, lora=True)
    assert got == 4 * 1000 + 6 * 10 + 12 * 32 * 4096 * 4096


def test_full_finetune_formula():
    got = flops_per_token(LLAMA_8B, num_trainable=1000, num_frozen=0, seq_len=2048, lora=False)
    assert got == 6 * 1000 + 12 * 32 * 4096 * 2048


def test_mfu_llama8b_lora_anchor():
    # Llama-3.1-8B with LoRA r=16 on q,k,v,o,gate,up,down: 42M trainable, 7.5B frozen matmul weights.
    fpt = flops_per_token(LLAMA_8B, num_trainable=41_943_040, num_frozen=7_504_924_672, seq_len=4096, lora=True)
    assert fpt == pytest.approx(3.67e10, rel=0.01)
    assert mfu(12_500, fpt, 989e12) == pytest.approx(0.464, abs=0.002)
    assert mfu(12_500, fpt, None) is None


def test_peak_flops():
    assert peak_flops("cpu") is None
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA H100 80GB HBM3"):
        assert peak_flops("cuda:0") == 989e12
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA H200"):
        assert peak_flops("cuda:0") == 989e12
    with mock.patch("torch.cuda.get_device_name", return_value="NVIDIA A100-SXM4-80GB"):
        assert peak_flops("cuda:0") == 312e12
    with mock.patch("torch.cuda.get_device_name", return_value="Some Future GPU"):
        assert peak_flops("cuda:0") is None


def test_matmul_param_counts_skips_untied_embedding():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3))
    model[1].weight.requires_grad_(False)
    assert matmul_param_counts(model) == (3, 12)  # bias trainable, weight frozen, embedding skipped
