"""A GGUF file (llama.cpp / Ollama) as a base model: converted once into a safetensors directory.

transformers reads GGUF (with the `gguf` package) and dequantizes it, but the loaded model keeps a
GGUF quantization config and refuses `save_pretrained`. We build a plain `LlamaForCausalLM` from
its config, load the dequantized weights (every key must match) and save that, with the tokenizer
and chat template, under `<cache>/gguf/<sha256 of the file>/`. Training, export, the gate and the
server then use that directory like any other local base model.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

from llama_train.errors import RecipeError
from llama_train.models.cache import cache_root, sha256_file

MARKER = "llama_train_gguf.json"
SUPPORTED_ARCHITECTURES = ("llama",)  # GGUF general.architecture values we convert


def gguf_architecture(path: Path, *, key: str = "model.path") -> str:
    """`general.architecture` of a GGUF file, read from its header (no tensors are loaded)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise RecipeError(
            f"{key} {path} is a GGUF file; reading it needs the `gguf` package (pip install gguf)"
        ) from None
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise RecipeError(
            f"{key} {path} is not a readable GGUF file ({exc}); give a .gguf file written by llama.cpp"
        ) from None
    field = reader.fields.get("general.architecture")
    if field is None:
        raise RecipeError(
            f"{key} {path}: the GGUF header has no general.architecture field; the file is incomplete or not a model"
        )
    return str(field.contents())


@functools.lru_cache(maxsize=16)
def _digest(src: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(src)


def file_digest(src: Path) -> str:
    """sha256 of a GGUF file, hashed once per process while its size and mtime stay the same
    (preflight, setup and loading all ask; a multi-GB file takes seconds per hash)."""
    st = src.stat()
    return _digest(src, st.st_size, st.st_mtime_ns)


def cached_dir(path: str | os.PathLike) -> Path | None:
    """The converted directory of a GGUF file if it exists already; never converts (preflight)."""
    src = Path(path).expanduser().resolve()
    if not src.is_file():
        return None
    out = cache_root() / "gguf" / file_digest(src)
    return out if (out / MARKER).exists() else None


def converted_dir(path: str | os.PathLike, *, key: str = "model.path") -> Path:
    """The safetensors directory of a GGUF file, converting it on first use (keyed by sha256)."""
    src = Path(path).expanduser().resolve()
    if not src.is_file():
        raise RecipeError(f"{key} {src}: no such GGUF file")
    digest = file_digest(src)
    out = cache_root() / "gguf" / digest
    if (out / MARKER).exists():
        return out
    arch = gguf_architecture(src, key=key)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise RecipeError(
            f"{key} {src}: GGUF general.architecture is {arch!r}; llama_train fine-tunes "
            f"Llama-architecture models only ({', '.join(SUPPORTED_ARCHITECTURES)}). Use a "
            "Llama GGUF, or a safetensors directory with model.source: hf"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{digest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(src, tmp)
        (tmp / MARKER).write_text(
            json.dumps({"source": str(src), "sha256": digest, "architecture": arch}, indent=2) + "\n"
        )
        try:
            os.replace(tmp, out)  # atomic: a reader sees no directory or a complete one
        except OSError:
            if not (out / MARKER).exists():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _convert(src: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if missing or unexpected:
        raise RecipeError(
            f"model.path {src}: GGUF weights do not match LlamaForCausalLM "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    del loaded
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
