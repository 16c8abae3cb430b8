"""`llama-train k8s ...`: render / submit / status / logs / wait / delete. No logic here."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Run a recipe on Kubernetes (Kubeflow PyTorchJob or TrainJob).", no_args_is_help=True)

RecipeArg = typer.Argument(..., help="Recipe YAML file.")
OverridesArg = typer.Argument(None, help="Dotted overrides, e.g. k8s.gpu_product=NVIDIA-H100-80GB-HBM3 train.lr=1e-4.")
KindOpt = typer.Option(None, "--kind", help="pytorchjob (kubeflow.org/v1) or trainjob (trainer v2).")
NodesOpt = typer.Option(None, "--nodes", help="Pods (nodes); default k8s.nodes.")
GpusOpt = typer.Option(None, "--gpus-per-node", help="GPUs per pod, 0 = CPU; default k8s.gpus_per_node.")
ImageOpt = typer.Option(None, "--image", help="Trainer image; default k8s.image.")
NamespaceOpt = typer.Option(None, "--namespace", "-n", help="Namespace; default k8s.namespace.")
QueueOpt = typer.Option(None, "--queue", help="Kueue LocalQueue (label kueue.x-k8s.io/queue-name).")
NameOpt = typer.Option(None, "--name", help="Job name; default k8s.name or llama-train-<output_dir name>.")
JobNs = typer.Option("llama-train", "--namespace", "-n", help="Namespace of the job.")
JobKindOpt = typer.Option("pytorchjob", "--kind", help="pytorchjob or trainjob.")


def _render(recipe: Path, overrides: list[str] | None, **flags) -> list[dict]:
    from llama_train.config import load_recipe
    from llama_train.errors import RecipeError
    from llama_train.k8s.render import render_manifests
    from llama_train.k8s.validate import webhook_errors

    objects = render_manifests(load_recipe(recipe, overrides or []), **flags)
    problems = [e for obj in objects for e in webhook_errors(obj)]
    if problems:
        raise RecipeError("rendered job breaks the operator's admission rules:\n  " + "\n  ".join(problems))
    return objects


def _write(path: Path, text: str, *, flag: str) -> None:
    """Write `text` to a file given on the command line; parent directories are created."""
    from llama_train.errors import UsageError

    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file path, e.g. {path / 'job.yaml'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write ({exc.strerror or exc}); give a writable file path") from None


@app.command()
def render(
    recipe: Path = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    kind: str | None = KindOpt,
    nodes: str | None = NodesOpt,
    gpus_per_node: str | None = GpusOpt,
    image: str | None = ImageOpt,
    namespace: str | None = NamespaceOpt,
    queue: str | None = QueueOpt,
    name: str | None = NameOpt,
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the YAML here instead of stdout."),
) -> None:
    """Print the recipe ConfigMap and the job as multi-document YAML (for kubectl apply -f -)."""
    from llama_train.k8s.render import to_yaml

    # Counts are taken as text so that `--gpus-per-node eight` is a RecipeError naming the flag.
    text = to_yaml(
        _render(
            recipe,
            overrides,
            kind=kind,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            image=image,
            namespace=namespace,
            queue=queue,
            name=name,
        )
    )
    if output:
        _write(output, text, flag="-o/--output")
        typer.echo(f"wrote {output}", err=True)
    else:
        typer.echo(text, nl=False)


@app.command()
def submit(
    recipe: Path = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    kind: str | None = KindOpt,
    nodes: str | None = NodesOpt,
    gpus_per_node: str | None = GpusOpt,
    image: str | None = ImageOpt,
    namespace: str | None = NamespaceOpt,
    queue: str | None = QueueOpt,
    name: str | None = NameOpt,
) -> None:
    """Render and create the objects in the current cluster."""
    from llama_train.k8s import client

    objects = _render(
        recipe,
        overrides,
        kind=kind,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        image=image,
        namespace=namespace,
        queue=queue,
        name=name,
    )
    for ref in client.submit(objects):
        typer.echo(f"created {ref}")
    job = objects[-1]["metadata"]
    typer.echo(
        f"follow with: llama-train k8s logs {job['name']} -n {job['namespace']} "
        f"--kind {objects[-1]['kind'].lower()} --follow"
    )


@app.command()
def status(
    name: str,
    namespace: str = JobNs,
    kind: str = JobKindOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """State, conditions and replica counts of a job."""
    from llama_train.k8s import client

    st = client.status(name, namespace=namespace, kind=kind)
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    typer.echo(f"{st['kind']} {namespace}/{name}: {st['state']}")
    for c in st["conditions"]:
        typer.echo(f"  {c['type']}={c['status']} {c.get('reason') or ''} {c.get('message') or ''}".rstrip())
    for replica, counts in (st["replicas"] or {}).items() if isinstance(st["replicas"], dict) else []:
        typer.echo(f"  {replica}: {counts}")


@app.command()
def logs(
    name: str,
    namespace: str = JobNs,
    kind: str = JobKindOpt,
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream the first pod's log."),
    tail: int | None = typer.Option(None, "--tail", help="Last N lines per pod."),
) -> None:
    """Logs of the job's training containers."""
    from llama_train.k8s import client

    for line in client.logs(name, namespace=namespace, kind=kind, follow=follow, tail_lines=tail):
        typer.echo(line)


@app.command()
def wait(
    name: str,
    namespace: str = JobNs,
    kind: str = JobKindOpt,
    timeout: float = typer.Option(3600, "--timeout", help="Seconds to wait."),
) -> None:
    """Wait for the job to finish; exit 0 when it succeeded, 1 when it failed."""
    from llama_train.k8s import client

    state = client.wait(name, namespace=namespace, kind=kind, timeout_s=timeout)
    typer.echo(f"{name}: {state}")
    if state == "Failed":
        raise typer.Exit(1)


@app.command()
def delete(name: str, namespace: str = JobNs, kind: str = JobKindOpt) -> None:
    """Delete the job and its recipe ConfigMap (the PVC with checkpoints stays)."""
    from llama_train.k8s import client

    for ref in client.delete(name, namespace=namespace, kind=kind):
        typer.echo(f"deleted {ref}")
