"""`llama-train run`: one process in place, or torchrun (torch.distributed.run) for several."""

from __future__ import annotations

import subprocess
import sys

from llama_train.config import load_recipe
from llama_train.preflight import preflight


def torchrun_command(
    recipe_path: str,
    overrides: list[str],
    *,
    nproc_per_node: int,
    nnodes: int,
    node_rank: int,
    master_addr: str,
    master_port: int,
    allow_recipe_change: bool,
) -> list[str]:
    # llama_train.k8s.launch is torchrun that keeps the failing rank's exit code (plain torchrun exits 1).
    cmd = [
        sys.executable,
        "-m",
        "llama_train.k8s.launch",
        f"--nproc-per-node={nproc_per_node}",
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        f"--master-addr={master_addr}",
        f"--master-port={master_port}",
        "-m",
        "llama_train.train",
        recipe_path,
        *overrides,
    ]
    return cmd + (["--allow-recipe-change"] if allow_recipe_change else [])


def check_launch_flags(*, nproc_per_node: int, nnodes: int, node_rank: int, master_port: int) -> None:
    """torchrun answers these with a bare AssertionError and exit code 130, which a PyTorchJob would
    retry as an infrastructure failure: they are usage errors (exit 2)."""
    from llama_train.errors import UsageError

    if nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node {nproc_per_node}: must be at least 1 (processes on this node)")
    if nnodes < 1:
        raise UsageError(f"--nnodes {nnodes}: must be at least 1")
    if not 0 <= node_rank < nnodes:
        raise UsageError(f"--node-rank {node_rank}: must be 0 .. --nnodes - 1 ({nnodes - 1})")
    if not 1 <= master_port <= 65535:
        raise UsageError(f"--master-port {master_port}: a TCP port is 1-65535")


def launch(
    recipe_path: str,
    overrides: list[str],
    *,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    allow_recipe_change: bool = False,
) -> int:
    """Validate first (fail in seconds, exit 1-127), then train. Returns the exit code."""
    from llama_train.errors import LlamaTrainError

    world = nproc_per_node * nnodes
    try:
        check_launch_flags(nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank, master_port=master_port)
        recipe = load_recipe(recipe_path, overrides)
        preflight(recipe, world_size=world)
        if node_rank > 0:
            # torchrun's static rendezvous would wait up to 10 minutes, silently, for node 0.
            from llama_train.dist import check_master_reachable

            print(
                f"node rank {node_rank}: waiting up to {recipe.parallel.timeout_s} s (parallel.timeout_s) "
                f"for the master at {master_addr}:{master_port}",
                file=sys.stderr,
                flush=True,
            )
            check_master_reachable(
                recipe.parallel.timeout_s, addr=master_addr, port=master_port, who=f"node rank {node_rank}"
            )
    except LlamaTrainError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    if world == 1:
        from llama_train.train import run_training

        return run_training(recipe_path, overrides, allow_recipe_change=allow_recipe_change)
    cmd = torchrun_command(
        recipe_path,
        overrides,
        nproc_per_node=nproc_per_node,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        allow_recipe_change=allow_recipe_change,
    )
    return subprocess.call(cmd)
