"""What a run shows in MLflow besides metrics: its params, tags and the registry description.

Params are what shapes training (model, data, lora, train, parallel), as clean strings: unset
values are left out (no "None"), lists and mappings are JSON, booleans are `true`/`false` as in
the recipe. Settings of other stages (export, gate, k8s, tracking, checkpoint) and knobs that do
not change the result (cache, threads, cadences, thresholds) are not params: the whole normalized
recipe is the run's `recipe.yaml` artifact. Derived values people compare runs by are added by
`derived_params` (effective global batch size, trainable parameters, world size, versions).
"""

from __future__ import annotations

import getpass
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llama_train.config import ModelConfig, Recipe

TRAINING_SECTIONS = ("model", "data", "lora", "train", "parallel")
# Inside those sections: knobs that change speed, caching, logging or preflight thresholds, but
# not the trained weights (a run with another value is the same experiment).
NOT_TRAINING = {
    "data.cache",
    "data.cache_dir",
    "data.num_proc",
    "data.max_dropped_fraction",
    "data.min_packing_efficiency",
    "train.num_threads",
    "train.log_every_n_steps",
    "train.eval_every_n_steps",
    "train.max_nonfinite_skips",
    "parallel.timeout_s",
    "parallel.backend",
}
# The builtin generator's settings shape the data only when a source is `builtin:tasks`.
BUILTIN_KEYS = "data.builtin."
LIBRARIES = ("torch", "transformers", "peft", "datasets", "mlflow", "deepspeed", "llama-train")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3 UI: the model-training view, not GenAI
# Environment variables turned into run tags when present (set them in the pod spec, e.g. from
# the downward API: POD_UID <- metadata.uid, KUBEFLOW_JOB_NAME <- the job-name label).
K8S_TAG_ENV = {
    "k8s.job_name": ("KUBEFLOW_JOB_NAME", "JOB_NAME"),
    "k8s.job_uid": ("KUBEFLOW_JOB_UID", "JOB_UID"),
    "k8s.pod_name": ("POD_NAME",),
    "k8s.pod_uid": ("POD_UID",),
    "k8s.namespace": ("POD_NAMESPACE",),
    "k8s.image": ("LLAMA_TRAIN_IMAGE",),
}


def param_value(value: Any) -> str:
    """A param as a string: strings as they are, everything else as JSON (true, [1, 2], {...})."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _clean(value: Any) -> Any:
    """Drop None values inside mappings (recursively) so a list of sources reads as written."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None and v != {}}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def training_params(recipe: Recipe) -> dict[str, str]:
    """Flattened recipe keys of the sections that shape training, without unset values."""
    dumped = recipe.model_dump(mode="json")
    uses_builtin = any(s.path == "builtin:tasks" for s in recipe.data.sources)
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}", sub)
            return
        if value is None or value == {} or prefix in NOT_TRAINING:
            return
        if prefix.startswith(BUILTIN_KEYS) and not uses_builtin:
            return
        out[prefix] = param_value(_clean(value))

    for section in TRAINING_SECTIONS:
        walk(section, dumped[section])
    if recipe.model.source == "tiny":
        out.pop("model.path", None)  # where the tiny model was written, not what it is
    if recipe.parallel.strategy != "deepspeed":
        for key in ("parallel.zero_stage", "parallel.deepspeed_config"):
            out.pop(key, None)
    if recipe.train.precision != "fp16":
        out.pop("train.loss_scale_init", None)
    if not recipe.lora.enabled:
        out = {k: v for k, v in out.items() if not k.startswith("lora.") or k == "lora.enabled"}
    return out


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def derived_params(
    *,
    global_batch_size: int,
    world_size: int,
    num_trainable: int,
    num_total: int,
    total_steps: int,
    num_train_rows: int,
    num_eval_rows: int,
) -> dict[str, str]:
    """Values computed at setup that runs are compared by (and the library versions)."""
    params = {
        "train.effective_global_batch_size": global_batch_size,
        "train.total_steps": total_steps,
        "parallel.world_size": world_size,
        "model.num_trainable_params": num_trainable,
        "model.num_total_params": num_total,
        "model.trainable_fraction": round(num_trainable / num_total, 6) if num_total else 0,
        "data.num_train_rows": num_train_rows,
        "data.num_eval_rows": num_eval_rows,
    }
    params.update({f"version.{k}": v for k, v in library_versions().items()})
    return {k: param_value(v) for k, v in params.items()}


_SECRET_KEY = re.compile(r"(token|password|passwd|secret|api_?key|credential)", re.I)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)


def redact_arg(arg: str) -> str:
    """An argument as it may be shown to everyone who can read the MLflow UI: URL credentials
    (`https://user:token@host`) and the values of secret-looking `key=value` overrides masked."""
    arg = _URL_USERINFO.sub(r"\g<scheme>***@", arg)
    key, sep, _ = arg.partition("=")
    if sep and _SECRET_KEY.search(key.lstrip("-")):
        return f"{key}=***"
    return arg


def _command_line() -> str:
    argv = list(sys.argv)
    head = Path(argv[0]).name if argv else "python"
    if head in ("cli.py", "__main__.py", "llama-train"):
        head = "llama-train"
    elif head == "train.py":
        head = "python -m llama_train.train"
    return shlex.join([head, *(redact_arg(a) for a in argv[1:])]) if argv else head


def _recipe_arg() -> str | None:
    """The recipe file named on the command line (the run's source), absolute."""
    for arg in sys.argv[1:]:
        if arg.endswith((".yaml", ".yml")) and "=" not in arg and Path(arg).is_file():
            return str(Path(arg).resolve())
    return None


def source_tags() -> dict[str, str]:
    """`mlflow.user` and `mlflow.source.*`: the UI's "Created by" and "Source" (which shows the
    last path component of the source name: the recipe file), and the whole command line."""
    try:
        user = os.environ.get("LLAMA_TRAIN_USER") or getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        user = os.environ.get("USER") or f"uid-{os.getuid()}"
    in_job = bool(
        os.environ.get("KUBEFLOW_JOB_NAME") or os.environ.get("JOB_NAME") or os.environ.get("TORCHELASTIC_RUN_ID")
    )
    command = _command_line()
    return {
        "mlflow.user": user,
        "mlflow.source.name": _recipe_arg() or command,
        "mlflow.source.type": "JOB" if in_job else "LOCAL",
        "llama_train.command": command,
    }


def _git_commit() -> str | None:
    if os.environ.get("LLAMA_TRAIN_GIT_COMMIT"):
        return os.environ["LLAMA_TRAIN_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_tags() -> dict[str, str]:
    tags = {}
    for tag, names in K8S_TAG_ENV.items():
        value = next((os.environ[n] for n in names if os.environ.get(n)), None)
        if value:
            tags[tag] = value
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    return tags


def base_model_label(model: ModelConfig, base_path: str) -> str:
    """The base model as a person reads it: the hub id, or `tiny (seed N)`, or the local path."""
    if model.source == "tiny":
        return f"tiny random Llama (seed {model.tiny_seed})"
    return hub_id_of(base_path) or base_path


def served_base_name(model: ModelConfig, base_path: str) -> str:
    """`base_model_name_or_path` of the adapter: the hub id when the base came from the hub (also
    through a hub-cache snapshot directory), so it means the same where the adapter is served;
    else the local directory (serve it with `--base` pointing at that model there)."""
    if model.source == "hf":
        return hub_id_of(base_path) or base_path
    return base_path


def hub_id_of(path: str) -> str | None:
    """`org/name` for a hub id or a Hugging Face cache snapshot directory
    (…/models--org--name/snapshots/<commit>); None for any other local directory."""
    p = Path(path)
    if not p.exists():
        return path if path.count("/") == 1 and not path.startswith((".", "/")) else None
    parts = p.resolve().parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return None


def version_description(
    *,
    base_model: str,
    recipe_sha256: str,
    run_name: str,
    eval_before: dict | None,
    eval_after: dict | None,
    metric: str,
    global_step: int | None = None,
) -> str:
    """Markdown shown on the model version page: what this adapter is and how much it improved."""
    lines = [
        f"LoRA adapter trained by llama-train run `{run_name}`"
        + (f" ({global_step} steps)" if global_step else "")
        + ".",
        "",
        f"- base model: `{base_model}`",
        f"- recipe sha256: `{recipe_sha256}`",
    ]
    for key in (metric, "loss"):
        before = (eval_before or {}).get(key)
        after = (eval_after or {}).get(key)
        if isinstance(before, (int, float)) or isinstance(after, (int, float)):
            lines.append(f"- eval {key}: {_num(before)} before → {_num(after)} after training")
    return "\n".join(lines)


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "n/a"


def version_tags(
    *,
    base_model: str,
    recipe_sha256: str,
    dataset_fingerprint: str | None,
    eval_before: dict | None,
    eval_after: dict | None,
) -> dict[str, str]:
    """One tag per fact on a model version (no metric copies, no training noise)."""
    tags = {"llama_train.base_model": base_model, "llama_train.recipe_sha256": recipe_sha256}
    if dataset_fingerprint:
        tags["llama_train.dataset_fingerprint"] = dataset_fingerprint
    for stage, ev in (("before", eval_before), ("after", eval_after)):
        for key, value in eval_metrics(ev).items():
            if key != "eval/num_samples":
                tags[f"eval_{stage}.{key.removeprefix('eval/')}"] = f"{value:.6g}"
    return tags


def eval_metrics(ev: dict | None) -> dict[str, float]:
    """`eval/<name>` metrics of an `evaluate` result (its numbers; the examples go to a table)."""
    return {
        f"eval/{k}": float(v) for k, v in (ev or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def summary_metrics(summary: dict) -> dict[str, float]:
    """End-of-training totals, logged once at the last step (the runs table's summary columns)."""
    keys = {
        "summary/train_runtime_s": "train_runtime_s",
        "summary/total_tokens": "consumed_tokens",
        "summary/supervised_tokens": "supervised_tokens_total",
        "summary/supervised_tokens_per_s": "supervised_tokens_per_s",
        "summary/consumed_samples": "consumed_samples",
        "summary/train_loss": "train_loss",
    }
    out = {k: float(summary[v]) for k, v in keys.items() if isinstance(summary.get(v), (int, float))}
    before = (summary.get("eval") or {}).get("before") or {}
    after = (summary.get("eval") or {}).get("after") or {}
    for key in ("loss", "exact_match", "contains", "preference_accuracy", "reward_margin"):
        if isinstance(before.get(key), (int, float)) and isinstance(after.get(key), (int, float)):
            out[f"summary/eval_{key}_change"] = float(after[key]) - float(before[key])
    return out
