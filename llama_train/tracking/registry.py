"""Model registry: adapters registered from run artifacts, aliases `candidate`, `champion`,
`previous` (only the validation gate moves `champion`/`previous`).

The adapter directory logged as run artifacts is what gets registered: `mlflow.transformers.
log_model` on a PEFT model resolves the base on the Hugging Face Hub and fails offline, while the
adapter files load offline with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from llama_train import adapter
from llama_train.errors import LlamaTrainError
from llama_train.tracking.client import (
    configure_env,
    ensure_experiment,
    is_already_exists,
    is_not_found,
    mlflow_client,
    warn,
)
from llama_train.tracking.sync import tag_items
from llama_train.tracking.tracker import MlflowTracker, Tracker

if TYPE_CHECKING:
    from mlflow import MlflowClient

ADAPTER_ARTIFACT_PATH = "adapter"  # where a run's adapter files are logged
CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"


def register_adapter(
    tracker_or_run_id: MlflowTracker | Tracker | str | None,
    adapter_dir: str | Path,
    *,
    name: str,
    tags: dict | None = None,
    description: str | None = None,
    uri: str | None = None,
) -> str | None:
    """Register `adapter_dir` (logged under the run's `adapter/` artifacts) as a new version of
    `name`, with `description` (markdown), tags and alias `candidate`. Returns the version, or None
    (with a warning) when there is no run or the server fails.

    With a tracker, the version also gets the run's recipe hash and base model tags and one
    `eval_after.<metric>` tag per final `eval/<metric>` value (not copies of every metric)."""
    tracker = None if isinstance(tracker_or_run_id, str) else tracker_or_run_id
    run_id = tracker_or_run_id if isinstance(tracker_or_run_id, str) else getattr(tracker, "run_id", None)
    if not run_id:
        if isinstance(tracker, MlflowTracker):
            warn(f"adapter not registered as {name}: the run has no MLflow id (server was unreachable)")
        return None
    all_tags = dict(tags or {})
    if isinstance(tracker, MlflowTracker):
        uri = uri or tracker.uri
        tracker.flush()
        for key in ("llama_train.recipe_sha256", "llama_train.base_model"):
            if key in tracker.default_tags:
                all_tags.setdefault(key, tracker.default_tags[key])
        for key, value in list(tracker.latest.items()):  # the system sampler thread adds keys
            if key.startswith("eval/") and key != "eval/num_samples":
                all_tags.setdefault(f"eval_after.{key.removeprefix('eval/')}", f"{value:.6g}")
    try:
        client = mlflow_client(uri or _default_uri())
        if not client.list_artifacts(run_id, ADAPTER_ARTIFACT_PATH):
            client.log_artifacts(run_id, str(adapter_dir), ADAPTER_ARTIFACT_PATH)
        try:
            client.create_registered_model(name)
        except Exception as exc:
            if not is_already_exists(exc):
                raise
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ADAPTER_ARTIFACT_PATH}"
        version = client.create_model_version(
            name,
            source,
            run_id=run_id,
            tags=tag_items(all_tags),
            description=description,
            await_creation_for=60,
        )
        client.set_registered_model_alias(name, CANDIDATE, version.version)
        return str(version.version)
    except Exception as exc:  # noqa: BLE001  (tracking must never stop training)
        warn(f"adapter not registered as {name} ({type(exc).__name__}: {str(exc)[:300]})")
        return None


def register_export(
    adapter_dir: str | Path, *, name: str, uri: str, experiment: str, run_name: str | None = None
) -> str:
    """Register an exported adapter as a new version of `name` (through a run holding its files:
    `adapter/` and, when the export has one, `manifest.json` beside it, as in the export, so a
    server can verify its download). Returns the version. Raises on registry errors."""

    adapter_dir = Path(adapter_dir)
    client = mlflow_client(uri)
    exp_id = ensure_experiment(client, experiment, uri=uri)
    run = client.create_run(
        exp_id, run_name=run_name or f"register-{adapter_dir.name}", tags={"llama_train.gate": "register"}
    )
    client.log_artifacts(run.info.run_id, str(adapter_dir), artifact_path=ADAPTER_ARTIFACT_PATH)
    manifest = adapter_dir.parent / "manifest.json"
    if manifest.is_file():
        client.log_artifact(run.info.run_id, str(manifest))
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(name)
    except Exception as exc:
        if not is_already_exists(exc):
            raise
    mv = client.create_model_version(
        name, f"runs:/{run.info.run_id}/{ADAPTER_ARTIFACT_PATH}", run_id=run.info.run_id, await_creation_for=60
    )
    return str(mv.version)


def _default_uri() -> str:
    configure_env()
    import mlflow

    return mlflow.get_tracking_uri()


def get_alias_version(
    name: str, alias: str, *, client: MlflowClient | None = None, uri: str | None = None
) -> str | None:
    """Version that `alias` points to, or None when the alias (or the model) does not exist."""
    client = client or mlflow_client(uri or _default_uri())
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception as exc:
        if is_not_found(exc):
            return None
        raise


def promote(
    name: str, version: str | int, *, client: MlflowClient | None = None, uri: str | None = None
) -> dict[str, str | None]:
    """Point `champion` at `version` and `previous` at the former champion. Called by the gate."""
    client = client or mlflow_client(uri or _default_uri())
    old = get_alias_version(name, CHAMPION, client=client)
    if old is not None and old != str(version):
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return {CHAMPION: str(version), PREVIOUS: get_alias_version(name, PREVIOUS, client=client)}


def download_adapter(model_uri: str, *, dst: str | Path | None = None, uri: str | None = None) -> Path:
    """Local directory of a registered adapter: `models:/name/3` or `models:/name@alias`."""
    if not model_uri.startswith("models:/"):
        raise LlamaTrainError(f"{model_uri!r} is not a registry URI; use models:/NAME/VERSION or models:/NAME@ALIAS")
    ref = model_uri.removeprefix("models:/").strip("/")
    client = mlflow_client(uri or _default_uri())
    # Resolved here rather than by mlflow.artifacts.download_artifacts, which (mlflow 3.17) looks
    # the model up in the default registry instead of the registry_uri it is given.
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        mv = client.get_model_version(name, version)
    else:
        raise LlamaTrainError(f"{model_uri!r} names no version or alias (models:/NAME/3, models:/NAME@champion)")
    import mlflow

    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=mv.source,
            dst_path=None if dst is None else str(dst),
            tracking_uri=client.tracking_uri,
        )
    )
    if not (local / adapter.CONFIG_FILE).exists():
        found = sorted(local.rglob(adapter.CONFIG_FILE))
        if not found:
            raise LlamaTrainError(f"{model_uri} has no adapter_config.json (downloaded to {local})")
        local = found[0].parent
    return local


# --------------------------------------------------------------------------- serving and rollback
class VerificationError(LlamaTrainError):
    """A downloaded registry version does not match the sha256 manifest exported with it."""


def parse_model_ref(ref: str, *, flag: str = "models:/ reference") -> tuple[str, str | None, str | None]:
    """`models:/NAME/VERSION` -> (NAME, VERSION, None); `models:/NAME@ALIAS` -> (NAME, None, ALIAS)."""
    body = ref.removeprefix("models:/").strip("/") if ref.startswith("models:/") else None
    if body:
        if "@" in body:
            name, alias = body.rsplit("@", 1)
            if name and alias and "/" not in alias:
                return name, None, alias
        else:
            name, _, version = body.rpartition("/")
            if name and version.isdigit():
                return name, version, None
    raise LlamaTrainError(
        f"{flag} {ref!r}: use models:/NAME/VERSION (e.g. models:/support/3) or "
        "models:/NAME@ALIAS (e.g. models:/support@champion)"
    )


def resolve_model_ref(ref: str, *, client: MlflowClient) -> tuple[str, str]:
    """(name, version) that `ref` points to now; raises LlamaTrainError for a missing alias or
    version, the MLflow exception when the registry cannot be reached."""
    name, version, alias = parse_model_ref(ref)
    if alias is not None:
        version = get_alias_version(name, alias, client=client)
        if version is None:
            raise LlamaTrainError(
                f"{ref}: model {name} has no alias `{alias}` (or no such model); "
                "promote a version first (`llama-train gate ... --promote`)"
            )
        return name, version
    try:
        client.get_model_version(name, version)
    except Exception as exc:
        if is_not_found(exc):
            raise LlamaTrainError(f"{ref}: model {name} has no version {version}") from None
        raise
    return name, str(version)


def fetch_verified(name: str, version: str, dst: str | Path, *, client: MlflowClient) -> tuple[Path, bool]:
    """Download version `version` of `name` into the new directory `dst` and check every file
    against the sha256 manifest exported with it (`manifest.json` beside the registered adapter
    folder, as the gate registers an export). Returns (adapter dir, verified); verified is False
    when the version has no manifest (registered straight from training). Raises
    VerificationError on a mismatch, a missing or an unlisted file."""
    import json

    import mlflow

    from llama_train.adapter import sha256_file

    mv = client.get_model_version(name, version)
    source = mv.source.rstrip("/")
    if source.startswith("runs:/"):  # runs:/ID/adapter -> the run's artifact URI, whose parent lists
        run_id, _, rel = source.removeprefix("runs:/").partition("/")
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{rel}".rstrip("/")
    parent, _, folder = source.rpartition("/")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=False)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(dst / "adapter"), tracking_uri=client.tracking_uri
        )
    )
    manifest_path = None
    listing = mlflow.artifacts.list_artifacts(artifact_uri=parent, tracking_uri=client.tracking_uri)
    if any(Path(f.path).name == "manifest.json" for f in listing or []):
        manifest_path = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{parent}/manifest.json", dst_path=str(dst), tracking_uri=client.tracking_uri
            )
        )
    if not (local / adapter.CONFIG_FILE).is_file():
        raise VerificationError(f"models:/{name}/{version} ({source}) holds no adapter_config.json")
    if manifest_path is None:
        return local, False
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise VerificationError(f"models:/{name}/{version}: manifest.json is unreadable ({exc})") from None
    expected = {rel.removeprefix(f"{folder}/"): digest for rel, digest in files.items() if rel.startswith(f"{folder}/")}
    present = {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    problems = [f"{rel}: missing" for rel in sorted(set(expected) - present)]
    problems += [f"{rel}: not in the manifest" for rel in sorted(present - set(expected))]
    problems += [
        f"{rel}: sha256 mismatch"
        for rel in sorted(present & set(expected))
        if sha256_file(local / rel) != expected[rel]
    ]
    if problems:
        raise VerificationError(
            f"models:/{name}/{version} does not match its export manifest "
            f"({'; '.join(problems)}): the registry artifact changed after export"
        )
    return local, True


def rollback(name: str, *, client: MlflowClient | None = None, uri: str | None = None) -> dict[str, str | None]:
    """Point `champion` back at the `previous` version. `previous` is removed (not swapped), so
    a second rollback cannot re-promote the version just rolled back; that version is tagged
    `llama_train.rolled_back`."""
    client = client or mlflow_client(uri or _default_uri())
    old = get_alias_version(name, CHAMPION, client=client)
    target = get_alias_version(name, PREVIOUS, client=client)
    if target is None:
        raise LlamaTrainError(
            f"model {name} has no `{PREVIOUS}` alias: nothing to roll back to "
            f"(champion is {old or 'unset'}); set one with MLflow "
            "(set_registered_model_alias) or promote a version with the gate"
        )
    client.set_registered_model_alias(name, CHAMPION, target)
    client.delete_registered_model_alias(name, PREVIOUS)
    if old is not None and old != target:
        client.set_model_version_tag(name, old, "llama_train.rolled_back", "true")
    return {CHAMPION: target, "rolled_back": old}
