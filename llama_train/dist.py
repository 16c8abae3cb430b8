"""Process groups: the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) read once
into a `DistContext`, whose few collectives the trainer and the checkpoint code use; without
torchrun the run is a single process. Also: telling a collective that failed because a peer died
or hung from any other error."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llama_train.config import ParallelConfig
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


def init_distributed(parallel: ParallelConfig) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = parallel.strategy
    if world == 1:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistContext(device=device)
    if strategy == "single":
        raise PreflightError(
            f"launched with WORLD_SIZE={world} but parallel.strategy is `single`; "
            "set parallel.strategy: ddp | fsdp | deepspeed"
        )
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise PreflightError("parallel.backend: nccl needs CUDA GPUs; none visible. Use parallel.backend: gloo")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if rank != 0:
        check_master_reachable(min(parallel.timeout_s, 60))
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=parallel.timeout_s))
    except Exception as exc:  # a rank that cannot reach the master
        raise InfrastructureError(
            f"rank {rank} could not join the process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}: {exc}"
        ) from exc
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def check_master_reachable(
    timeout_s: float, *, addr: str | None = None, port: int | None = None, who: str | None = None
) -> None:
    """Fail with the address in the message instead of hanging in init_process_group."""
    import socket
    import time

    addr = addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = port or int(os.environ.get("MASTER_PORT", "29500"))
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((addr, port), timeout=5).close()
            return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise InfrastructureError(
                    f"{who or 'rank ' + os.environ.get('RANK', '?')} cannot reach the master at {addr}:{port} after {timeout_s:.0f} s "
                    f"({exc}); check --master-addr/--master-port (MASTER_ADDR/MASTER_PORT), that node rank 0 "
                    "is up, and that the port is open between nodes"
                ) from None
            time.sleep(1)


def is_collective_failure(exc: RuntimeError) -> bool:
    """A peer died or a collective timed out (DistError, or gloo's/NCCL's plain RuntimeError)."""
    text = str(exc)
    return isinstance(exc, torch.distributed.DistError) or any(
        s in text for s in ("gloo", "Connection closed by peer", "Connection reset by peer", "NCCL", "timed out")
    )
