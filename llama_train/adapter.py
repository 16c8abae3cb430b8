"""The adapter directory: what training writes and every later stage reads (export, the gate,
the registry, the server). A PEFT LoRA adapter is exactly two files, `adapter_config.json` and
`adapter_model.safetensors`; a run keeps it in `<run>/adapter/`, a checkpoint in
`<checkpoint>/adapter/`, an export in `<export>/adapter/`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llama_train.models.cache import sha256_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FILES = (CONFIG_FILE, WEIGHTS_FILE)
DIR_NAME = "adapter"

__all__ = [
    "CONFIG_FILE",
    "DIR_NAME",
    "FILES",
    "WEIGHTS_FILE",
    "copy",
    "locate",
    "missing_files",
    "read_config",
    "sha256_file",
    "unreadable_files",
    "weight_keys",
    "write",
]


def write(dest: Path, module, weights: dict) -> None:
    """The two files from the gathered trainable weights of `module` (a PeftModel)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    module.peft_config["default"].save_pretrained(str(dest))
    adapter = get_peft_model_state_dict(module, state_dict=weights)
    save_file(
        {k: v.contiguous() for k, v in adapter.items()}, str(Path(dest) / WEIGHTS_FILE), metadata={"format": "pt"}
    )


def locate(src: Path) -> Path | None:
    """The adapter of a run, checkpoint or export directory (`src/adapter`), or `src` itself."""
    for cand in (Path(src) / DIR_NAME, Path(src)):
        if (cand / CONFIG_FILE).is_file():
            return cand
    return None


def missing_files(adapter_dir: Path) -> list[str]:
    return [name for name in FILES if not (Path(adapter_dir) / name).is_file()]


def copy(adapter_dir: Path, dest: Path) -> None:
    """The two files (nothing else: no pickles, no optimizer state) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy2(Path(adapter_dir) / name, dest / name)


def read_config(adapter_dir: Path) -> dict:
    return json.loads((Path(adapter_dir) / CONFIG_FILE).read_text())


def weight_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def unreadable_files(adapter_dir: Path) -> list[str]:
    """Why the adapter's files cannot be parsed (truncated safetensors, broken JSON); [] if they
    can. Missing files are not reported here (see `missing_files`)."""
    problems = []
    cfg_path, weights_path = Path(adapter_dir) / CONFIG_FILE, Path(adapter_dir) / WEIGHTS_FILE
    if cfg_path.is_file():
        try:
            if not isinstance(json.loads(cfg_path.read_text()), dict):
                problems.append(f"{cfg_path} is not a JSON object")
        except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            problems.append(f"{cfg_path} is not valid JSON ({exc}); re-export or re-save the adapter")
    if weights_path.is_file():
        try:
            weight_keys(weights_path)
        except Exception as exc:  # SafetensorError (truncated/corrupt header) has no public base class
            problems.append(
                f"{weights_path} cannot be read as safetensors ({str(exc)[:200]}); the file is "
                "truncated or corrupt: re-export or re-save the adapter"
            )
    return problems
