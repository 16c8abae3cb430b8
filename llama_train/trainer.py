"""The one training loop: load → for step: batch, forward, loss, backward, clip, step, log,
maybe eval, maybe checkpoint → finish.

Loss normalization: every micro-batch contributes sum(token losses) / N where N is the number of
supervised tokens of the whole optimizer step on all ranks (all-reduced before the first forward).
So accumulating 4 micro batches of 2 gives the same update as one batch of 8, and 2 ranks x
micro-batch 2 the same as 1 rank x micro-batch 4. The loss is multiplied by the world size because
DDP/FSDP average gradients over ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_train import checkpoint as ckpt
from llama_train.adapter import write as write_adapter
from llama_train.attention import resolve as resolve_attention
from llama_train.config import Recipe, diff_recipes, dump_recipe
from llama_train.data.dataset import dataset_fingerprint, load_data
from llama_train.data.loader import (
    MODEL_INPUTS,
    StepLoader,
    as_filler,
    collate,
    is_filler,
    num_supervised,
    row_lengths,
    sample_index,
)
from llama_train.errors import (
    CheckpointError,
    InfrastructureError,
    NonFiniteError,
    Preempted,
    RecipeError,
)
from llama_train.evaluate import eval_loss, evaluate
from llama_train.model import (
    DTYPES,
    apply_finetuning,
    compile_decoder_layers,
    count_params,
    load_base_model,
    load_tokenizer,
    resolve_base_path,
)
from llama_train.optim import lr_lambda
from llama_train.parallel import DistContext, apply_strategy, init_distributed
from llama_train.perf import flops_per_token, matmul_param_counts, peak_flops
from llama_train.preflight import preflight
from llama_train.progress import Progress
from llama_train.tracking.datasets import dataset_records, examples_table
from llama_train.tracking.params import (
    base_model_label,
    derived_params,
    eval_metrics,
    served_base_name,
    summary_metrics,
    version_description,
    version_tags,
)
from llama_train.tracking.registry import register_adapter
from llama_train.tracking.sync import METRICS_FILE
from llama_train.tracking.tracker import make_tracker


def total_steps(recipe: Recipe, num_samples: int, global_batch: int) -> int:
    """train.max_steps, or train.epochs x the steps of one epoch (ceil(samples / global batch): the
    last step of an epoch may be partly filler rows, see data/loader.py)."""
    t = recipe.train
    if t.max_steps is not None:
        return t.max_steps
    return max(1, math.ceil(t.epochs * math.ceil(num_samples / global_batch)))


def _autocast(recipe: Recipe, device: torch.device):
    p = recipe.train.precision
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

    def __init__(self, state: dict, init: float):
        self.state = state
        state.setdefault("loss_scale", float(init))
        state.setdefault("loss_scale_good_steps", 0)

    @property
    def scale(self) -> float:
        return self.state["loss_scale"]

    def update(self, *, applied: bool, overflow: bool) -> None:
        if overflow:
            self.state["loss_scale"] = self.scale / 2
            self.state["loss_scale_good_steps"] = 0
        elif applied:
            self.state["loss_scale_good_steps"] += 1
            if self.state["loss_scale_good_steps"] >= self.GROWTH_INTERVAL:
                self.state["loss_scale"] = self.scale * 2
                self.state["loss_scale_good_steps"] = 0


def optimizer_step(
    strategy, micro: list[dict], *, recipe: Recipe, inject_nan: bool = False, scaler: LossScaler | None = None
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
        with strategy.no_sync(k == len(micro) - 1), _autocast(recipe, ctx.device):
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
    grad_norm, applied = strategy.clip_and_step(recipe.train.max_grad_norm, grad_scale=loss_scale)
    bad_ranks = [r for r in ctx.all_gather_object(None if math.isfinite(loss_sum_local) else ctx.rank) if r is not None]
    tokens = ctx.all_reduce(sum(int(b["num_tokens"]) for b in micro))
    # fp16 (ours or DeepSpeed's scaler): gradients overflowed although every loss was finite
    overflow = recipe.train.precision == "fp16" and not applied and not bad_ranks
    if scaler:
        scaler.update(applied=applied, overflow=overflow)
    return StepResult(loss, grad_norm, int(tokens), int(supervised), not applied, bad_ranks, overflow, metrics)


class Faults:
    """Test hooks for fault injection, read from the environment (never set in production).

    LLAMA_TRAIN_FAULT: comma-separated `kind:key=value:...` items, each for one rank and step:
      kill:rank=R:step=S            SIGKILL rank R when it is about to run step S
      sigterm:rank=R:step=S         send SIGTERM to rank R itself before step S (preemption)
      nan:rank=R:step=S             rank R's loss is NaN at step S
      hang:rank=R:step=S            rank R stops (sleeps, ignoring SIGTERM) before step S: a hung rank
      ckpt_kill:rank=R:step=S:phase=P   SIGKILL rank R while writing checkpoint step_S, at phase P
                                    (weights_written | files_synced | renamed; see checkpoint.py)
      any item may add `:attempt=N`: only in torchrun restart N (TORCHELASTIC_RESTART_COUNT)
    LLAMA_TRAIN_LEDGER=1: every rank appends {step, ids, lr, loss, skipped, digest} per step to
      <output_dir>/ledger/rank<R>.jsonl (digest: sha256 of its trainable parameter shards).
    """

    def __init__(self, rank: int, spec: str | None = None):
        self.rank = rank
        self.items = []
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        for item in filter(None, (spec if spec is not None else os.environ.get("LLAMA_TRAIN_FAULT", "")).split(",")):
            kind, *kvs = item.strip().split(":")
            kv = dict(x.split("=", 1) for x in kvs)
            if kv.get("attempt", attempt) == attempt:
                self.items.append((kind, int(kv.get("rank", 0)), int(kv.get("step", 0)), kv.get("phase")))

    def _hit(self, kind: str, step: int, phase: str | None = None) -> bool:
        return any(k == kind and r == self.rank and s == step and p == phase for k, r, s, p in self.items)

    def before_step(self, step: int) -> None:
        if self._hit("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._hit("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._hit("hang", step):
            while True:  # like a rank stuck in a kernel or a deadlock: only SIGKILL ends it
                time.sleep(3600)

    def nan(self, step: int) -> bool:
        return self._hit("nan", step)

    def in_checkpoint(self, phase: str, step: int) -> None:
        if self._hit("ckpt_kill", step, phase):
            os.kill(os.getpid(), signal.SIGKILL)


class Ledger:
    """Per-rank record of the samples and result of every step (test hook, LLAMA_TRAIN_LEDGER=1)."""

    def __init__(self, out: Path, rank: int):
        self.path = out / "ledger" / f"rank{rank}.jsonl"
        self.enabled = os.environ.get("LLAMA_TRAIN_LEDGER") == "1"

    def rewind(self, step: int) -> None:
        """Drop entries after `step` (the resumed step): the ledger is the effective history."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.path.write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= step))

    def write(self, entry: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
                fh.flush()
                os.fsync(fh.fileno())


class _SigtermFlag:
    """Records SIGTERM; the loop checks it at step boundaries (agreed across ranks)."""

    def __init__(self):
        self.raised = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train(recipe: Recipe, *, allow_recipe_change: bool = False) -> dict:
    """Run the recipe's training job in this process (one rank of it under torchrun)."""
    if Path(recipe.output_dir).exists() and not Path(recipe.output_dir).is_dir():
        raise RecipeError(f"output_dir {recipe.output_dir} is a file; set output_dir to a directory")
    preflight(recipe)
    ctx = init_distributed(recipe)
    try:
        return _train(recipe, ctx, allow_recipe_change=allow_recipe_change)
    except RuntimeError as exc:  # DistError, or gloo's plain RuntimeError: a peer died or a collective timed out
        if not _is_collective_failure(exc):
            raise
        raise InfrastructureError(
            f"rank {ctx.rank}: collective failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); a rank died or hung "
            f"(parallel.timeout_s={recipe.parallel.timeout_s})"
        ) from exc
    finally:
        if ctx.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _is_collective_failure(exc: RuntimeError) -> bool:
    text = str(exc)
    return isinstance(exc, torch.distributed.DistError) or any(
        s in text for s in ("gloo", "Connection closed by peer", "Connection reset by peer", "NCCL", "timed out")
    )


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
    state: dict
    tracker: object
    faults: Faults
    ledger: Ledger
    saved_step: int = -1  # step of the last checkpoint this process wrote
    flops_per_token: float = 0.0  # llama_train.perf.flops_per_token at data.seq_len
    peak_flops: float | None = None  # per device; None on CPU (no MFU then, only FLOP/s)
    runtime_s: float = 0.0  # wall time of the optimizer steps this process ran
    supervised_total: int = 0  # supervised tokens of those steps (all ranks)

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def scaler(self) -> LossScaler | None:
        """fp16 loss scaling (its state is in `state`); DeepSpeed's engine scales the loss itself."""
        t = self.recipe.train
        if t.precision != "fp16" or self.recipe.parallel.strategy == "deepspeed":
            return None
        return LossScaler(self.state, t.loss_scale_init)

    def save_checkpoint(self) -> None:
        payload = dict(self.state, loader=self.loader.state_dict(), strategy=self.strategy.name)
        extra = None
        if self.recipe.lora.enabled:
            # A servable adapter/ in every LoRA checkpoint, so `llama-train export` and the gate
            # take a checkpoint as well as a finished run (gathering the adapter is collective).
            weights = self.strategy.trainable_state_dict()
            extra = lambda tmp: write_adapter(tmp / "adapter", self.strategy.module, weights)  # noqa: E731
        ckpt.save_checkpoint(
            self.ckpt_root,
            self.state["step"],
            strategy=self.strategy,
            scheduler=self.scheduler,
            state=payload,
            recipe_yaml=self.recipe_yaml,
            keep_last_k=self.recipe.checkpoint.keep_last_k,
            fault=self.faults.in_checkpoint,
            extra=extra,
        )
        self.saved_step = self.state["step"]


def _train(recipe: Recipe, ctx: DistContext, *, allow_recipe_change: bool) -> dict:
    run = _setup(recipe, ctx, allow_recipe_change=allow_recipe_change)
    finished = ctx.broadcast_object(_finished_summary(run) if ctx.is_main else None)  # run.json is rank 0's
    if finished is not None:  # the same command again after the run ended: nothing to redo
        _log(ctx, f"{run.out} already finished at step {run.state['step']} (run.json); nothing to train")
        run.tracker.finish("FINISHED")
        ctx.barrier()
        return finished
    try:
        if run.state["eval_before"] is None and run.data.eval:
            run.state["eval_before"] = _evaluate(run)
            _log(ctx, f"eval before training: {_fmt_eval(run.state['eval_before'])}")
            # step 0 of the same eval/* charts as the evals during and after training
            run.tracker.log_metrics(eval_metrics(run.state["eval_before"]), step=0)
        status, losses = _loop(run)
        if (status == "preempted" or recipe.checkpoint.save_final) and run.saved_step != run.state["step"]:
            run.save_checkpoint()
        if status == "preempted":
            run.tracker.finish("KILLED")
            raise Preempted(f"SIGTERM received; checkpoint saved at step {run.state['step']}, exiting 143")
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
        ckpt.clean_incomplete(out / "checkpoints")
        resolve_base_path(recipe)  # builds the tiny model once, on rank 0
    ctx.barrier()
    base_path = resolve_base_path(recipe)
    tokenizer = load_tokenizer(recipe, base_path)
    data = load_data(recipe, tokenizer, world_size=ctx.world_size)
    model = apply_finetuning(load_base_model(recipe, base_path), recipe)
    if recipe.lora.enabled:  # the base as the adapter names it where it is served (hub id, not a cache path)
        model.peft_config["default"].base_model_name_or_path = served_base_name(recipe, base_path)
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
    steps = total_steps(recipe, len(data.train), loader.global_batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(strategy.optimizer, lr_lambda(recipe.train, steps))
    state = {
        "step": 0,
        "consumed_samples": 0,
        "consumed_tokens": 0,
        "eval_before": None,
        "tracking_run_id": None,
        "recipe_sha256": recipe.sha256(),
        "world_size": ctx.world_size,
        "dataset_fingerprint": dataset_fingerprint(data.train),
    }
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
        faults=Faults(ctx.rank),
        ledger=Ledger(out, ctx.rank),
        flops_per_token=step_flops,
        peak_flops=peak_flops(ctx.device),
    )
    resume_dir = _resume(run, allow_recipe_change=allow_recipe_change)
    if resume_dir is None and ctx.is_main:
        _set_aside_metrics(ctx, out)
    run.ledger.rewind(state["step"])
    if state["step"] == 0:
        run.ledger.write({"step": 0, "digest": strategy.local_digest()})
    run.tracker = make_tracker(recipe, rank=ctx.rank)
    tags = {
        "llama_train.dataset_fingerprint": state["dataset_fingerprint"],
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
    state["tracking_run_id"] = run.tracker.start(params=derived, tags=tags, resume_run_id=state["tracking_run_id"])
    run.tracker.log_datasets(
        dataset_records(
            recipe,
            fingerprint=state["dataset_fingerprint"],
            num_train_rows=len(data.train),
            num_eval_rows=len(data.eval),
        )
    )
    if ctx.is_main:
        (out / "recipe.yaml").write_text(run.recipe_yaml)
    _log(
        ctx,
        f"model {base_path}: {num_trainable:,} trainable / {num_frozen:,} frozen params; "
        f"{len(data.train)} train rows ({data.stats}), {len(data.eval)} eval rows; "
        f"{steps} steps of {loader.global_batch} samples on {ctx.world_size} rank(s)"
        + (f"; train.compile: {compiled} decoder layers compiled" if compiled else ""),
    )
    if resume_dir:
        _log(ctx, f"resumed from {resume_dir.name}")
    return run


def _resume(run: Run, *, allow_recipe_change: bool) -> Path | None:
    """Load the newest complete checkpoint (or the one named); refuse a changed recipe."""
    resume_dir = ckpt.find_resume(run.ckpt_root, run.recipe.checkpoint.resume)
    if resume_dir is None:
        _refuse_starting_over(run)
        return None
    import yaml

    try:
        saved_recipe = (resume_dir / "recipe.yaml").read_text()
        saved = yaml.safe_load(saved_recipe)
        if not isinstance(saved, dict):
            raise ValueError("recipe.yaml is not a recipe mapping")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise _damaged(run, resume_dir, exc) from None
    current = yaml.safe_load(run.recipe_yaml)
    # Which checkpoint to resume from is not part of the run: naming an older one is not a change.
    # Nor is the attention kernel: sdpa, doc_sdpa and doc_varlen compute the same attention (a
    # checkpoint written before `auto` became the default says sdpa).
    kernels = [r.get("model", {}).pop("attn_implementation", None) for r in (saved, current)]
    for recipe in (saved, current):
        recipe.get("checkpoint", {}).pop("resume", None)
    if kernels[0] != kernels[1]:
        _log(
            run.ctx,
            f"resuming {resume_dir.name} with model.attn_implementation {kernels[1]} (the checkpoint's "
            f"run used {kernels[0]}): the same attention, another kernel",
        )
    if saved != current and not allow_recipe_change:
        raise CheckpointError(
            f"the recipe changed since checkpoint {resume_dir}:\n  "
            + "\n  ".join(diff_recipes(saved, current))
            + "\nrerun with --allow-recipe-change to resume anyway, or start over in a new output_dir"
        )
    try:
        saved_data = ckpt.read_state(resume_dir).get("dataset_fingerprint")
        if saved_data not in (None, run.state["dataset_fingerprint"]) and not allow_recipe_change:
            # Same recipe, other rows (a data file edited in place, or another tokenization): the
            # saved loader position would index into different rows.
            raise CheckpointError(
                f"the training data changed since checkpoint {resume_dir} (dataset fingerprint "
                f"{saved_data} -> {run.state['dataset_fingerprint']}, same recipe): a data file was edited, "
                "or the tokenizer or llama-train's data pipeline version differs. Restore them, rerun with "
                "--allow-recipe-change to resume on the new rows anyway, or start over in a new output_dir"
            )
        fingerprint = run.state["dataset_fingerprint"]
        run.state.update(ckpt.load_checkpoint(resume_dir, strategy=run.strategy, scheduler=run.scheduler))
        run.state["dataset_fingerprint"] = fingerprint  # the data this run trains on from here
    except CheckpointError:
        raise
    except Exception as exc:
        if not _is_damage(exc):
            raise  # out of memory, a peer that died, a bug: not the checkpoint's fault
        raise _damaged(run, resume_dir, exc) from None
    run.state.pop("strategy", None)
    run.saved_step = run.state["step"]
    run.loader.load_state_dict(run.state.pop("loader"))
    saved_world = run.state.get("world_size", run.ctx.world_size)
    if saved_world != run.ctx.world_size:
        import yaml

        st = saved.get("train", {})
        saved_batch = st.get("micro_batch_size", 0) * st.get("grad_accum_steps", 1) * saved_world
        same = saved_batch == run.loader.global_batch
        _log(
            run.ctx,
            f"resuming {resume_dir.name} (written by {saved_world} rank(s)) on {run.ctx.world_size}: "
            f"global batch {saved_batch} -> {run.loader.global_batch}"
            + (
                ""
                if same
                else " (the batch size changes from here on; to keep it, set "
                "train.grad_accum_steps so that micro x accum x ranks is equal, "
                "or pin train.global_batch_size)"
            ),
        )
    run.state["world_size"] = run.ctx.world_size
    return resume_dir


def _finished_summary(run: Run) -> dict | None:
    """run.json of this very run when it already ended at the resumed step (and its outputs are
    there), so a rerun neither repeats the final eval and registration nor blanks the summary."""
    path = run.out / "run.json"
    if run.state["step"] < run.steps or not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    output = run.out / ("adapter" if run.recipe.lora.enabled else "model")  # here, even if the directory moved
    same = (
        summary.get("status") == "completed"
        and summary.get("global_step") == run.state["step"]
        and summary.get("recipe_sha256") in _recipe_hashes_any_kernel(run.recipe)
    )
    return summary if same and output.exists() else None


def _recipe_hashes_any_kernel(recipe: Recipe) -> set[str]:
    """The recipe's sha256 under every model.attn_implementation: a run that ended under another
    kernel (e.g. sdpa, the default before `auto`) is the same run, as `_resume` also says."""
    from typing import get_args

    field = type(recipe.model).model_fields["attn_implementation"]
    return {
        recipe.model_copy(update={"model": recipe.model.model_copy(update={"attn_implementation": k})}).sha256()
        for k in get_args(field.annotation)
    }


def _refuse_starting_over(run: Run) -> None:
    """A new run never starts among an earlier run's checkpoints or results: its steps, adapter and
    run.json would mix with theirs (and overwrite them)."""
    earlier = [d.name for d in ckpt.complete_checkpoints(run.ckpt_root)]
    if (run.out / "run.json").exists():
        earlier.append("run.json")
    if earlier:
        resume = run.recipe.checkpoint.resume
        why = (
            f"checkpoint.resume={resume} starts a new one"
            if resume == "never"
            else "it has no checkpoint to resume, so this would train it again"
        )
        raise CheckpointError(
            f"output_dir {run.out} holds an earlier run ({', '.join(earlier)}) and {why}: set a new "
            "output_dir, or delete the earlier run's files to start over in this one"
        )


def _set_aside_metrics(ctx: DistContext, out: Path) -> None:
    """A run that resumes nothing (the earlier attempt died before its first checkpoint): that
    attempt's metrics are kept beside the file, and do not hide this run's steps from the tracker."""
    metrics = out / METRICS_FILE
    if metrics.exists() and metrics.stat().st_size:
        aside = metrics.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        os.replace(metrics, aside)
        _log(ctx, f"no checkpoint to resume: the earlier attempt's {METRICS_FILE} moved to {aside.name}")


def _is_damage(exc: Exception) -> bool:
    """A missing, truncated or corrupt checkpoint file (as torch, safetensors and json report it)."""
    import pickle

    if isinstance(exc, (FileNotFoundError, EOFError, pickle.UnpicklingError, ValueError)):
        return True  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" or (
        isinstance(exc, RuntimeError)
        and not _is_collective_failure(exc)
        and any(s in text for s in ("PytorchStreamReader", "central directory", "unexpected EOF", "file too short"))
    )


def _damaged(run: Run, resume_dir: Path, exc: Exception) -> CheckpointError:
    older = [d.name for d in ckpt.complete_checkpoints(run.ckpt_root) if d != resume_dir]
    fix = (
        f"checkpoint.resume={run.ckpt_root / older[-1]} (the newest other complete checkpoint)"
        if older
        else "checkpoint.resume=never in a new output_dir"
    )
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return CheckpointError(
        f"checkpoint {resume_dir} cannot be loaded ({type(exc).__name__}: {detail[:300]}); "
        f"it is damaged or incomplete. Resume from another one with {fix}"
    )


def _loop(run: Run) -> tuple[str, list[float]]:
    """Optimizer steps until the end or SIGTERM. Returns (status, per-step losses)."""
    ctx, state, t, every = run.ctx, run.state, run.recipe.train, run.recipe.checkpoint.every_n_steps
    losses: list[float] = []
    skips = overflows = 0
    with _SigtermFlag() as sigterm, Progress(total=run.steps, start=state["step"], enabled=ctx.is_main) as progress:
        while state["step"] < run.steps:
            run.faults.before_step(state["step"] + 1)
            # All ranks agree on stopping at this boundary (SIGTERM may reach only some of them).
            if ctx.all_reduce(1.0 if sigterm.raised else 0.0, "max") > 0:
                return "preempted", losses
            res, lr, dt = _train_step(run)
            overflows = overflows + 1 if res.overflow else 0
            skips = skips + 1 if res.skipped and not res.overflow else 0
            if res.overflow:
                _log_overflow(run, res, overflows)
            elif res.skipped:
                _log_skip(run, res, skips)
            losses.append(res.loss)
            _log_step(run, res, lr=lr, dt=dt, progress=progress)
            if t.eval_every_n_steps and state["step"] % t.eval_every_n_steps == 0 and state["step"] < run.steps:
                if t.objective == "dpo":
                    run.tracker.log_metrics(eval_metrics(_evaluate(run)), step=state["step"])
                else:
                    with _eager(run):
                        ev = eval_loss(
                            run.strategy.model,
                            run.data.eval,
                            pad_id=run.tokenizer.pad_token_id,
                            batch_size=max(t.micro_batch_size, 16),
                            device=ctx.device,
                        )
                    run.tracker.log_metrics(
                        {"eval/loss": ev, "eval/perplexity": math.exp(min(ev, 50.0))}, step=state["step"]
                    )
            if every and state["step"] % every == 0 and state["step"] < run.steps:
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
        run.strategy, micro, recipe=run.recipe, inject_nan=run.faults.nan(state["step"] + 1), scaler=run.scaler
    )
    run.scheduler.step()
    state["step"] += 1
    state["consumed_samples"] += run.loader.last_step_samples
    state["consumed_tokens"] += res.tokens
    if not res.skipped:  # the loss of the weights a checkpoint holds (export's manifest reports it)
        state["train_loss"] = res.loss
    if run.ledger.enabled:
        ids = [
            x
            for idx in indices
            for i in idx
            if not is_filler(i)
            for x in (data[i].get("ids") or [data[i].get("id", i)])
        ]
        run.ledger.write(
            {
                "step": state["step"],
                "ids": ids,
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


def _log_skip(run: Run, res: StepResult, skips: int) -> None:
    t = run.recipe.train
    _log(
        run.ctx,
        f"step {run.state['step']}: non-finite loss/grad norm (loss={res.loss}, grad_norm="
        f"{res.grad_norm}, non-finite loss on rank(s) {res.bad_ranks or 'none'}); update skipped on "
        f"all ranks ({skips} in a row)",
    )
    if skips >= t.max_nonfinite_skips:
        raise NonFiniteError(
            f"{skips} consecutive non-finite steps up to step {run.state['step']} "
            f"(train.max_nonfinite_skips={t.max_nonfinite_skips}); lower train.lr or check the data"
        )


MAX_OVERFLOWS = 32  # halvings: from the default 2^16 down to 2^-16


def _log_overflow(run: Run, res: StepResult, overflows: int) -> None:
    scale = f"; loss scale now {run.scaler.scale:g}" if run.scaler else " (DeepSpeed lowers its loss scale)"
    _log(
        run.ctx,
        f"step {run.state['step']}: fp16 gradient overflow (loss {res.loss:.4f} is finite); update "
        f"skipped on all ranks{scale} ({overflows} in a row)",
    )
    if overflows >= MAX_OVERFLOWS:
        raise NonFiniteError(
            f"{overflows} consecutive fp16 gradient overflows up to step {run.state['step']}: "
            "the gradients are not finite at any loss scale; use train.precision: bf16 "
            "(or fp32), or lower train.lr"
        )


def _log_step(run: Run, res: StepResult, *, lr: float, dt: float, progress: Progress) -> None:
    state = run.state
    if state["step"] % run.recipe.train.log_every_n_steps == 0 or state["step"] == run.steps:
        # FLOP/s and MFU per device: the step's tokens are counted over all ranks.
        flops_per_s = res.tokens / dt * run.flops_per_token / run.ctx.world_size
        metrics = {
            "train/loss": res.loss,
            "train/lr": lr,
            "train/grad_norm": res.grad_norm,
            "train/tokens_per_s": res.tokens / dt,
            "train/supervised_tokens": res.supervised,
            "train/supervised_tokens_per_s": res.supervised / dt,
            "train/consumed_samples": state["consumed_samples"],
            "train/tflops_per_device": flops_per_s / 1e12,
            **_memory_metrics(run.ctx.device),
            # passes over the training rows (fractional): the x axis people think in
            "train/epoch": state["consumed_samples"] / max(len(run.data.train), 1),
        }
        if run.peak_flops:
            metrics["train/mfu"] = flops_per_s / run.peak_flops
        if run.scaler:
            metrics["train/loss_scale"] = run.scaler.scale
        if res.metrics:  # DPO: named as TRL names them
            metrics.update({f"train/{k}": v for k, v in res.metrics.items()})
        run.tracker.log_metrics(metrics, step=state["step"])
    progress.update(state["step"], loss=res.loss, lr=lr, tokens_per_s=res.tokens / dt)


def _memory_metrics(device: torch.device) -> dict[str, float]:
    import resource

    out = {"train/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if device.type == "cuda":
        out["train/gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _eager(run: Run):
    """Evaluation and generation run the compiled layers eagerly (train.compile): their shapes
    (padded eval batches, a growing KV cache) would each cost a compilation."""
    if run.recipe.train.compile:
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def _evaluate(run: Run) -> dict:
    if run.recipe.train.objective == "dpo":
        from llama_train.dpo import eval_preferences

        with _eager(run):
            return eval_preferences(
                run.strategy.model,
                run.data.eval,
                pad_id=run.tokenizer.pad_token_id,
                batch_size=run.recipe.train.micro_batch_size,
                device=run.ctx.device,
                attn_implementation=resolve_attention(run.recipe.model.attn_implementation),
                mask_dtype=DTYPES[run.recipe.model.dtype],
            )
    with _eager(run):
        return evaluate(
            run.strategy.model,
            run.tokenizer,
            run.data.eval,
            run.data.eval_rows,
            recipe=run.recipe,
            device=run.ctx.device,
        )


def _finish(run: Run, losses: list[float]) -> dict:
    """Final eval, adapter/model, run.json, MLflow artifacts and registry. Collective."""
    recipe, ctx, state, out = run.recipe, run.ctx, run.state, run.out
    eval_after = _evaluate(run) if run.data.eval else None
    weights = run.strategy.trainable_state_dict()  # collective under FSDP: every rank calls it
    summary = {
        "status": "completed",
        "objective": recipe.train.objective,
        "global_step": state["step"],
        "train_loss": losses[-1] if losses else None,
        "train_loss_first": losses[0] if losses else None,
        # (step, loss) of the steps this process ran (after a resume: the resumed part only)
        "loss_history": [[state["step"] - len(losses) + i + 1, loss] for i, loss in enumerate(losses)],
        "eval": {"before": state["eval_before"], "after": eval_after},
        "base_model": run.base_path,
        "recipe_sha256": recipe.sha256(),
        "run_name": recipe.tracking.run_name or out.resolve().name,
        "world_size": ctx.world_size,
        "strategy": recipe.parallel.strategy,
        "consumed_samples": state["consumed_samples"],
        "consumed_tokens": state["consumed_tokens"],
        # this process's optimizer steps only (eval and loading excluded)
        "train_runtime_s": run.runtime_s,
        "supervised_tokens_total": run.supervised_total,
        "supervised_tokens_per_s": run.supervised_total / run.runtime_s if run.runtime_s else None,
        "data": run.data.stats,
        "tracking_run_id": state["tracking_run_id"],
    }
    if not ctx.is_main:
        return summary
    summary.update(_write_outputs(out, run.strategy.module, weights, run.tokenizer, recipe))
    tracker = run.tracker
    if eval_after:
        tracker.log_metrics(eval_metrics(eval_after), step=state["step"])
        _log(ctx, f"eval after training: {_fmt_eval(eval_after)}")
    tracker.log_metrics(summary_metrics(summary), step=state["step"])
    table = examples_table(state["eval_before"], eval_after, step=state["step"])
    if table:
        tracker.log_table(table, "eval_examples.json")
    if summary.get("adapter_dir"):
        tracker.log_artifact(summary["adapter_dir"], artifact_path="adapter")
        if recipe.tracking.registered_model_name:
            base = base_model_label(recipe, run.base_path)
            summary["registered_version"] = register_adapter(
                tracker,
                summary["adapter_dir"],
                name=recipe.tracking.registered_model_name,
                tags=version_tags(
                    base_model=base,
                    recipe_sha256=summary["recipe_sha256"],
                    dataset_fingerprint=state["dataset_fingerprint"],
                    eval_before=state["eval_before"],
                    eval_after=eval_after,
                ),
                description=version_description(
                    base_model=base,
                    recipe_sha256=summary["recipe_sha256"],
                    run_name=summary["run_name"],
                    eval_before=state["eval_before"],
                    eval_after=eval_after,
                    metric="preference_accuracy" if recipe.train.objective == "dpo" else recipe.gate.metric,
                    global_step=state["step"],
                ),
            )
    (out / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    tracker.log_artifact(out / "run.json")
    tracker.log_artifact(out / "recipe.yaml")
    return summary


def _write_outputs(out: Path, module, weights: dict, tokenizer, recipe: Recipe) -> dict:
    """adapter/ (LoRA) or model/ (full), written atomically from the gathered trainable weights."""
    name = "adapter" if recipe.lora.enabled else "model"
    final = out / name
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if recipe.lora.enabled:
        write_adapter(tmp, module, weights)
    else:
        # Written from the gathered state dict, so it works for sharded (FSDP/ZeRO-3) models too.
        from safetensors.torch import save_file

        tmp.mkdir(parents=True)
        module.config.save_pretrained(str(tmp))
        if getattr(module, "generation_config", None) is not None:
            module.generation_config.save_pretrained(str(tmp))
        save_file(
            {k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"}
        )
        tokenizer.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return {"adapter_dir" if recipe.lora.enabled else "model_dir": str(final.resolve())}


def _fmt_eval(ev: dict) -> str:
    parts = [f"loss {ev['loss']:.4f}"]
    if "preference_accuracy" in ev:
        parts += [f"preference accuracy {ev['preference_accuracy']:.3f}", f"reward margin {ev['reward_margin']:.4f}"]
    if "exact_match" in ev:
        parts.append(f"exact_match {ev['exact_match']:.3f}")
    return ", ".join(parts) + f" on {ev['num_samples']} rows"


def _log(ctx: DistContext, msg: str) -> None:
    if ctx.is_main:
        from rich.console import Console

        Console(stderr=True).print(f"[bold cyan]llama-train[/] {msg}", highlight=False)
