"""Checks that run before any work: hardware fit, world-size arithmetic, a memory estimate.

`llama-train recipe validate` prints the report; `run` and every torchrun rank call the same
checks, so a recipe that cannot run fails in seconds with a message naming the keys.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from llama_train.config import ModelConfig, ParallelConfig, Recipe
from llama_train.errors import PreflightError

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def check_world(recipe: Recipe, world_size: int) -> None:
    t, p = recipe.train, recipe.parallel
    if world_size > 1 and p.strategy == "single":
        raise PreflightError(
            f"world size {world_size} needs parallel.strategy ddp | fsdp | deepspeed (parallel.strategy is `single`)"
        )
    product = t.micro_batch_size * t.grad_accum_steps * world_size
    if t.global_batch_size is not None and t.global_batch_size != product:
        per = t.micro_batch_size * world_size
        hint = (
            f"set train.grad_accum_steps={t.global_batch_size // per}"
            if t.global_batch_size % per == 0
            else f"train.global_batch_size must be a multiple of train.micro_batch_size x world size = {per}"
        )
        raise PreflightError(
            f"train.global_batch_size={t.global_batch_size} != train.micro_batch_size ({t.micro_batch_size}) "
            f"x train.grad_accum_steps ({t.grad_accum_steps}) x world size ({world_size}) = {product}; {hint}"
        )


def check_hardware(recipe: Recipe) -> None:
    cuda = torch.cuda.is_available()
    m, p = recipe.model, recipe.parallel
    if m.quantization != "none" and not cuda:
        raise PreflightError(
            "model.quantization: nf4 (QLoRA) needs a CUDA GPU and bitsandbytes; this machine "
            "has no CUDA. Use model.quantization: none (plain LoRA) here"
        )
    if m.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise PreflightError("model.quantization: nf4 needs bitsandbytes: pip install 'llama_train[qlora]'")
    if m.attn_implementation == "flash_attention_2" and not cuda:
        raise PreflightError("model.attn_implementation: flash_attention_2 needs CUDA; use sdpa on CPU")
    if p.backend == "nccl" and not cuda:
        raise PreflightError("parallel.backend: nccl needs CUDA GPUs; use parallel.backend: gloo (or auto)")
    if p.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise PreflightError("parallel.strategy: deepspeed needs DeepSpeed: pip install 'llama_train[deepspeed]'")
    if recipe.train.precision == "fp16" and p.strategy == "deepspeed" and not cuda:
        raise PreflightError(
            "train.precision: fp16 with parallel.strategy deepspeed needs CUDA GPUs (DeepSpeed's "
            "CPU accelerator has no fp16); use bf16 or fp32 here, or strategy ddp/fsdp"
        )


def _model_shape(model: ModelConfig) -> dict | None:
    """config.json of the base, if it is on disk (no download); the tiny defaults for `tiny`."""
    if model.source == "tiny":
        from llama_train.tiny import TINY_DEFAULTS

        return dict(TINY_DEFAULTS)
    m = model
    if m.source == "catalogue":  # converted already? (preflight never downloads)
        from llama_train.models.cache import cache_root
        from llama_train.models.catalogue import entry

        cfg = cache_root() / "gguf" / entry(m.path, key="model.path").gguf_sha256 / "config.json"
    elif m.source == "gguf":  # converted already? (every rank runs preflight: it never converts)
        from llama_train.models.gguf import cached_dir

        cfg = (cached_dir(m.path) or Path("/nonexistent")) / "config.json"
    else:
        cfg = Path(m.path or "") / "config.json"
    return json.loads(cfg.read_text()) if cfg.is_file() else None


def _shard_factors(parallel: ParallelConfig, world_size: int) -> dict[str, int]:
    """How many ways weights, gradients and optimizer state are split across ranks.
    DDP: none. ZeRO-1: optimizer. ZeRO-2: + gradients. ZeRO-3 and FSDP: + weights."""
    p = parallel
    level = {"single": 0, "ddp": 0, "fsdp": 3, "deepspeed": p.zero_stage}[p.strategy]
    return {
        "optimizer": world_size if level >= 1 else 1,
        "gradients": world_size if level >= 2 else 1,
        "weights": world_size if level >= 3 else 1,
    }


def estimate_memory(recipe: Recipe, world_size: int) -> dict | None:
    """Per-rank device bytes of weights, gradients, optimizer state and activations (rough, no
    allocator caches), for the chosen strategy; `cpu_offloaded` is what offload moves to host RAM."""
    c = _model_shape(recipe.model)
    if c is None:
        return None
    h, L, v, i = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["intermediate_size"]
    kv = h * c.get("num_key_value_heads", c["num_attention_heads"]) // c["num_attention_heads"]
    per_layer = h * (2 * h + 2 * kv) + 3 * h * i
    params = L * per_layer + 2 * v * h
    wbytes = 0.55 if recipe.model.quantization == "nf4" else BYTES[recipe.model.dtype]
    lc = recipe.lora
    if lc.enabled:
        dims = {
            "q_proj": (h, h),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (h, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        trainable = L * sum(lc.r * (a + b) for name, (a, b) in dims.items() if name in lc.target_modules)
    else:
        trainable = params
    shard = _shard_factors(recipe.parallel, world_size)
    p, t = recipe.parallel, recipe.train
    offload_opt = p.cpu_offload and p.strategy in ("fsdp", "deepspeed")
    offload_params = p.cpu_offload and shard["weights"] > 1  # FSDP CPUOffloadPolicy / ZeRO-3 offload_param
    weights = params * wbytes / shard["weights"]
    # Sharded weights are all-gathered one decoder layer at a time (plus one prefetched).
    gathered = 2 * per_layer * wbytes if shard["weights"] > 1 else 0
    optimizer = trainable * (8 + (4 if wbytes < 4 else 0)) / shard["optimizer"]  # Adam m, v (+ fp32 master)
    tokens = t.micro_batch_size * recipe.data.seq_len
    act_per_layer = tokens * h * 34 * (2 if t.precision != "fp32" else 4) / 2  # ~34 h bytes/token/layer (bf16)
    acts = (tokens * h * 2 * L) if recipe.model.gradient_checkpointing else act_per_layer * L
    est = {
        "weights": 0 if offload_params else weights,
        "gathered_layers": gathered,
        "gradients": trainable * 4 / shard["gradients"],
        "optimizer": 0 if offload_opt else optimizer,
        "activations": acts,
        "loss_head": min(t.loss_chunk_size, tokens) * v * 4 * 2,
    }
    est["total"] = sum(est.values())
    est["cpu_offloaded"] = (optimizer if offload_opt else 0) + (weights if offload_params else 0)
    return est


def preflight(recipe: Recipe, *, world_size: int | None = None, local: bool = True) -> list[str]:
    """Raise PreflightError when the recipe cannot run here; else return report lines.
    `local=False` checks the recipe for the cluster it targets: world size and configs, not the
    devices and packages of this machine (`recipe validate --cluster`)."""
    import os

    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    check_world(recipe, world)
    if local:
        check_hardware(recipe)
    if recipe.parallel.strategy == "deepspeed":
        from llama_train.parallel import deepspeed_config

        deepspeed_config(recipe, world)  # a user JSON that contradicts the recipe fails here
    lines = [
        f"strategy {recipe.parallel.strategy} on {world} rank(s); global batch "
        f"{recipe.train.micro_batch_size * recipe.train.grad_accum_steps * world} samples"
    ]
    est = estimate_memory(recipe, world)
    if est:
        gib = {k: v / 2**30 for k, v in est.items()}
        host = gib.pop("cpu_offloaded")
        lines.append(
            "device memory per rank (estimate, GiB): "
            + ", ".join(f"{k} {v:.2f}" for k, v in gib.items())
            + (f"; host RAM for offloaded state {host:.2f}" if host else "")
        )
    else:
        lines.append("memory estimate: base model config not on disk (hub id); skipped")
    if not local:
        lines.append("this machine's devices and packages not checked (--cluster): the pods check them at start")
    return lines
