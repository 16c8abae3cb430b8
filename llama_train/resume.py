"""Resume policy: which checkpoint a start loads, and what it refuses.

checkpoint.py is the mechanism (the atomic commit, the files); this module decides: the newest
complete checkpoint (or the named one), a changed recipe or changed data refused with a diff, a
damaged checkpoint named with the fix, a world-size change reported, a new run refused among an
earlier run's files, and a run that already finished recognised (its run.json) so that the same
command again does nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from llama_train import checkpoint as ckpt
from llama_train.artifacts import TrainingState
from llama_train.config import Recipe, diff_recipes
from llama_train.data.loader import StepLoader
from llama_train.dist import DistContext, is_collective_failure
from llama_train.errors import CheckpointError
from llama_train.progress import log
from llama_train.tracking.sync import METRICS_FILE

RUN_SUMMARY = "run.json"


def resume(
    out: Path,
    recipe: Recipe,
    recipe_yaml: str,
    state: TrainingState,
    *,
    strategy,
    scheduler,
    loader: StepLoader,
    ctx: DistContext,
    allow_recipe_change: bool,
) -> Path | None:
    """Load the newest complete checkpoint of `out` (or the one named) into the strategy, scheduler,
    loader and `state`; refuse a changed recipe or changed data. Returns the checkpoint loaded, or
    None for a fresh start (refused among an earlier run's files). Collective."""
    ckpt_root = out / ckpt.CHECKPOINTS
    resume_dir = ckpt.find_resume(ckpt_root, recipe.checkpoint.resume)
    if resume_dir is None:
        refuse_starting_over(out, recipe.checkpoint.resume)
        return None
    import yaml

    try:
        saved_recipe = (resume_dir / "recipe.yaml").read_text()
        saved = yaml.safe_load(saved_recipe)
        if not isinstance(saved, dict):
            raise ValueError("recipe.yaml is not a recipe mapping")
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise _damaged(ckpt_root, resume_dir, exc) from None
    current = yaml.safe_load(recipe_yaml)
    # Which checkpoint to resume from is not part of the run: naming an older one is not a change.
    # Nor is the attention kernel: sdpa, doc_sdpa and doc_varlen compute the same attention (a
    # checkpoint written before `auto` became the default says sdpa).
    kernels = [r.get("model", {}).pop("attn_implementation", None) for r in (saved, current)]
    for r in (saved, current):
        r.get("checkpoint", {}).pop("resume", None)
    if kernels[0] != kernels[1]:
        log(
            ctx,
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
        if saved_data not in (None, state.dataset_fingerprint) and not allow_recipe_change:
            # Same recipe, other rows (a data file edited in place, or another tokenization): the
            # saved loader position would index into different rows.
            raise CheckpointError(
                f"the training data changed since checkpoint {resume_dir} (dataset fingerprint "
                f"{saved_data} -> {state.dataset_fingerprint}, same recipe): a data file was edited, "
                "or the tokenizer or llama-train's data pipeline version differs. Restore them, rerun with "
                "--allow-recipe-change to resume on the new rows anyway, or start over in a new output_dir"
            )
        saved_state = TrainingState.from_json(ckpt.load_checkpoint(resume_dir, strategy=strategy, scheduler=scheduler))
    except CheckpointError:
        raise
    except Exception as exc:
        if not _is_damage(exc):
            raise  # out of memory, a peer that died, a bug: not the checkpoint's fault
        raise _damaged(ckpt_root, resume_dir, exc) from None
    loader.load_state_dict(saved_state.loader)
    saved_world = saved_state.world_size
    # the data this run trains on from here, on this world size; the loader's position is in `loader`
    state.restore(saved_state, keep=("dataset_fingerprint", "world_size", "loader", "strategy"))
    if saved_world != ctx.world_size:
        st = saved.get("train", {})
        saved_batch = st.get("micro_batch_size", 0) * st.get("grad_accum_steps", 1) * saved_world
        same = saved_batch == loader.global_batch
        log(
            ctx,
            f"resuming {resume_dir.name} (written by {saved_world} rank(s)) on {ctx.world_size}: "
            f"global batch {saved_batch} -> {loader.global_batch}"
            + (
                ""
                if same
                else " (the batch size changes from here on; to keep it, set "
                "train.grad_accum_steps so that micro x accum x ranks is equal, "
                "or pin train.global_batch_size)"
            ),
        )
    return resume_dir


def finished_summary(out: Path, recipe: Recipe, *, step: int, steps: int) -> dict | None:
    """run.json of this very run when it already ended at the resumed `step` (of `steps`) and its
    outputs are there, so a rerun neither repeats the final eval and registration nor blanks the summary."""
    path = out / RUN_SUMMARY
    if step < steps or not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    output = out / ("adapter" if recipe.lora.enabled else "model")  # here, even if the directory moved
    same = (
        summary.get("status") == "completed"
        and summary.get("global_step") == step
        and summary.get("recipe_sha256") in _recipe_hashes_any_kernel(recipe)
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


def refuse_starting_over(out: Path, resume: str) -> None:
    """A new run never starts among an earlier run's checkpoints or results: its steps, adapter and
    run.json would mix with theirs (and overwrite them). `resume`: checkpoint.resume."""
    earlier = [d.name for d in ckpt.complete_checkpoints(out / ckpt.CHECKPOINTS)]
    if (out / RUN_SUMMARY).exists():
        earlier.append(RUN_SUMMARY)
    if earlier:
        why = (
            f"checkpoint.resume={resume} starts a new one"
            if resume == "never"
            else "it has no checkpoint to resume, so this would train it again"
        )
        raise CheckpointError(
            f"output_dir {out} holds an earlier run ({', '.join(earlier)}) and {why}: set a new "
            "output_dir, or delete the earlier run's files to start over in this one"
        )


def set_aside_metrics(ctx: DistContext, out: Path) -> None:
    """A run that resumes nothing (the earlier attempt died before its first checkpoint): that
    attempt's metrics are kept beside the file, and do not hide this run's steps from the tracker."""
    metrics = out / METRICS_FILE
    if metrics.exists() and metrics.stat().st_size:
        aside = metrics.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        os.replace(metrics, aside)
        log(ctx, f"no checkpoint to resume: the earlier attempt's {METRICS_FILE} moved to {aside.name}")


def _is_damage(exc: Exception) -> bool:
    """A missing, truncated or corrupt checkpoint file (as torch, safetensors and json report it)."""
    import pickle

    if isinstance(exc, (FileNotFoundError, EOFError, pickle.UnpicklingError, ValueError)):
        return True  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" or (
        isinstance(exc, RuntimeError)
        and not is_collective_failure(exc)
        and any(s in text for s in ("PytorchStreamReader", "central directory", "unexpected EOF", "file too short"))
    )


def _damaged(ckpt_root: Path, resume_dir: Path, exc: Exception) -> CheckpointError:
    older = [d.name for d in ckpt.complete_checkpoints(ckpt_root) if d != resume_dir]
    fix = (
        f"checkpoint.resume={ckpt_root / older[-1]} (the newest other complete checkpoint)"
        if older
        else "checkpoint.resume=never in a new output_dir"
    )
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return CheckpointError(
        f"checkpoint {resume_dir} cannot be loaded ({type(exc).__name__}: {detail[:300]}); "
        f"it is damaged or incomplete. Resume from another one with {fix}"
    )
