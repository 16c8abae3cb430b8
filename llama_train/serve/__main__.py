"""`python -m llama_train.serve ...`: the same as `llama-train serve ...` (used by tests and
containers that do not need the full CLI)."""

import sys

import typer

from llama_train.errors import LlamaTrainError
from llama_train.serve.cli import serve_command


def main() -> None:
    try:
        typer.run(serve_command)
    except LlamaTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
