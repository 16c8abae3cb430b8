"""Publishing a finished run (rank 0): the adapter or model directory, run.json, the MLflow
metrics, tables and artifacts, and the registered model version."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llama_train.adapter import write as write_adapter
from llama_train.artifacts import RUN_SUMMARY_FILE, RunSummary
from llama_train.config import Recipe
from llama_train.tracking.datasets import examples_table
from llama_train.tracking.params import (
    base_model_label,
    eval_metrics,
    summary_metrics,
    version_description,
    version_tags,
)
from llama_train.tracking.registry import register_adapter


def publish(
    out: Path,
    summary: RunSummary,
    *,
    recipe: Recipe,
    module,
    weights: dict,
    tokenizer,
    tracker,
    dataset_fingerprint: str | None,
) -> None:
    """Write adapter/ (or model/) from the gathered `weights`, log the final metrics and files,
    register the adapter when tracking.registered_model_name is set, and write run.json last (its
    presence says the run ended: a rerun of the same command then does nothing). Fills in
    `summary`'s output directory and registered version."""
    outputs = write_outputs(out, module, weights, tokenizer, lora=recipe.lora.enabled)
    summary.adapter_dir, summary.model_dir = outputs.get("adapter_dir"), outputs.get("model_dir")
    before, after = summary.eval["before"], summary.eval["after"]
    if after:
        tracker.log_metrics(eval_metrics(after), step=summary.global_step)
    tracker.log_metrics(summary_metrics(summary.to_json()), step=summary.global_step)
    table = examples_table(before, after, step=summary.global_step)
    if table:
        tracker.log_table(table, "eval_examples.json")
    if summary.adapter_dir:
        tracker.log_artifact(summary.adapter_dir, artifact_path="adapter")
        if recipe.tracking.registered_model_name:
            base = base_model_label(recipe.model, summary.base_model)
            summary.registered_version = register_adapter(
                tracker,
                summary.adapter_dir,
                name=recipe.tracking.registered_model_name,
                tags=version_tags(
                    base_model=base,
                    recipe_sha256=summary.recipe_sha256,
                    dataset_fingerprint=dataset_fingerprint,
                    eval_before=before,
                    eval_after=after,
                ),
                description=version_description(
                    base_model=base,
                    recipe_sha256=summary.recipe_sha256,
                    run_name=summary.run_name,
                    eval_before=before,
                    eval_after=after,
                    metric="preference_accuracy" if recipe.train.objective == "dpo" else recipe.gate.metric,
                    global_step=summary.global_step,
                ),
            )
    summary.write(out / RUN_SUMMARY_FILE)
    tracker.log_artifact(out / RUN_SUMMARY_FILE)
    tracker.log_artifact(out / "recipe.yaml")


def write_outputs(out: Path, module, weights: dict, tokenizer, *, lora: bool) -> dict:
    """adapter/ (LoRA) or model/ (full), written atomically from the gathered trainable weights."""
    name = "adapter" if lora else "model"
    final = out / name
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if lora:
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
    return {"adapter_dir" if lora else "model_dir": str(final.resolve())}
