"""The one training loop: setup (data, model, strategy, resume, tracker) → for step: batch,
optimizer step (step.py), log, maybe eval, maybe checkpoint → finish (final eval, then publish.py).

Resume policy lives in resume.py beside the checkpoint mechanism (checkpoint.py); the test-only
fault injection and sample ledger in faults.py, behind hooks that do nothing in production."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_train import checkpoint as ckpt
from llama_train.adapter import write as write_adapter
from llama_train.artifacts import RunSummary, TrainingState
from llama_train.attention import resolve as resolve_attention
from llama_train.config import Recipe, TrainConfig, dump_recipe
from llama_train.data.dataset import dataset_fingerprint, load_data
from llama_train.data.loader import (
    StepLoader,
    as_filler,
    collate,
    is_filler,
    row_lengths,
    sample_index,
)
from llama_train.dist import DistContext, init_distributed, is_collective_failure
from llama_train.errors import (
    InfrastructureError,
    Preempted,
    RecipeError,
)
from llama_train.evaluate import eager, evaluate_during, evaluate_objective, format_eval
from llama_train.faults import TrainHooks, hooks_from_env
from llama_train.model import (
    DTYPES,
    apply_finetuning,
    compile_decoder_layers,
    count_params,
    load_base_model,
    load_tokenizer,
    resolve_base_path,
)
from llama_train.optim import LossScaler, lr_lambda
from llama_train.parallel import apply_strategy
from llama_train.perf import flops_per_token, matmul_param_counts, peak_flops
from llama_train.preempt import SigtermFlag
from llama_train.preflight import preflight
from llama_train.progress import Progress, log
from llama_train.publish import publish
from llama_train.resume import finished_summary, resume, set_aside_metrics
from llama_train.step import NonFiniteGuard, StepResult, optimizer_step, train_metrics
from llama_train.tracking.datasets import dataset_records
from llama_train.tracking.params import (
    derived_params,
    eval_metrics,
    served_base_name,
)
from llama_train.tracking.tracker import make_tracker


def total_steps(train: TrainConfig, num_samples: int, global_batch: int) -> int:
    """train.max_steps, or train.epochs x the steps of one epoch (ceil(samples / global batch): the
    last step of an epoch may be partly filler rows, see data/loader.py)."""
    if train.max_steps is not None:
        return train.max_steps
    return max(1, math.ceil(train.epochs * math.ceil(num_samples / global_batch)))


def train(recipe: Recipe, *, allow_recipe_change: bool = False) -> dict:
    """Run the recipe's training job in this process (one rank of it under torchrun)."""
    if Path(recipe.output_dir).exists() and not Path(recipe.output_dir).is_dir():
        raise RecipeError(f"output_dir {recipe.output_dir} is a file; set output_dir to a directory")
    preflight(recipe)
    ctx = init_distributed(recipe.parallel)
    try:
        return _train(recipe, ctx, allow_recipe_change=allow_recipe_change)
    except RuntimeError as exc:  # DistError, or gloo's plain RuntimeError: a peer died or a collective timed out
        if not is_collective_failure(exc):
            raise
        raise InfrastructureError(
            f"rank {ctx.rank}: collective failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); a rank died or hung "
            f"(parallel.timeout_s={recipe.parallel.timeout_s})"
        ) from exc
    finally:
        if ctx.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@dataclass
class Run:
    """Everything the loop needs, built once by `_setup`."""

    recipe: Recipe
    ctx: DistContext
    out: Path
    recipe_yaml: str
    base_path: str
    tokenizer: object
    data: object
    strategy: object
    loader: StepLoader
    scheduler: object
    steps: int
    state: TrainingState
    tracker: object
    hooks: TrainHooks
    saved_step: int = -1  # step of the last checkpoint this process wrote
    flops_per_token: float = 0.0  # llama_train.perf.flops_per_token at data.seq_len
    peak_flops: float | None = None  # per device; None on CPU (no MFU then, only FLOP/s)
    runtime_s: float = 0.0  # wall time of the optimizer steps this process ran
    supervised_total: int = 0  # supervised tokens of those steps (all ranks)

    @property
    def ckpt_root(self) -> Path:
        return self.out / ckpt.CHECKPOINTS

    @property
    def scaler(self) -> LossScaler | None:
        """fp16 loss scaling (its state is in `state`); DeepSpeed's engine scales the loss itself."""
        t = self.recipe.train
        if t.precision != "fp16" or self.recipe.parallel.strategy == "deepspeed":
            return None
        return LossScaler(self.state, t.loss_scale_init)

    def save_checkpoint(self) -> None:
        payload = dataclasses.replace(
            self.state, loader=self.loader.state_dict(), strategy=self.strategy.name
        ).to_json()
        extra = None
        if self.recipe.lora.enabled:
            # A servable adapter/ in every LoRA checkpoint, so `llama-train export` and the gate
            # take a checkpoint as well as a finished run (gathering the adapter is collective).
            weights = self.strategy.trainable_state_dict()
            extra = lambda tmp: write_adapter(tmp / "adapter", self.strategy.module, weights)  # noqa: E731
        ckpt.save_checkpoint(
            self.ckpt_root,
            self.state.step,
            strategy=self.strategy,
            scheduler=self.scheduler,
            state=payload,
            recipe_yaml=self.recipe_yaml,
            keep_last_k=self.recipe.checkpoint.keep_last_k,
            fault=self.hooks.in_checkpoint,
            extra=extra,
        )
        self.saved_step = self.state.step


def _train(recipe: Recipe, ctx: DistContext, *, allow_recipe_change: bool) -> dict:
    run = _setup(recipe, ctx, allow_recipe_change=allow_recipe_change)
    finished = ctx.broadcast_object(
        finished_summary(run.out, recipe, step=run.state.step, steps=run.steps) if ctx.is_main else None
    )  # run.json is rank 0's
    if finished is not None:  # the same command again after the run ended: nothing to redo
        log(ctx, f"{run.out} already finished at step {run.state.step} (run.json); nothing to train")
        run.tracker.finish("FINISHED")
        ctx.barrier()
        return finished
    try:
        if run.state.eval_before is None and run.data.eval:
            run.state.eval_before = _evaluate(run)
            log(ctx, f"eval before training: {format_eval(run.state.eval_before)}")
            # step 0 of the same eval/* charts as the evals during and after training
            run.tracker.log_metrics(eval_metrics(run.state.eval_before), step=0)
        status, losses = _loop(run)
        if (status == "preempted" or recipe.checkpoint.save_final) and run.saved_step != run.state.step:
            run.save_checkpoint()
        if status == "preempted":
            run.tracker.finish("KILLED")
            raise Preempted(f"SIGTERM received; checkpoint saved at step {run.state.step}, exiting 143")
        summary = _finish(run, losses)
    except Preempted:
        raise
    except BaseException:
        run.tracker.finish("FAILED")
        raise
    run.tracker.finish("FINISHED")
    ctx.barrier()
    return summary


def _setup(recipe: Recipe, ctx: DistContext, *, allow_recipe_change: bool) -> Run:
    t = recipe.train
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    out = Path(recipe.output_dir)
    if not ctx.is_main:  # only rank 0 prints
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_incomplete(out / ckpt.CHECKPOINTS)
        resolve_base_path(recipe)  # builds the tiny model once, on rank 0
    ctx.barrier()
    base_path = resolve_base_path(recipe)
    tokenizer = load_tokenizer(recipe, base_path)
    data = load_data(recipe, tokenizer, world_size=ctx.world_size)
    model = apply_finetuning(load_base_model(recipe.model, base_path), recipe)
    if recipe.lora.enabled:  # the base as the adapter names it where it is served (hub id, not a cache path)
        model.peft_config["default"].base_model_name_or_path = served_base_name(recipe.model, base_path)
    num_trainable, num_frozen = count_params(model)
    matmul_trainable, matmul_frozen = matmul_param_counts(model)
    step_flops = flops_per_token(
        model.config,
        num_trainable=matmul_trainable,
        num_frozen=matmul_frozen,
        seq_len=recipe.data.seq_len,
        lora=recipe.lora.enabled,
    )
    # Before DDP/FSDP wrap the layers (the order torchtitan uses); compilation itself is lazy.
    compiled = compile_decoder_layers(model) if t.compile else 0
    strategy = apply_strategy(model, recipe, ctx)
    loader = StepLoader(
        len(data.train),
        micro_batch_size=t.micro_batch_size,
        grad_accum_steps=t.grad_accum_steps,
        world_size=ctx.world_size,
        rank=ctx.rank,
        seed=t.seed,
        shuffle=recipe.data.shuffle,
        group_by_length=recipe.data.group_by_length,
        # unpacked rows: also to finish an epoch begun grouped (resume, recipe change)
        lengths=None if recipe.data.packing else row_lengths(data.train),
    )
    steps = total_steps(recipe.train, len(data.train), loader.global_batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(strategy.optimizer, lr_lambda(recipe.train, steps))
    state = TrainingState(
        recipe_sha256=recipe.sha256(),
        world_size=ctx.world_size,
        dataset_fingerprint=dataset_fingerprint(data.train),
    )
    run = Run(
        recipe,
        ctx,
        out,
        dump_recipe(recipe),
        base_path,
        tokenizer,
        data,
        strategy,
        loader,
        scheduler,
        steps,
        state,
        tracker=None,
        hooks=hooks_from_env(out, ctx.rank),
        flops_per_token=step_flops,
        peak_flops=peak_flops(ctx.device),
    )
    resume_dir = resume(
        out,
        recipe,
        run.recipe_yaml,
        state,
        strategy=strategy,
        scheduler=scheduler,
        loader=loader,
        ctx=ctx,
        allow_recipe_change=allow_recipe_change,
    )
    if resume_dir is not None:
        run.saved_step = state.step
    elif ctx.is_main:
        set_aside_metrics(ctx, out)
    run.hooks.started(state.step, strategy.local_digest)
    run.tracker = make_tracker(recipe, rank=ctx.rank)
    tags = {
        "llama_train.dataset_fingerprint": state.dataset_fingerprint,
        "llama_train.world_size": str(ctx.world_size),
        "llama_train.strategy": recipe.parallel.strategy,
    }
    derived = derived_params(
        global_batch_size=loader.global_batch,
        world_size=ctx.world_size,
        num_trainable=num_trainable,
        num_total=num_trainable + num_frozen,
        total_steps=steps,
        num_train_rows=len(data.train),
        num_eval_rows=len(data.eval),
    )
    state.tracking_run_id = run.tracker.start(params=derived, tags=tags, resume_run_id=state.tracking_run_id)
    run.tracker.log_datasets(
        dataset_records(
            recipe,
            fingerprint=state.dataset_fingerprint,
            num_train_rows=len(data.train),
            num_eval_rows=len(data.eval),
        )
    )
    if ctx.is_main:
        (out / "recipe.yaml").write_text(run.recipe_yaml)
    log(
        ctx,
        f"model {base_path}: {num_trainable:,} trainable / {num_frozen:,} frozen params; "
        f"{len(data.train)} train rows ({data.stats}), {len(data.eval)} eval rows; "
        f"{steps} steps of {loader.global_batch} samples on {ctx.world_size} rank(s)"
        + (f"; train.compile: {compiled} decoder layers compiled" if compiled else ""),
    )
    if resume_dir:
        log(ctx, f"resumed from {resume_dir.name}")
    return run


def _loop(run: Run) -> tuple[str, list[float]]:
    """Optimizer steps until the end or SIGTERM. Returns (status, per-step losses)."""
    ctx, state, t, every = run.ctx, run.state, run.recipe.train, run.recipe.checkpoint.every_n_steps
    losses: list[float] = []
    guard = NonFiniteGuard(t.max_nonfinite_skips)
    with SigtermFlag() as sigterm, Progress(total=run.steps, start=state.step, enabled=ctx.is_main) as progress:
        while state.step < run.steps:
            run.hooks.before_step(state.step + 1)
            # All ranks agree on stopping at this boundary (SIGTERM may reach only some of them).
            if ctx.all_reduce(1.0 if sigterm.raised else 0.0, "max") > 0:
                return "preempted", losses
            res, lr, dt = _train_step(run)
            note = guard.update(res, step=state.step, loss_scale=run.scaler.scale if run.scaler else None)
            if note:
                log(ctx, note)
            losses.append(res.loss)
            if state.step % t.log_every_n_steps == 0 or state.step == run.steps:
                run.tracker.log_metrics(_step_metrics(run, res, lr=lr, dt=dt), step=state.step)
            progress.update(state.step, loss=res.loss, lr=lr, tokens_per_s=res.tokens / dt)
            if t.eval_every_n_steps and state.step % t.eval_every_n_steps == 0 and state.step < run.steps:
                with eager(t.compile):
                    ev = evaluate_during(
                        run.strategy.model, run.tokenizer, run.data.eval, recipe=run.recipe, device=ctx.device
                    )
                run.tracker.log_metrics(ev, step=state.step)
            if every and state.step % every == 0 and state.step < run.steps:
                run.save_checkpoint()
    return "completed", losses


def _train_step(run: Run) -> tuple[StepResult, float, float]:
    """One optimizer step on this rank's slice of the next global batch; advances the counters."""
    state, data = run.state, run.data.train
    t0 = time.perf_counter()
    indices = run.loader.next_step()
    micro = [
        collate(
            [as_filler(data[sample_index(i)]) if is_filler(i) else data[i] for i in idx],
            pad_id=run.tokenizer.pad_token_id,
            attn_implementation=resolve_attention(run.recipe.model.attn_implementation),
            mask_dtype=DTYPES[run.recipe.model.dtype],
            pairs=run.recipe.train.objective == "dpo",
        )
        for idx in indices
    ]
    lr = run.scheduler.get_last_lr()[0]
    res = optimizer_step(
        run.strategy, micro, train=run.recipe.train, inject_nan=run.hooks.nan(state.step + 1), scaler=run.scaler
    )
    run.scheduler.step()
    state.step += 1
    state.consumed_samples += run.loader.last_step_samples
    state.consumed_tokens += res.tokens
    if not res.skipped:  # the loss of the weights a checkpoint holds (export's manifest reports it)
        state.train_loss = res.loss
    run.hooks.after_step(
        lambda: {
            "step": state.step,
            "ids": [
                x
                for idx in indices
                for i in idx
                if not is_filler(i)
                for x in (data[i].get("ids") or [data[i].get("id", i)])
            ],
            "lr": lr,
            "loss": res.loss,
            "skipped": res.skipped,
            "digest": run.strategy.local_digest(),
        }
    )
    dt = time.perf_counter() - t0
    run.runtime_s += dt
    run.supervised_total += res.supervised
    return res, lr, dt


def _evaluate(run: Run) -> dict:
    """The held-out evaluation of the run's objective (before and after training)."""
    with eager(run.recipe.train.compile):
        return evaluate_objective(
            run.strategy.model,
            run.tokenizer,
            run.data.eval,
            run.data.eval_rows,
            recipe=run.recipe,
            device=run.ctx.device,
        )


def _step_metrics(run: Run, res: StepResult, *, lr: float, dt: float) -> dict[str, float]:
    return train_metrics(
        res,
        lr=lr,
        dt=dt,
        consumed_samples=run.state.consumed_samples,
        num_rows=len(run.data.train),
        flops_per_token=run.flops_per_token,
        world_size=run.ctx.world_size,
        peak_flops=run.peak_flops,
        loss_scale=run.scaler.scale if run.scaler else None,
        device=run.ctx.device,
    )


def _finish(run: Run, losses: list[float]) -> dict:
    """Final eval, then (rank 0) publish the adapter/model, run.json, artifacts and registry. Collective."""
    recipe, ctx, state = run.recipe, run.ctx, run.state
    eval_after = _evaluate(run) if run.data.eval else None
    weights = run.strategy.trainable_state_dict()  # collective under FSDP: every rank calls it
    summary = RunSummary(
        status="completed",
        objective=recipe.train.objective,
        global_step=state.step,
        train_loss=losses[-1] if losses else None,
        train_loss_first=losses[0] if losses else None,
        # (step, loss) of the steps this process ran (after a resume: the resumed part only)
        loss_history=[[state.step - len(losses) + i + 1, loss] for i, loss in enumerate(losses)],
        eval={"before": state.eval_before, "after": eval_after},
        base_model=run.base_path,
        recipe_sha256=recipe.sha256(),
        run_name=recipe.tracking.run_name or run.out.resolve().name,
        world_size=ctx.world_size,
        strategy=recipe.parallel.strategy,
        consumed_samples=state.consumed_samples,
        consumed_tokens=state.consumed_tokens,
        # this process's optimizer steps only (eval and loading excluded)
        train_runtime_s=run.runtime_s,
        supervised_tokens_total=run.supervised_total,
        supervised_tokens_per_s=run.supervised_total / run.runtime_s if run.runtime_s else None,
        data=run.data.stats,
        tracking_run_id=state.tracking_run_id,
    )
    if ctx.is_main:
        if eval_after:
            log(ctx, f"eval after training: {format_eval(eval_after)}")
        publish(
            run.out,
            summary,
            recipe=recipe,
            module=run.strategy.module,
            weights=weights,
            tokenizer=run.tokenizer,
            tracker=run.tracker,
            dataset_fingerprint=state.dataset_fingerprint,
        )
    return summary.to_json()
