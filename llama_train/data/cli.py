"""`llama-train data check` and `llama-train preprocess` (mounted by llama_train/cli.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from llama_train.errors import DataError

data_app = typer.Typer(no_args_is_help=True, help="Check and preprocess a recipe's data.")


@data_app.callback()
def _group() -> None:
    """Check a recipe's data (a group, so `data check` keeps its name with one command)."""


def _prepare(recipe: Path, overrides: list[str] | None, *, rebuild: bool = False):
    from llama_train.config import load_recipe
    from llama_train.data.dataset import check_data
    from llama_train.model import load_tokenizer, resolve_base_path

    r = load_recipe(recipe, list(overrides or []))
    tokenizer = load_tokenizer(r, resolve_base_path(r))
    # under torchrun (`llama-train preprocess` in a job's init step) batch as the job's ranks will
    return check_data(r, tokenizer, rebuild=rebuild, world_size=int(os.environ.get("WORLD_SIZE", "1")))


@data_app.command("check")
def check_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML file.", show_default=False),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides: data.seq_len=512", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Preflight the recipe's data: bad rows per category, token lengths, packing efficiency.
    Exits 3 when a threshold of the recipe (data.max_dropped_fraction, ...) is exceeded."""
    from llama_train.data.report import format_report

    _, report = _prepare(recipe, overrides)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not report["ok"]:
        raise DataError("data check failed: " + "; ".join(report["failures"]))


def preprocess_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML file.", show_default=False),
    overrides: list[str] | None = typer.Argument(None, help="Dotted overrides.", show_default=False),
    rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild even if the cache has this key."),
):
    """Tokenize (and pack) the recipe's data into the preprocessing cache (data.cache_dir), so
    training never tokenizes. Safe to run from several machines at once on a shared volume."""
    from llama_train.data.report import format_report

    _, report = _prepare(recipe, overrides, rebuild=rebuild)
    typer.echo(format_report(report))
    if not report["ok"]:
        raise DataError("preprocessed, but training would refuse this data: " + "; ".join(report["failures"]))
