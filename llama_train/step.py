"""One optimizer step: forward and backward of every micro batch, clip, step or skip together.

Loss normalization: every micro-batch contributes sum(token losses) / N where N is the number of
supervised tokens of the whole optimizer step on all ranks (all-reduced before the first forward).
So accumulating 4 micro batches of 2 gives the same update as one batch of 8, and 2 ranks x
micro-batch 2 the same as 1 rank x micro-batch 4. The loss is multiplied by the world size because
DDP/FSDP average gradients over ranks. DPO steps divide by the preference pairs of the step instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llama_train.artifacts import TrainingState
from llama_train.config import TrainConfig
from llama_train.data.loader import MODEL_INPUTS, num_supervised


def autocast(precision: str, device: torch.device):
    """The forward's autocast for train.precision (fp32: none)."""
    p = precision
    if p == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)


@dataclass
class StepResult:
    loss: float  # mean loss per supervised token of the step, all ranks
    grad_norm: float
    tokens: int  # non-pad tokens of the step, all ranks
    supervised: int  # supervised tokens of the step, all ranks
    skipped: bool  # non-finite loss or grad norm on some rank: no update anywhere
    bad_ranks: list[int]  # ranks whose own loss was non-finite
    overflow: bool = False  # fp16: finite loss, non-finite gradients (the loss scaler backs off)
    metrics: dict | None = None  # train.objective dpo: TRL's rewards/* and logps/* means of the step


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


def optimizer_step(
    strategy, micro: list[dict], *, train: TrainConfig, inject_nan: bool = False, scaler: LossScaler | None = None
) -> StepResult:
    """Forward/backward every micro batch, clip, step (or skip on NaN/Inf everywhere), zero grads.
    `inject_nan` is a test hook (see Faults): this rank's loss becomes NaN. `scaler`: fp16 loss scaling."""
    ctx = strategy.ctx
    loss_scale = scaler.scale if scaler else 1.0
    supervised = ctx.all_reduce(sum(num_supervised(b) for b in micro))
    # The loss is a sum over units (SFT: supervised tokens; DPO: preference pairs) divided by the
    # units of the whole step on all ranks.
    pairs = "num_pairs" in micro[0]
    units = ctx.all_reduce(sum(b["num_pairs"] for b in micro)) if pairs else supervised
    # DDP/FSDP/ZeRO average gradients over ranks; scaling by world size turns that into the sum, so
    # the update is d(sum of unit losses)/d(theta) / (units of the whole step).
    scale = ctx.world_size / max(units, 1)
    loss_sum_local = 0.0
    stats_local = None
    for k, batch in enumerate(micro):
        inputs = {n: v.to(ctx.device) for n, v in batch.items() if n in MODEL_INPUTS}
        with strategy.no_sync(k == len(micro) - 1), autocast(train.precision, ctx.device):
            loss_sum, extra = strategy.model(**inputs)
            if pairs:
                values = [float(x) for x in extra.detach()]
                stats_local = values if stats_local is None else [a + b for a, b in zip(stats_local, values)]
            if inject_nan:
                loss_sum = loss_sum * float("nan")
            # A non-finite loss poisons this rank's gradients, so the global (reduced) grad norm is
            # non-finite on every rank and all of them skip the update in clip_and_step together.
            finite = math.isfinite(float(loss_sum.detach()))
            strategy.backward(loss_sum * (scale * loss_scale if finite else float("nan")))
        loss_sum_local += float(loss_sum.detach())
    loss = ctx.all_reduce(loss_sum_local) / max(units, 1)
    metrics = None
    if pairs:
        from llama_train.dpo import step_metrics

        stats = [sum(col) for col in zip(*ctx.all_gather_object(stats_local))]
        metrics = step_metrics(stats)
    grad_norm, applied = strategy.clip_and_step(train.max_grad_norm, grad_scale=loss_scale)
    bad_ranks = [r for r in ctx.all_gather_object(None if math.isfinite(loss_sum_local) else ctx.rank) if r is not None]
    tokens = ctx.all_reduce(sum(int(b["num_tokens"]) for b in micro))
    # fp16 (ours or DeepSpeed's scaler): gradients overflowed although every loss was finite
    overflow = train.precision == "fp16" and not applied and not bad_ranks
    if scaler:
        scaler.update(applied=applied, overflow=overflow)
    return StepResult(loss, grad_norm, int(tokens), int(supervised), not applied, bad_ranks, overflow, metrics)
