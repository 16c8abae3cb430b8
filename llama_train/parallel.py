"""Parallel strategies, applied as functions to the model and optimizer.

`apply_strategy()` returns a `Strategy` whose few verbs (no_sync, backward, clip_and_step;
trainable_state_dict) hide DDP/FSDP2/DeepSpeed from the training loop. Process groups are in
dist.py; how a strategy's state is written into a checkpoint in strategy_state.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from pathlib import Path

import torch

from llama_train import strategy_state
from llama_train.config import Recipe
from llama_train.dist import DistContext
from llama_train.errors import PreflightError
from llama_train.optim import make_optimizer


class Strategy:
    """Single process and DDP. Subclasses override what differs.

    Verbs the loop uses: `model(**inputs)`, `no_sync`, `backward`, `clip_and_step`. Checkpoints
    (strategy_state.py) and exports use `trainable_state_dict`; `name` picks the checkpoint format.
    `optimizer` is the torch optimizer (the LR scheduler drives its param groups under every strategy).
    """

    name = "ddp"
    # Can a checkpoint written with world size N be resumed with world size M?
    resharding_allowed = True

    def __init__(self, model, optimizer, ctx: DistContext):
        self.model = model  # what the loop calls forward on
        self.optimizer = optimizer
        self.ctx = ctx

    @property
    def train_module(self):
        """The TrainModule inside any DDP/DeepSpeed wrapper (forward → loss, generate)."""
        return getattr(self.model, "module", self.model)

    @property
    def module(self):
        """The Hugging Face / PEFT model (for save_pretrained, peft_config)."""
        return self.train_module.inner

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.module.named_parameters() if p.requires_grad]

    def no_sync(self, last_micro_batch: bool):
        if last_micro_batch or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_and_step(self, max_norm: float | None, grad_scale: float = 1.0) -> tuple[float, bool]:
        """Divide the gradients by `grad_scale` (the fp16 loss scale), clip the global grad norm, step
        unless it is NaN/Inf, zero grads. Returns (norm, applied). The norm is global (gradients are
        already reduced), so every rank takes the same decision."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if grad_scale != 1.0:
            with torch.no_grad():
                for p in params:
                    p.grad.mul_(1.0 / grad_scale)  # a power of two: exact
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norm = float(norm)
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable weights keyed as in the unwrapped model, on CPU. Collective;
        complete on rank 0 (other ranks may get an empty dict)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.module.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def save_state(self, path: Path) -> None:
        """Weights and optimizer into checkpoint directory `path`, in this strategy's format
        (strategy_state.py). Collective."""
        strategy_state.save(self, path)

    def load_state(self, path: Path) -> None:
        strategy_state.load(self, path)

    def local_digest(self) -> str:
        """sha256 of this rank's trainable parameter storage (test hook: did a step change it?)."""
        h = hashlib.sha256()
        for n, p in self.module.named_parameters():
            if p.requires_grad:
                t = p.detach()
                t = t.to_local() if hasattr(t, "to_local") else t
                t = getattr(p, "ds_tensor", t)  # ZeRO-3: this rank's partition
                h.update(n.encode())
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()


class FSDPStrategy(Strategy):
    """FSDP2: gradients reduce-scattered, parameters and optimizer state sharded (DTensor)."""

    name = "fsdp"
    resharding_allowed = True  # torch.distributed.checkpoint reshards on load

    def no_sync(self, last_micro_batch: bool):
        self.model.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def sharded_state(self) -> dict:
        """This rank's shards of the trainable weights and the optimizer (torch.distributed.checkpoint)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        names = set(self.trainable_names())
        model_sd = {k: v for k, v in get_model_state_dict(self.model).items() if k.removeprefix("inner.") in names}
        return {"model": model_sd, "optim": get_optimizer_state_dict(self.model, self.optimizer)}

    def trainable_state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        names = set(self.trainable_names())
        full = {k.removeprefix("inner."): v for k, v in full.items()}
        return {n: t for n, t in full.items() if n in names}


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO 1/2/3. The engine runs in unmanaged gradient accumulation: every `backward`
    accumulates locally, `clip_and_step` is the boundary (reduce, clip, overflow check, step)."""

    name = "deepspeed"
    # DeepSpeed's own checkpoints hold per-rank optimizer partitions; a different world size would
    # need DeepSpeed's universal-checkpoint conversion, which is not wired in.
    resharding_allowed = False

    def __init__(self, engine, optimizer, ctx: DistContext, *, zero_stage: int):
        super().__init__(engine, optimizer, ctx)
        self.zero_stage = zero_stage

    def no_sync(self, last_micro_batch: bool):
        return contextlib.nullcontext()  # unmanaged accumulation: reduction happens in step()

    def backward(self, loss):
        self.model.backward(loss, scale_wrt_gas=False)  # the loop already normalizes the loss

    def clip_and_step(self, max_norm, grad_scale: float = 1.0):
        # ZeRO computes the global norm, clips (gradient_clipping) and skips the update on all
        # ranks when the norm is NaN/Inf (was_step_applied() is then False). Under fp16 the engine
        # scales the loss itself (its own dynamic scaler), so `grad_scale` is always 1 here.
        self.model.step()
        norm = self.model.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        applied = bool(self.model.was_step_applied())
        if not applied and math.isfinite(norm):
            norm = float("nan")
        return norm, applied

    def _gathered(self, params, modifier_rank=None):
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
        return contextlib.nullcontext()

    def trainable_state_dict(self):
        from deepspeed.utils import safe_get_full_fp32_param

        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if self.model.bfloat16_enabled() or self.model.fp16_enabled():
            # The optimizer's float32 master weights: the module's parameters are their 16-bit
            # copies, and exporting those would round the trained weights. Collective (every rank
            # all-reduces each parameter's partitions), so every rank calls it in the same order.
            masters = [safe_get_full_fp32_param(p) for _, p in named]
            if all(m is not None for m in masters):
                return {n: m.detach().to("cpu", torch.float32, copy=True) for (n, _), m in zip(named, masters)}
        # float32 (the parameters are the masters), or no optimizer-owned copy: gathered under ZeRO-3
        with self._gathered([p for _, p in named]):
            return {n: p.detach().to("cpu", copy=True) for n, p in named}


def apply_strategy(model, recipe: Recipe, ctx: DistContext) -> Strategy:
    """Wrap `model` (HF/PEFT) for the recipe's strategy and build its optimizer."""
    from llama_train.model import TrainModule

    strategy = recipe.parallel.strategy
    inner = model
    reference = None
    if recipe.train.objective == "dpo" and not recipe.lora.enabled:
        # full fine-tuning: a frozen copy of the base, before any update (a resume rebuilds the same
        # one) and before the policy is moved or wrapped; `prepare_reference` places it per strategy
        import copy

        from llama_train.dpo import FrozenReference

        reference = FrozenReference(copy.deepcopy(inner), chunk_size=recipe.train.loss_chunk_size)
    if recipe.model.quantization == "none" and strategy != "deepspeed":
        model.to(ctx.device)
    if recipe.train.objective == "dpo":
        from llama_train.dpo import DPOModule

        d = recipe.dpo
        model = DPOModule(
            inner,
            beta=d.beta,
            loss=d.loss,
            label_smoothing=d.label_smoothing,
            reference_model=reference,
            chunk_size=recipe.train.loss_chunk_size,
        )
    else:
        model = TrainModule(inner, chunk_size=recipe.train.loss_chunk_size)
    if strategy in ("single", "ddp"):
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        plain = Strategy(model, make_optimizer(model, recipe.train), ctx)
        plain.name = strategy
        result = plain
    elif strategy == "fsdp":
        result = _apply_fsdp(model, inner, recipe, ctx)
    elif strategy == "deepspeed":
        result = _apply_deepspeed(model, inner, recipe, ctx)
    else:
        raise PreflightError(f"parallel.strategy {strategy!r} is not available in this build")
    if reference is not None:
        result.train_module.set_reference_pass(prepare_reference(reference, result, recipe, ctx))
    return result


def prepare_reference(reference, strategy: Strategy, recipe: Recipe, ctx: DistContext):
    """Place DPO's frozen reference (a `FrozenReference`, full fine-tuning) as the strategy placed the
    policy, and return what the policy's forward calls. single/ddp and ZeRO-1/2 (parameters not
    partitioned): a whole copy on each rank, in the policy's dtypes. FSDP2: sharded like the policy
    (decoder layers and root, the same mixed precision and offload), resharded after its forward.
    ZeRO-3: partitioned by an engine of its own without optimizer (as TRL's DPOTrainer prepares its
    reference model). No optimizer, no gradients, not in checkpoints: it is rebuilt from the base."""
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import fully_shard

        kwargs = _fsdp_kwargs(recipe, ctx)
        # Reshard after the forward also at the root (whose default is to keep its parameters
        # gathered until the backward, which the reference never has).
        for layer in decoder_layers(reference.model):
            fully_shard(layer, reshard_after_forward=True, **kwargs)
        fully_shard(reference, reshard_after_forward=True, **kwargs)
        return reference
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage == 3:
        import deepspeed

        cfg = deepspeed_config(recipe, ctx.world_size)
        for key in ("optimizer", "scheduler"):  # a user's JSON may name them: the reference has neither
            cfg.pop(key, None)
        cfg["zero_optimization"].pop("offload_optimizer", None)
        engine, *_ = deepspeed.initialize(model=reference, config=cfg, dist_init_required=False)
        engine.eval()
        # the chunked log-probs read lm_head.weight outside lm_head.forward (as for the policy)
        deepspeed.zero.register_external_parameter(reference, reference.model.lm_head.weight)
        return engine
    # A whole copy: on the policy's device, each parameter and buffer in its policy twin's dtype
    # (DeepSpeed casts the policy's parameters to its bf16/fp16 setting itself).
    policy = strategy.module
    params, buffers = dict(policy.named_parameters()), dict(policy.named_buffers())
    with torch.no_grad():
        for name, tensors, twins in (
            ("parameter", dict(reference.model.named_parameters()), params),
            ("buffer", dict(reference.model.named_buffers()), buffers),
        ):
            for n, t in tensors.items():
                twin = twins.get(n)
                if twin is None:
                    raise PreflightError(f"DPO reference: the policy has no {name} {n}")
                t.data = t.data.to(device=twin.device, dtype=twin.dtype)
    return reference


def _fsdp_kwargs(recipe: Recipe, ctx: DistContext) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    kwargs: dict = {}
    if recipe.train.precision != "fp32":
        dt = torch.bfloat16 if recipe.train.precision == "bf16" else torch.float16
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=torch.float32)
    if recipe.parallel.cpu_offload:
        # pinned host memory needs an accelerator; on a CPU device the offload path runs unpinned
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda")
    return kwargs


def _apply_fsdp(model, inner, recipe: Recipe, ctx: DistContext) -> FSDPStrategy:
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kwargs = _fsdp_kwargs(recipe, ctx)
    for layer in decoder_layers(inner):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)  # root: embeddings, final norm, lm_head
    register_fsdp_forward_method(model, "generate")
    return FSDPStrategy(model, make_optimizer(model, recipe.train), ctx)


def deepspeed_config(recipe: Recipe, world_size: int) -> dict:
    """The DeepSpeed JSON built from the recipe, with a user's `parallel.deepspeed_config` merged on
    top. Batch sizes, accumulation mode and clipping always come from the recipe (the loop owns them)."""
    t, p = recipe.train, recipe.parallel
    zero: dict = {"stage": p.zero_stage}
    if p.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if p.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    cfg: dict = {
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": round(math.log2(t.loss_scale_init))},
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch AdamW
        "zero_force_ds_cpu_optimizer": False,  # ... also with optimizer offload
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if p.deepspeed_config:
        path = Path(p.deepspeed_config)
        if not path.is_file():
            raise PreflightError(f"parallel.deepspeed_config: {path} does not exist")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PreflightError(f"parallel.deepspeed_config: {path} is not valid JSON: {exc}") from None
        cfg = _merge(cfg, user)
    owned = {
        "train_micro_batch_size_per_gpu": ("train.micro_batch_size", t.micro_batch_size),
        "gradient_accumulation_steps": ("train.grad_accum_steps", t.grad_accum_steps),
        "train_batch_size": ("train.global_batch_size", t.micro_batch_size * t.grad_accum_steps * world_size),
        "gradient_clipping": ("train.max_grad_norm", t.max_grad_norm or 0.0),
    }
    for key, (recipe_key, value) in owned.items():
        given = cfg.get(key, "auto")
        if given != "auto" and given != value:
            raise PreflightError(
                f"parallel.deepspeed_config sets {key}={given!r} but the recipe gives {value!r} "
                f'({recipe_key}); remove it from the JSON or use "auto"'
            )
        cfg[key] = value
    cfg["managed_gradient_accumulation"] = False  # our loop: N x backward, one step()
    return cfg


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_deepspeed(model, inner, recipe: Recipe, ctx: DistContext) -> DeepSpeedStrategy:
    import deepspeed

    if ctx.device.type == "cpu":
        # On CPU, DeepSpeed probes compilers for every op and JIT-compiles a shared-memory allreduce
        # kernel on first use (minutes). We run gloo and torch's AdamW, which need none of its ops;
        # a pre-filled table is the cache deepspeed.ops documents as editable.
        deepspeed.ops.__compatible_ops__ = {}
    cfg = deepspeed_config(recipe, ctx.world_size)
    stage = cfg["zero_optimization"].get("stage", 0)
    optimizer = make_optimizer(model, recipe.train, fused=False)  # ZeRO partitions the parameters itself
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg, dist_init_required=False)
    if stage == 3:
        # The chunked loss reads lm_head.weight outside lm_head.forward: have ZeRO-3 gather it for
        # the whole TrainModule forward, or it sees an empty partition.
        base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        deepspeed.zero.register_external_parameter(model, base.lm_head.weight)
    return DeepSpeedStrategy(engine, optimizer, ctx, zero_stage=stage)


def decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)
