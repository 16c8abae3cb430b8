"""Process groups and parallel strategies, applied as functions to the model and optimizer.

`init_distributed()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR);
without it the run is a single process. `apply_strategy()` returns a `Strategy` whose few verbs
(backward, clip_and_step, no_sync, full_state_dict) hide DDP/FSDP2/DeepSpeed from the training loop.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llama_train.config import Recipe
from llama_train.errors import InfrastructureError, PreflightError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, value: float | int, op: str = "sum") -> float:
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return float(t.item())

    def all_gather_object(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(recipe: Recipe) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = recipe.parallel.strategy
    if world == 1:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistContext(device=device)
    if strategy == "single":
        raise PreflightError(f"launched with WORLD_SIZE={world} but parallel.strategy is `single`; "
                             "set parallel.strategy: ddp | fsdp | deepspeed")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = recipe.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise PreflightError("parallel.backend: nccl needs CUDA GPUs; none visible. Use parallel.backend: gloo")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=recipe.parallel.timeout_s))
    except Exception as exc:  # a rank that cannot reach the master
        raise InfrastructureError(
            f"rank {rank} could not join the process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: {exc}"
        ) from exc
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


class Strategy:
    """Single process and DDP. Subclasses override what differs."""

    def __init__(self, model, optimizer, ctx: DistContext):
        self.model = model  # what the loop calls forward on
        self.optimizer = optimizer
        self.ctx = ctx

    @property
    def train_module(self):
        """The TrainModule inside any DDP wrapper (forward → loss, generate)."""
        return getattr(self.model, "module", self.model)

    @property
    def module(self):
        """The Hugging Face / PEFT model (for save_pretrained, peft_config)."""
        return self.train_module.inner

    def no_sync(self, last_micro_batch: bool):
        if last_micro_batch or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self, max_norm: float | None) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable weights, keyed as in the unwrapped model, on CPU."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.module.named_parameters() if p.requires_grad}

    def _strip(self, state: dict) -> dict:
        return {k.removeprefix("inner."): v for k, v in state.items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


class FSDPStrategy(Strategy):

    def no_sync(self, last_micro_batch: bool):
        self.model.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def trainable_state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        names = {n for n, p in self.module.named_parameters() if p.requires_grad}
        return {n: t for n, t in self._strip(full).items() if n in names}

    def load_trainable_state_dict(self, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        state = {f"inner.{k}": v for k, v in state.items()}
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))


def make_optimizer(model, recipe: Recipe) -> torch.optim.Optimizer:
    t = recipe.train
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=t.lr, betas=t.betas)


def apply_strategy(model, recipe: Recipe, ctx: DistContext) -> Strategy:
    """Wrap `model` for the recipe's strategy and build its optimizer."""
    from llama_train.model import TrainModule

    strategy = recipe.parallel.strategy
    if recipe.model.quantization == "none":
        model.to(ctx.device)
    inner = model
    model = TrainModule(inner, chunk_size=recipe.train.loss_chunk_size)
    if strategy in ("single", "ddp"):
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        return Strategy(model, make_optimizer(model, recipe), ctx)
    if strategy == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs: dict = {}
        if recipe.train.precision != "fp32":
            dt = torch.bfloat16 if recipe.train.precision == "bf16" else torch.float16
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=torch.float32)
        if recipe.parallel.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        from torch.distributed.fsdp import register_fsdp_forward_method

        for layer in decoder_layers(inner):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)  # root: embeddings, final norm, lm_head
        register_fsdp_forward_method(model, "generate")
        return FSDPStrategy(model, make_optimizer(model, recipe), ctx)
    raise PreflightError(f"parallel.strategy {strategy!r} is not available in this build")


def decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)
