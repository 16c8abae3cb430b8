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

from llama_train.config import TrainConfig
from llama_train.data.loader import MODEL_INPUTS, num_supervised
from llama_train.errors import NonFiniteError
from llama_train.optim import LossScaler


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


MAX_OVERFLOWS = 32  # halvings: from the default 2^16 down to 2^-16


class NonFiniteGuard:
    """Counts the skipped steps in a row. A run whose loss or gradients stay non-finite stops
    (train.max_nonfinite_skips; fp16 overflows: MAX_OVERFLOWS) instead of skipping forever."""

    def __init__(self, max_skips: int):
        self.max_skips = max_skips
        self.skips = self.overflows = 0

    def update(self, res: StepResult, *, step: int, loss_scale: float | None) -> str | None:
        """The log line for a skipped step (None for an applied one); NonFiniteError past the limit."""
        self.overflows = self.overflows + 1 if res.overflow else 0
        self.skips = self.skips + 1 if res.skipped and not res.overflow else 0
        if res.overflow:
            if self.overflows >= MAX_OVERFLOWS:
                raise NonFiniteError(
                    f"{self.overflows} consecutive fp16 gradient overflows up to step {step}: "
                    "the gradients are not finite at any loss scale; use train.precision: bf16 "
                    "(or fp32), or lower train.lr"
                )
            scale = f"; loss scale now {loss_scale:g}" if loss_scale else " (DeepSpeed lowers its loss scale)"
            return (
                f"step {step}: fp16 gradient overflow (loss {res.loss:.4f} is finite); update "
                f"skipped on all ranks{scale} ({self.overflows} in a row)"
            )
        if res.skipped:
            if self.skips >= self.max_skips:
                raise NonFiniteError(
                    f"{self.skips} consecutive non-finite steps up to step {step} "
                    f"(train.max_nonfinite_skips={self.max_skips}); lower train.lr or check the data"
                )
            return (
                f"step {step}: non-finite loss/grad norm (loss={res.loss}, grad_norm="
                f"{res.grad_norm}, non-finite loss on rank(s) {res.bad_ranks or 'none'}); update skipped on "
                f"all ranks ({self.skips} in a row)"
            )
        return None


def train_metrics(
    res: StepResult,
    *,
    lr: float,
    dt: float,
    consumed_samples: int,
    num_rows: int,
    flops_per_token: float,
    world_size: int,
    peak_flops: float | None,
    loss_scale: float | None,
    device: torch.device,
) -> dict[str, float]:
    """The `train/*` metrics of a step that took `dt` seconds."""
    # FLOP/s and MFU per device: the step's tokens are counted over all ranks.
    flops_per_s = res.tokens / dt * flops_per_token / world_size
    metrics = {
        "train/loss": res.loss,
        "train/lr": lr,
        "train/grad_norm": res.grad_norm,
        "train/tokens_per_s": res.tokens / dt,
        "train/supervised_tokens": res.supervised,
        "train/supervised_tokens_per_s": res.supervised / dt,
        "train/consumed_samples": consumed_samples,
        "train/tflops_per_device": flops_per_s / 1e12,
        **_memory_metrics(device),
        # passes over the training rows (fractional): the x axis people think in
        "train/epoch": consumed_samples / max(num_rows, 1),
    }
    if peak_flops:
        metrics["train/mfu"] = flops_per_s / peak_flops
    if loss_scale:
        metrics["train/loss_scale"] = loss_scale
    if res.metrics:  # DPO: named as TRL names them
        metrics.update({f"train/{k}": v for k, v in res.metrics.items()})
    return metrics


def _memory_metrics(device: torch.device) -> dict[str, float]:
    import resource

    out = {"train/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if device.type == "cuda":
        out["train/gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out
