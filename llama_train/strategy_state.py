"""A strategy's weights and optimizer on disk, inside a checkpoint directory (checkpoint.py owns
the directory, its commit protocol and the other files). One format per strategy, each its
library's native one:

  single, ddp   trainable.safetensors + optimizer.pt, written by rank 0 (the full trainable
                weights: small for LoRA); any world size can load them
  fsdp          dcp/: every rank writes its own shards with torch.distributed.checkpoint, no
                gather; it reshards on load (another world size)
  deepspeed     deepspeed/: the engine's own per-rank optimizer and parameter partitions

Both functions are collective: every rank calls them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llama_train.errors import CheckpointError

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
DCP_DIR = "dcp"
DEEPSPEED_DIR = "deepspeed"
# FSDP: get_optimizer_state_dict() initializes an empty optimizer with a zero-gradient step at lr 0,
# so a checkpoint taken before the first applied update (every step so far skipped: NaN, fp16
# overflow) would make that update Adam's second (other bias correction) and change the run.
OPTIMIZER_EMPTY = "optimizer_empty"


def save(strategy, path: Path) -> None:
    """Write the strategy's trainable weights and optimizer state into `path`."""
    if strategy.name == "fsdp":
        _save_sharded(strategy, path)
    elif strategy.name == "deepspeed":
        strategy.model.save_checkpoint(
            str(path / DEEPSPEED_DIR), tag="state", save_latest=False, exclude_frozen_parameters=True
        )
    else:
        _save_full(strategy, path)


def load(strategy, path: Path) -> None:
    """Restore what `save` wrote into the (already built and wrapped) strategy."""
    if strategy.name == "fsdp":
        _load_sharded(strategy, path)
    elif strategy.name == "deepspeed":
        load_path, _ = strategy.model.load_checkpoint(
            str(path / DEEPSPEED_DIR),
            tag="state",
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path / DEEPSPEED_DIR}")
    else:
        _load_full(strategy, path)


def _save_full(strategy, path: Path) -> None:
    from safetensors.torch import save_file

    weights = strategy.trainable_state_dict()
    if strategy.ctx.is_main:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path / WEIGHTS))
        torch.save(strategy.optimizer.state_dict(), path / OPTIMIZER)


def _load_full(strategy, path: Path) -> None:
    from safetensors.torch import load_file

    strategy.load_trainable_state_dict(load_file(str(path / WEIGHTS)))
    strategy.optimizer.load_state_dict(
        torch.load(path / OPTIMIZER, weights_only=False, map_location=strategy.ctx.device)
    )


def _save_sharded(strategy, path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    empty = not strategy.optimizer.state
    dcp.save(strategy.sharded_state(), checkpoint_id=str(path / DCP_DIR))
    if empty:  # undo the initialization; a resume starts from an empty optimizer as well
        strategy.optimizer.state.clear()
        if strategy.ctx.rank == 0:
            (path / OPTIMIZER_EMPTY).write_text("no optimizer step had been applied\n")


def _load_sharded(strategy, path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    state = strategy.sharded_state()
    dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    set_model_state_dict(strategy.model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(strategy.model, strategy.optimizer, state["optim"])
    if (path / OPTIMIZER_EMPTY).exists():
        strategy.optimizer.state.clear()
