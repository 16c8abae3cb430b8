"""`llama-train`: parse arguments, then call one function per verb. No logic here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from llama_train.errors import GATE_FAILED, LlamaTrainError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Fine-tune Llama models from one YAML recipe: train, track, export, gate, serve.",
)
recipe_app = typer.Typer(no_args_is_help=True, help="Validate, show and list recipes.")
app.add_typer(recipe_app, name="recipe")
model_app = typer.Typer(no_args_is_help=True, help="Base models: the catalogue, GGUF conversion.")
app.add_typer(model_app, name="model")

RecipeArg = typer.Argument(..., help="Recipe YAML file.", show_default=False)
OverridesArg = typer.Argument(None, help="Dotted overrides: train.lr=1e-4 lora.r=32", show_default=False)


@app.command(context_settings={"allow_interspersed_args": True})
def run(
    recipe: Path = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="Processes on this node (torchrun)."),
    nnodes: int = typer.Option(1, "--nnodes", help="Number of nodes."),
    node_rank: int = typer.Option(0, "--node-rank", help="This node's rank."),
    master_addr: str = typer.Option("127.0.0.1", "--master-addr", help="Rank-0 node address."),
    master_port: int = typer.Option(29500, "--master-port", help="Rendezvous port."),
    allow_recipe_change: bool = typer.Option(
        False, "--allow-recipe-change", help="Resume even if the recipe changed since the checkpoint."
    ),
):
    """Train: one process, or torchrun with --nproc-per-node/--nnodes."""
    from llama_train.launch import launch

    raise typer.Exit(
        launch(
            str(recipe),
            list(overrides or []),
            nproc_per_node=nproc_per_node,
            nnodes=nnodes,
            node_rank=node_rank,
            master_addr=master_addr,
            master_port=master_port,
            allow_recipe_change=allow_recipe_change,
        )
    )


@recipe_app.command("validate")
def recipe_validate(
    recipe: Path = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    world_size: int = typer.Option(None, "--world-size", min=1, help="Ranks to check for."),
    cluster: bool = typer.Option(
        False,
        "--cluster",
        help="Check for the cluster the recipe targets (world size "
        "k8s.nodes x GPUs per node unless --world-size), not this machine's devices and "
        "packages (CUDA, DeepSpeed, bitsandbytes).",
    ),
):
    """Check a recipe: schema, conflicts, hardware fit, and a per-rank memory estimate."""
    from llama_train.config import load_recipe
    from llama_train.preflight import preflight

    r = load_recipe(recipe, overrides)
    if cluster and world_size is None:
        from llama_train.k8s.settings import nproc_per_node

        world_size = r.k8s.nodes * nproc_per_node(r.k8s)
    report = preflight(r, world_size=world_size, local=not cluster)
    typer.echo(f"{recipe}: valid (sha256 {r.sha256()[:12]})")
    for line in report:
        typer.echo(f"  {line}")


@recipe_app.command("show")
def recipe_show(recipe: Path = RecipeArg, overrides: list[str] | None = OverridesArg):
    """Print the normalized recipe (every default filled in)."""
    from llama_train.config import dump_recipe, load_recipe

    typer.echo(dump_recipe(load_recipe(recipe, overrides)), nl=False)


@recipe_app.command("schema")
def recipe_schema(out: Path | None = typer.Option(None, "-o", "--out", help="Write to a file.")):
    """JSON Schema of recipes (for editor validation)."""
    from llama_train.config import recipe_schema as schema

    text = json.dumps(schema(), indent=2)
    if out:
        from llama_train.errors import UsageError

        if out.is_dir():
            raise UsageError(f"-o/--out {out} is a directory; give a file path, e.g. {out / 'recipe.schema.json'}")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
        except OSError as exc:
            raise UsageError(
                f"-o/--out {out}: cannot write ({exc.strerror or exc}); give a writable file path"
            ) from None
    else:
        typer.echo(text)


@recipe_app.command("list")
def recipe_list(root: Path = typer.Option(Path("recipes"), "--root", help="Directory to search.")):
    """List recipes under recipes/ with their launch command (first comment line)."""
    if not root.is_dir():
        raise LlamaTrainError(f"no recipe directory {root}; run from the repository root or pass --root")
    for path in sorted(root.rglob("*.yaml")):
        first = path.read_text().splitlines()[:1]
        cmd = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        typer.echo(f"{path}\t{cmd}")


@model_app.command("list")
def model_list():
    """Catalogue models (`llama-train model pull NAME`; recipes: model.source catalogue)."""
    from llama_train.models.catalogue import CATALOGUE, is_pulled

    for e in CATALOGUE.values():
        typer.echo(f"{e.name}\t{'pulled' if is_pulled(e.name) else 'not pulled'}\t{e.license}\t{e.description}")


@model_app.command("pull")
def model_pull(name: str = typer.Argument(..., help="Catalogue name, e.g. smollm2-135m-instruct.")):
    """Fetch a catalogue model once (sha256 checked) and convert it; print its model directory."""
    from llama_train.models.catalogue import pull

    typer.echo(str(pull(name, log=lambda msg: typer.echo(msg, err=True))))


@model_app.command("convert")
def model_convert(gguf: Path = typer.Argument(..., help="A Llama .gguf file.")):
    """Convert a GGUF file to a safetensors model directory in the cache; print the directory."""
    from llama_train.models.gguf import converted_dir

    typer.echo(str(converted_dir(gguf, key="GGUF")))


@app.command("init-tiny")
def init_tiny(
    out: Path = typer.Argument(..., help="Directory to write the model to."),
    seed: int = typer.Option(0, help="Seed: same seed, identical files."),
):
    """Write a tiny random Llama + tokenizer (Llama-3 chat template) for CPU experiments."""
    from llama_train.errors import RecipeError
    from llama_train.model import tiny_seed_of
    from llama_train.tiny import build_tiny

    if out.exists() and not out.is_dir():
        raise RecipeError(f"init-tiny: {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        built = tiny_seed_of(out)
        if built is None:
            raise RecipeError(f"init-tiny: {out} is not empty and holds no tiny model; give a new or empty directory")
        if built != seed:
            raise RecipeError(f"init-tiny: {out} holds a tiny model built with another seed; give a new directory")
    typer.echo(str(build_tiny(out, seed=seed)))


@app.command("export")
def export(
    run_or_checkpoint: Path = typer.Argument(
        ..., help="Run directory (with adapter/ or model/ and run.json) or a checkpoint directory."
    ),
    out: Path = typer.Option(Path("export"), "--out", "-o", help="Output directory."),
    format: list[str] = typer.Option(
        ["adapter"], "--format", "-f", help="Repeatable: adapter, merged, vllm, nim (or comma-separated)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
    allow_incompatible: bool = typer.Option(
        False, "--allow-incompatible", help="Export even if the vLLM/NIM lint finds errors."
    ),
    target: list[str] | None = typer.Option(
        None, "--target", help="Serving targets to lint against (default: the recipe's export.targets)."
    ),
    adapter_name: str | None = typer.Option(
        None, "--adapter-name", help="Served adapter name (default: recipe export.adapter_name, run name)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace a non-empty --out as a whole (only once the new export is complete)."
    ),
):
    """Export an adapter (and merged / vLLM / NIM layouts) with a manifest of sha256 hashes."""
    from llama_train.export import export_run

    formats = [f.strip() for item in format for f in item.split(",") if f.strip()]
    manifest = export_run(
        run_or_checkpoint,
        out,
        formats=formats,
        targets=target or None,
        allow_incompatible=allow_incompatible,
        adapter_name=adapter_name,
        force=force,
    )
    if json_out:
        typer.echo(json.dumps(manifest, indent=2))
        return
    for f in manifest["lint"]:
        typer.echo(f"lint {f['severity']}: {f['rule']} ({', '.join(f['targets'])}): {f['message']}", err=True)
    typer.echo(f"exported {', '.join(manifest['formats'])} to {out} ({len(manifest['files'])} files, manifest.json)")


@app.command()
def gate(
    candidate: str = typer.Argument(..., help="Export directory, or models:/NAME/VERSION, models:/NAME@ALIAS."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe (default: the candidate's run)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    promote: bool = typer.Option(False, "--promote", help="On a pass, move alias champion to the candidate."),
    serving: bool = typer.Option(True, "--serving/--no-serving", help="Run the serving smoke test."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow URI (default: recipe/env)."),
    report_dir: Path | None = typer.Option(None, "--report-dir", help="Where gate_report.{json,md} go."),
):
    """Validate a candidate adapter against the base and the champion; exit 0 on pass, 10 on fail."""
    from llama_train.gate import run_gate

    report = run_gate(
        candidate,
        recipe_path=str(recipe) if recipe else None,
        promote=promote,
        serving=serving,
        tracking_uri=tracking_uri,
        report_dir=report_dir,
    )
    typer.echo(report.to_json() if json_out else report.to_markdown())
    raise typer.Exit(0 if report.passed else GATE_FAILED)


registry_app = typer.Typer(no_args_is_help=True, help="The MLflow model registry: aliases of served adapters.")
app.add_typer(registry_app, name="registry")


@registry_app.command("rollback")
def registry_rollback(
    name: str = typer.Argument(..., help="Registered model name."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI)."),
):
    """Move alias champion back to the `previous` version; servers following models:/NAME@champion switch."""
    from llama_train.tracking.registry import rollback

    moved = rollback(name, uri=tracking_uri)
    typer.echo(f"{name}: champion is version {moved['champion']} again (was {moved['rolled_back']})")


@registry_app.command("sync")
def registry_sync(
    ref: str = typer.Argument(..., help="models:/NAME@ALIAS (followed) or models:/NAME/VERSION."),
    directory: Path = typer.Option(..., "--dir", help="Adapter directory shared with the server."),
    lora_name: str | None = typer.Option(None, "--lora-name", help="Served name (default: the model name)."),
    vllm_url: str | None = typer.Option(
        None,
        "--vllm-url",
        help="vLLM base URL: load each version with /v1/load_lora_adapter. Without it: NIM layout DIR/NAME.",
    ),
    poll_s: float = typer.Option(30.0, "--poll-s", help="Seconds between registry polls."),
    once: bool = typer.Option(False, "--once", help="Sync the current version and exit (init container)."),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI)."),
):
    """Keep a registry alias's adapter (verified) in a directory for vLLM or NIM: a sidecar."""
    from llama_train.adapter_sync import sync_command

    sync_command(
        ref,
        directory=directory,
        lora_name=lora_name,
        vllm_url=vllm_url,
        poll_s=poll_s,
        once=once,
        tracking_uri=tracking_uri,
    )


track_app = typer.Typer(no_args_is_help=True, help="MLflow tracking utilities.")
app.add_typer(track_app, name="track")
StoreDirArg = typer.Argument(..., help="The directory holding mlruns.db and mlartifacts/ (e.g. outputs/).")


@track_app.command("sync")
def track_sync(
    output_dir: Path = typer.Argument(..., help="The run's output_dir (holds tracking.json and metrics.jsonl)."),
    uri: str | None = typer.Option(None, help="Tracking URI; default: the one the run used."),
):
    """Upload to MLflow what the tracking server lacks (metrics logged while it was unreachable)."""
    from llama_train.tracking.sync import sync_run

    try:
        s = sync_run(output_dir, uri=uri)
    except LlamaTrainError:
        raise
    except Exception as exc:
        raise LlamaTrainError(f"track sync of {output_dir} failed: {type(exc).__name__}: {exc}") from exc
    typer.echo(
        f"run {s['run_id']} at {s['uri']}: uploaded {s['num_metrics_uploaded']} metric values, "
        f"{len(s['artifacts_uploaded'])} artifacts"
    )


@track_app.command("relocate")
def track_relocate(directory: Path = StoreDirArg):
    """Make a moved or copied local MLflow store find its artifacts again."""
    from llama_train.tracking.store import relocate, relocation_message

    typer.echo(relocation_message(relocate(directory)))


@track_app.command("ui")
def track_ui(
    directory: Path = StoreDirArg,
    port: int = typer.Option(5000, help="Port of the UI."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
):
    """Open a local store in the MLflow UI (`mlflow ui`), after relocating it if it was moved."""
    import os

    from llama_train.tracking.store import relocate, relocation_message, ui_argv

    result = relocate(directory)
    typer.echo(relocation_message(result))
    argv = ui_argv(result, host=host, port=port)
    typer.echo(" ".join(argv))
    sys.stdout.flush()
    os.execv(argv[0], argv)  # the UI in this process: Ctrl-C and signals reach it directly


_mounted: list[bool] = []


def _mount_optional() -> None:
    """Verbs from modules with optional dependencies (serve, k8s) are mounted when importable; once
    per process (the tests call `main` many times in one)."""
    if _mounted:
        return
    _mounted.append(True)
    from llama_train.data.cli import data_app, preprocess_command

    app.add_typer(data_app, name="data", help="Check and preprocess a recipe's data.")
    app.command("preprocess")(preprocess_command)
    try:
        from llama_train.serve.cli import serve_command

        app.command("serve")(serve_command)
    except ImportError:
        pass
    try:
        from llama_train.k8s import cli as k8s_cli

        app.add_typer(k8s_cli.app, name="k8s", help="Render and manage Kubernetes training jobs.")
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    _mount_optional()
    try:
        app(args=argv, standalone_mode=True)
    except LlamaTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
