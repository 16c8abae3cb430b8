"""Entry point of one training process: `python -m llama_train.train RECIPE [key=value ...]`.

This is what torchrun runs on every rank (`torchrun --nproc-per-node N -m llama_train.train R`),
and what Kubernetes pods run under torchrun. Exit codes follow llama_train.errors.
"""

from __future__ import annotations

import sys


def run_training(recipe_path: str, overrides: list[str], *, allow_recipe_change: bool = False) -> int:
    """Load, preflight and train; map failures to the exit-code contract. Returns the exit code."""
    from llama_train.config import load_recipe
    from llama_train.errors import LlamaTrainError

    try:
        recipe = load_recipe(recipe_path, overrides)
        from llama_train.trainer import train

        train(recipe, allow_recipe_change=allow_recipe_change)
    except LlamaTrainError as exc:
        _report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


def _report(exc: Exception) -> None:
    import os

    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    print(f"error: {prefix}{exc}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    allow = "--allow-recipe-change" in args
    args = [a for a in args if a != "--allow-recipe-change"]
    if not args or args[0].startswith("-"):
        print(
            "usage: python -m llama_train.train RECIPE [section.key=value ...] [--allow-recipe-change]", file=sys.stderr
        )
        return 2
    return run_training(args[0], args[1:], allow_recipe_change=allow)


def exit_process(code: int) -> None:
    """sys.exit, except on a rank whose peer died (InfrastructureError under torchrun): there the
    interpreter's teardown can run the native destructors of a broken gloo/NCCL process group,
    which abort ("terminate called without an active exception", SIGABRT) and replace 130 with
    134. Tracking already finished inside `train`; flush and leave without that teardown."""
    import os

    from llama_train.errors import InfrastructureError

    if code == InfrastructureError.exit_code and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
