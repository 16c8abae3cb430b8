"""Atomic, crash-consistent checkpoints and resume.

Layout: `<output_dir>/checkpoints/step_<N>/` holding
  trainable.safetensors   full trainable weights (adapter or whole model), gathered from shards
  optimizer.pt            optimizer state (full, unsharded), scheduler state
  rng_rank<R>.pt          RNG state of every rank
  state.json              step, loader state, consumed samples/tokens, tracking run id, recipe hash
  recipe.yaml             the normalized recipe
  COMPLETE                written last; a directory without it is never loaded

Writing goes to `step_<N>.tmp-<pid>` (every rank writes its own files there), fsync, barrier, then
rank 0 renames it to `step_<N>` and writes COMPLETE. A crash at any moment leaves either the
previous complete checkpoint or a `.tmp` directory that the next start deletes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llama_train.errors import CheckpointError

MARKER = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    if not ckpt_root.exists():
        return []
    found = []
    for d in ckpt_root.iterdir():
        if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit() and (d / MARKER).exists():
            found.append(d)
    return sorted(found, key=lambda d: int(d.name[5:]))


def clean_incomplete(ckpt_root: Path) -> list[Path]:
    """Delete directories that were never committed (crash mid-write). Rank 0 only."""
    removed = []
    if ckpt_root.exists():
        for d in ckpt_root.iterdir():
            if d.is_dir() and not (d / MARKER).exists():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def save_checkpoint(ckpt_root: Path, step: int, *, strategy, scheduler, state: dict, recipe_yaml: str,
                    keep_last_k: int) -> Path:
    """Collective: every rank must call it. Returns the committed directory."""
    ctx = strategy.ctx
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f"step_{step}.tmp"
    weights = strategy.trainable_state_dict()  # collective under FSDP
    optim = strategy.optimizer_state_dict()    # collective under FSDP
    if ctx.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    ctx.barrier()
    if ctx.is_main:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        (tmp / "recipe.yaml").write_text(recipe_yaml)
    torch.save(rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
    _fsync_dir(tmp) if ctx.is_main else None
    ctx.barrier()
    if ctx.is_main:
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. end of run right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        (final / MARKER).write_text(json.dumps({"step": step}))
        _fsync_dir(final)
        for old in complete_checkpoints(ckpt_root)[:-keep_last_k]:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def find_resume(ckpt_root: Path, resume: str) -> Path | None:
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).exists():
        raise CheckpointError(f"checkpoint.resume={resume}: not a complete checkpoint (no {MARKER} marker)")
    return path


def load_checkpoint(path: Path, *, strategy, scheduler, rank: int, world_size: int) -> dict:
    state = json.loads((path / "state.json").read_text())
    strategy.load_trainable_state_dict(load_file(str(path / "trainable.safetensors")))
    opt = torch.load(path / "optimizer.pt", weights_only=False)
    strategy.load_optimizer_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng_file = path / f"rng_rank{rank}.pt"
    if state.get("world_size", 1) == world_size and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
