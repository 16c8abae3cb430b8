"""The llama_train cache directory: downloaded distributions and converted models live here."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE_ENV = "LLAMA_TRAIN_CACHE"


def cache_root() -> Path:
    """$LLAMA_TRAIN_CACHE, else $XDG_CACHE_HOME/llama_train, else ~/.cache/llama_train."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llama_train"


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
