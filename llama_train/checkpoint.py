"""Atomic, crash-consistent checkpoints and resume.

Layout: `<output_dir>/checkpoints/step_<N>/` holding
  trainable.safetensors + optimizer.pt   single/DDP: full trainable weights and optimizer state
  adapter/                               LoRA runs: the PEFT adapter (what export/gate/serve load)
  dcp/                                   FSDP2: sharded weights + optimizer (torch.distributed.checkpoint)
  deepspeed/                             DeepSpeed ZeRO: the engine's own per-rank partitions
  scheduler.pt            LR scheduler state
  rng_rank<R>.pt          RNG state of every rank
  state.json              step, loader state, consumed samples/tokens, tracking run id, recipe hash,
                          world size, strategy
  recipe.yaml             the normalized recipe
  COMPLETE                written last; a directory without it is never loaded

Protocol (collective, every rank calls `save_checkpoint`): rank 0 creates `step_<N>.tmp`; every
rank writes its files into it and fsyncs them; barrier; rank 0 renames the directory to
`step_<N>`, fsyncs the parent, then writes COMPLETE and fsyncs it; barrier. A crash at any moment
leaves the previous complete checkpoint intact plus at most one directory without COMPLETE, which
the next start deletes (`clean_incomplete`) and never loads. Retention prunes committed ones only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from llama_train.errors import CheckpointError

CHECKPOINTS = "checkpoints"  # <output_dir>/checkpoints/step_<N>/
MARKER = "COMPLETE"
STATE = "state.json"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path` (data reaches the disk before the rename).

    Ranks share the directory: a file another rank is writing may be renamed (a library's temp file)
    between the listing and the open. It is skipped: the rank that wrote it fsyncs it under its
    final name in its own pass, which ends before the barrier that precedes the commit."""
    for root, _, files in os.walk(path):
        for name in [*files, ""]:  # "" = the directory itself, after its files
            try:
                _fsync_path(Path(root) / name if name else Path(root))
            except FileNotFoundError:
                continue


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


def _step_of(d: Path) -> int | None:
    name = d.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Committed checkpoints (with the COMPLETE marker), oldest first."""
    if not ckpt_root.exists():
        return []
    found = [d for d in ckpt_root.iterdir() if d.is_dir() and _step_of(d) is not None and (d / MARKER).exists()]
    return sorted(found, key=_step_of)


def clean_incomplete(ckpt_root: Path) -> list[Path]:
    """Delete checkpoint directories that were never committed (a crash mid-write). Rank 0, before
    any save. Only `step_N` / `step_N.tmp` names: anything else a user put there is left alone."""
    removed = []
    if ckpt_root.exists():
        for d in ckpt_root.iterdir():
            if d.is_dir() and re.fullmatch(r"step_\d+(\.tmp)?", d.name) and not (d / MARKER).exists():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def prune(ckpt_root: Path, keep_last_k: int) -> list[Path]:
    """Delete all but the newest `keep_last_k` committed checkpoints. The marker goes first, so a
    crash mid-delete leaves an uncommitted directory (cleaned later), never a half-deleted one
    that still looks complete."""
    old = complete_checkpoints(ckpt_root)[:-keep_last_k]
    for d in old:
        (d / MARKER).unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)
    return old


FaultHook = Callable[[str, int], None]  # (phase, step): test hook, see faults.Faults


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    *,
    strategy,
    scheduler,
    state: dict,
    recipe_yaml: str,
    keep_last_k: int,
    fault: FaultHook | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Collective: every rank must call it. Returns the committed directory. `extra(tmp_dir)` runs on
    rank 0 before the files are synced (e.g. to add a servable adapter/)."""
    ctx = strategy.ctx
    fault = fault or (lambda phase, step: None)
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f"step_{step}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    strategy.save_state(tmp)  # weights + optimizer, in the strategy's format (collective)
    fault("weights_written", step)
    if ctx.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE).write_text(json.dumps(state, indent=2))
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        if extra is not None:
            extra(tmp)
    torch.save(rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
    fsync_tree(tmp)  # each rank flushes what it wrote (on a shared filesystem, from its own node)
    fault("files_synced", step)
    ctx.barrier()  # sync point: every rank's files are durable
    if ctx.is_main:
        if final.exists():  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
            (final / MARKER).unlink(missing_ok=True)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_path(ckpt_root)
        fault("renamed", step)
        (final / MARKER).write_text(json.dumps({"step": step}))
        _fsync_path(final / MARKER)
        _fsync_path(final)
        prune(ckpt_root, keep_last_k)
    ctx.barrier()
    return final


def find_resume(ckpt_root: Path, resume: str) -> Path | None:
    """`auto`: the newest complete checkpoint or None; `never`: None; else the path, which must be complete."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(ckpt_root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).exists():
        raise CheckpointError(
            f"checkpoint.resume={resume}: not a complete checkpoint (no {MARKER} marker); "
            "use checkpoint.resume=auto to take the newest complete one"
        )
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def load_checkpoint(path: Path, *, strategy, scheduler) -> dict:
    """Collective. Restores weights, optimizer, scheduler (and the LR in the optimizer), and this
    rank's RNG when the world size is unchanged. Returns state.json."""
    ctx = strategy.ctx
    state = read_state(path)
    saved_world, saved_strategy = state.get("world_size", 1), state.get("strategy", strategy.name)
    if saved_strategy != strategy.name and {saved_strategy, strategy.name} != {"single", "ddp"}:
        raise CheckpointError(
            f"checkpoint {path} was written by parallel.strategy {saved_strategy}; "
            f"this run uses {strategy.name}. Resume with the same strategy"
        )
    if saved_world != ctx.world_size and not strategy.resharding_allowed:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved_world} rank(s), this run has {ctx.world_size}; "
            f"parallel.strategy {strategy.name} cannot reshard its checkpoints. Relaunch with "
            f"{saved_world} ranks (ddp and fsdp checkpoints can change world size)"
        )
    strategy.load_state(path)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    for group, lr in zip(strategy.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    rng_file = path / f"rng_rank{ctx.rank}.pt"
    if saved_world == ctx.world_size and rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
