"""The optimizer, the learning-rate schedule and fp16 loss scaling, from the recipe's `train` section."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llama_train.artifacts import TrainingState
    from llama_train.config import TrainConfig


def make_optimizer(model, train: TrainConfig, *, fused: bool = True) -> torch.optim.Optimizer:
    """torch AdamW; no weight decay on vectors (norms, biases). `fused` (one kernel for all
    parameters) where torch has it for the parameters' device: on CPU it steps the LoRA
    parameters of the tiny model 5x faster than the per-tensor loop torch picks by default."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    fused = fused and bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=train.lr, betas=train.betas, fused=fused or None)


def lr_lambda(train: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """The multiplier of train.lr after `step` optimizer steps: linear warm-up, then constant,
    linear or cosine decay to train.min_lr_ratio at `total_steps`."""
    warmup = train.warmup_steps if train.warmup_steps is not None else int((train.warmup_ratio or 0.0) * total_steps)

    def fn(step: int) -> float:  # step = optimizer steps already taken
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if train.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if train.lr_scheduler == "cosine" else 1 - progress
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * decay

    return fn


class LossScaler:
    """Dynamic loss scaling for fp16 (single, ddp, fsdp; DeepSpeed's engine scales by itself).

    The loss is multiplied by `scale` before backward so that small fp16 activation gradients do not
    flush to zero, and the float32 parameter gradients are divided by it before clipping. A step whose
    loss is finite but whose global grad norm is not has overflowed: it is skipped on every rank and
    the scale halves; GROWTH_INTERVAL applied steps in a row double it. The decision uses the global norm
    and loss, so all ranks agree. The state lives in the run state (checkpointed: exact resume)."""

    GROWTH_INTERVAL = 2000

    def __init__(self, state: TrainingState, init: float):
        self.state = state
        if state.loss_scale is None:
            state.loss_scale = float(init)

    @property
    def scale(self) -> float:
        return self.state.loss_scale

    def update(self, *, applied: bool, overflow: bool) -> None:
        if overflow:
            self.state.loss_scale = self.scale / 2
            self.state.loss_scale_good_steps = 0
        elif applied:
            self.state.loss_scale_good_steps += 1
            if self.state.loss_scale_good_steps >= self.GROWTH_INTERVAL:
                self.state.loss_scale = self.scale * 2
                self.state.loss_scale_good_steps = 0
