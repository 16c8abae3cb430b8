"""The k8s settings of a job: the recipe's `k8s` section with the CLI flags applied, checked (every
problem a RecipeError naming the flag and the key), and the values derived from them (job name,
processes per node, output directory on the volume). No cluster access; llama_train.k8s.render
turns settings into objects.
"""

from __future__ import annotations

import re
from typing import Any

from llama_train.config import Recipe
from llama_train.errors import RecipeError
from llama_train.k8s.config import K8sConfig

# Set by the operators / torch runtime (or by torchrun from them); a user value would break ranks.
RESERVED_ENV = re.compile(r"^(PET_.*|RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|GROUP_RANK)$")

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")

# CLI flag -> recipe key, so errors name both.
FLAGS = {
    "kind": "--kind",
    "nodes": "--nodes",
    "gpus_per_node": "--gpus-per-node",
    "image": "--image",
    "namespace": "--namespace",
    "queue": "--queue",
    "name": "--name",
}


def _where(key: str) -> str:
    flag = FLAGS.get(key)
    return f"{flag} / k8s.{key}" if flag else f"k8s.{key}"


def resolve_k8s(recipe: Recipe, **flags: Any) -> K8sConfig:
    """The recipe's k8s section with non-None CLI flags applied; every problem is a RecipeError."""
    values = recipe.k8s.model_dump()
    for key, value in flags.items():
        if key not in K8sConfig.model_fields:
            raise TypeError(f"unknown k8s setting {key!r}")
        if value is not None:
            values[key] = value
    _check_counts(values)
    try:
        cfg = K8sConfig.model_validate(values)
    except Exception as exc:  # pydantic ValidationError; name the flag and key
        errors = getattr(exc, "errors", list)()
        lines = [f"{_where(str(e['loc'][0]))}: {e['msg']} (got {e.get('input')!r})" for e in errors if e["loc"]]
        raise RecipeError("invalid k8s settings:\n  " + "\n  ".join(lines or [str(exc)])) from None
    _check_settings(recipe, cfg)
    return cfg


def _check_counts(values: dict) -> None:
    for key, low in (("nodes", 1), ("gpus_per_node", 0)):
        raw = values.get(key)
        try:
            count = int(raw)
            if str(count) != str(raw).strip():
                raise ValueError
        except (TypeError, ValueError):
            raise RecipeError(f"{_where(key)}: expected a whole number, got {raw!r}") from None
        if count < low:
            raise RecipeError(f"{_where(key)}: must be >= {low}, got {count}")
        if key == "gpus_per_node" and count > 16:
            raise RecipeError(f"{_where(key)}: {count} GPUs per node is not a known node shape (0-16)")
        values[key] = count


def _check_settings(recipe: Recipe, cfg: K8sConfig) -> None:
    errors: list[str] = []
    if not cfg.image or not cfg.image.strip():
        errors.append(
            "k8s.image is not set: pass --image REGISTRY/llama-train-trainer:TAG or set k8s.image in the recipe"
        )
    elif any(c.isspace() for c in cfg.image):
        errors.append(f"{_where('image')}: image reference {cfg.image!r} contains whitespace")
    if not _DNS1123_LABEL.match(cfg.namespace) or len(cfg.namespace) > 63:
        errors.append(
            f"{_where('namespace')}: {cfg.namespace!r} is not a DNS-1123 label "
            "(lowercase letters, digits and '-', at most 63 characters)"
        )
    if cfg.name is not None:
        limit = max_job_name_length(cfg)
        if not _DNS1035_LABEL.match(cfg.name) or len(cfg.name) > limit:
            errors.append(
                f"k8s.name: {cfg.name!r} is not a DNS-1035 label of at most {limit} characters "
                "(starts with a letter; lowercase letters, digits and '-')"
            )
    for key in ("pvc", "service_account", "hf_token_secret", "priority_class", "runtime"):
        value = getattr(cfg, key)
        if value is not None and (not _DNS1123_SUBDOMAIN.match(value) or len(value) > 253):
            errors.append(f"k8s.{key}: {value!r} is not a valid object name (DNS-1123 subdomain)")
    if cfg.queue is not None and (not cfg.queue or not _LABEL_VALUE.match(cfg.queue) or len(cfg.queue) > 63):
        errors.append(f"{_where('queue')}: {cfg.queue!r} is not a valid label value (Kueue LocalQueue name)")
    for key in ("cpu", "memory", "shm_size", "pvc_size"):
        if not _QUANTITY.match(getattr(cfg, key)):
            errors.append(f"k8s.{key}: {getattr(cfg, key)!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
    if not cfg.mount_path.startswith("/") or cfg.mount_path.rstrip("/") in ("", "/etc/llama-train", "/dev/shm"):
        errors.append(f"k8s.mount_path: {cfg.mount_path!r} must be an absolute path of its own")
    for key in cfg.env:
        if not _ENV_NAME.match(key):
            errors.append(f"k8s.env: {key!r} is not a valid environment variable name")
        elif RESERVED_ENV.match(key):
            errors.append(f"k8s.env: {key} is set by the operator/torchrun; remove it")
    if cfg.gpus_per_node and cfg.nproc_per_node not in (None, cfg.gpus_per_node):
        errors.append(
            f"k8s.nproc_per_node ({cfg.nproc_per_node}) must equal --gpus-per-node / "
            f"k8s.gpus_per_node ({cfg.gpus_per_node}) on GPU nodes; unset it"
        )
    if cfg.gpus_per_node == 0 and recipe.parallel.backend == "nccl":
        errors.append(
            "parallel.backend is nccl but --gpus-per-node / k8s.gpus_per_node is 0; "
            "set parallel.backend: gloo (or auto) or request GPUs"
        )
    if cfg.gpus_per_node == 0 and cfg.gpu_product:
        errors.append("k8s.gpu_product is set but --gpus-per-node / k8s.gpus_per_node is 0")
    errors += _check_elastic(cfg)
    if errors:
        raise RecipeError("invalid k8s settings:\n  " + "\n  ".join(errors))


def _check_elastic(cfg: K8sConfig) -> list[str]:
    if cfg.min_nodes is None and cfg.max_nodes is None:
        return []
    errors = []
    if cfg.kind == "trainjob":
        errors.append(
            "k8s.min_nodes/k8s.max_nodes (elastic training) need --kind pytorchjob; "
            "TrainJob v1alpha1 has no elastic policy"
        )
    low = cfg.min_nodes or cfg.nodes
    high = cfg.max_nodes or cfg.nodes
    if not low <= cfg.nodes <= high:
        errors.append(
            f"elastic bounds need k8s.min_nodes ({low}) <= --nodes / k8s.nodes ({cfg.nodes}) <= k8s.max_nodes ({high})"
        )
    return errors


def is_elastic(cfg: K8sConfig) -> bool:
    return cfg.min_nodes is not None or cfg.max_nodes is not None


def max_job_name_length(cfg: K8sConfig) -> int:
    """Pods and their headless Services are `<job>-worker-<index>`: a DNS-1035 label (<= 63)."""
    if cfg.kind == "trainjob":
        return 63
    highest_index = max(cfg.nodes, cfg.max_nodes or 0)
    return 63 - len(f"-worker-{highest_index}")


def job_name(recipe: Recipe, cfg: K8sConfig) -> str:
    if cfg.name:
        return cfg.name
    base = recipe.output_dir.rstrip("/").rsplit("/", 1)[-1].lower()
    base = re.sub(r"[^a-z0-9-]+", "-", base).strip("-") or "run"
    name = f"llama-train-{base}"[: max_job_name_length(cfg)].rstrip("-")
    return name


def nproc_per_node(cfg: K8sConfig) -> int:
    return cfg.gpus_per_node or cfg.nproc_per_node or 1


def output_dir(cfg: K8sConfig, name: str) -> str:
    return f"{cfg.mount_path.rstrip('/')}/outputs/{name}"
