"""Render a recipe as Kubernetes objects (plain dicts): recipe ConfigMap + PyTorchJob or TrainJob.

Pure functions, no cluster access. The pod command is torchrun (through `llama_train.k8s.launch`,
torchrun with exit codes kept) reading the operator's PET_* variables; the recipe comes from the
ConfigMap, and `output_dir` is overridden onto the PVC so checkpoints survive pod restarts and
`checkpoint.resume: auto` picks them up on retry.
"""

from __future__ import annotations

import re
from typing import Any

from llama_train.config import Recipe, dump_recipe
from llama_train.errors import RecipeError
from llama_train.k8s.config import K8sConfig
from llama_train.tracking.client import DEFAULT_EXPERIMENT

RECIPE_DIR = "/etc/llama-train"
RECIPE_PATH = f"{RECIPE_DIR}/recipe.yaml"
MASTER_PORT = 23456  # the v1 operator's default for the port named `pytorchjob-port`
PYTORCHJOB_CONTAINER = "pytorch"  # the v1 webhook requires this container name
TRAINJOB_CONTAINER = "node"  # the container of the torch-distributed ClusterTrainingRuntime
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
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


# --------------------------------------------------------------------------------------------
# Settings: recipe k8s section + CLI flags, checked


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


# --------------------------------------------------------------------------------------------
# Pod pieces


def labels(recipe: Recipe, name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "llama-train",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/instance": name,
        "llama-train/recipe-sha256": recipe.sha256()[:16],  # label values are <= 63 chars
    }


def recipe_args(cfg: K8sConfig, name: str) -> list[str]:
    return [RECIPE_PATH, f"output_dir={output_dir(cfg, name)}"]


def train_command(cfg: K8sConfig, name: str) -> list[str]:
    """torchrun with no topology flags: it reads PET_NNODES/NPROC_PER_NODE/NODE_RANK/MASTER_*."""
    launcher = ["python", "-m", "llama_train.k8s.launch"] if cfg.exit_code_launcher else ["torchrun"]
    return [*launcher, "-m", "llama_train.train", *recipe_args(cfg, name)]


def preprocess_command(cfg: K8sConfig, name: str) -> list[str]:
    return ["llama-train", "preprocess", *recipe_args(cfg, name)]


def env_vars(recipe: Recipe, cfg: K8sConfig) -> list[dict]:
    mount = cfg.mount_path.rstrip("/")
    uri = cfg.mlflow_uri
    if uri is None:
        tracked = recipe.tracking.uri or ""
        uri = tracked if tracked.startswith(("http://", "https://")) else "http://mlflow:5000"
    env = [
        {"name": "MLFLOW_TRACKING_URI", "value": uri},
        {
            "name": "MLFLOW_EXPERIMENT_NAME",
            "value": cfg.mlflow_experiment or recipe.tracking.experiment or DEFAULT_EXPERIMENT,
        },
        {"name": "HF_HOME", "value": f"{mount}/cache/huggingface"},
        {"name": "XDG_CACHE_HOME", "value": f"{mount}/cache"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if cfg.hf_token_secret:
        env.append(
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": cfg.hf_token_secret, "key": cfg.hf_token_key}}}
        )
    env += [{"name": k, "value": v} for k, v in sorted(cfg.env.items())]
    return env


def volumes(cfg: K8sConfig, name: str) -> list[dict]:
    return [
        {"name": "recipe", "configMap": {"name": f"{name}-recipe"}},
        {"name": "data", "persistentVolumeClaim": {"claimName": cfg.pvc}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]


def volume_mounts(cfg: K8sConfig) -> list[dict]:
    return [
        {"name": "recipe", "mountPath": RECIPE_DIR, "readOnly": True},
        {"name": "data", "mountPath": cfg.mount_path},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]


def container_security_context() -> dict:
    """Pod Security Standards `restricted`."""
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context(cfg: K8sConfig) -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": cfg.run_as_user,
        "runAsGroup": cfg.run_as_user,
        "fsGroup": cfg.run_as_user,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resources(cfg: K8sConfig, *, gpus: bool = True) -> dict:
    limits: dict[str, Any] = {"memory": cfg.memory}
    if gpus and cfg.gpus_per_node:
        limits[cfg.gpu_resource] = cfg.gpus_per_node
    return {"requests": {"cpu": cfg.cpu, "memory": cfg.memory}, "limits": limits}


def scheduling(cfg: K8sConfig) -> dict:
    """nodeSelector / tolerations / priority for the pod spec."""
    out: dict[str, Any] = {}
    selector = dict(cfg.node_selector)
    if cfg.gpu_product:
        selector[GPU_PRODUCT_LABEL] = cfg.gpu_product
    if selector:
        out["nodeSelector"] = selector
    if cfg.gpus_per_node:
        out["tolerations"] = [{"key": cfg.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    return out


def pod_template(recipe: Recipe, cfg: K8sConfig, name: str) -> dict:
    mounts = volume_mounts(cfg)
    env = env_vars(recipe, cfg)
    container = {
        "name": PYTORCHJOB_CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": train_command(cfg, name),
        "env": env,
        "ports": [{"name": "pytorchjob-port", "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "resources": resources(cfg),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
    }
    spec: dict[str, Any] = {
        "serviceAccountName": cfg.service_account,
        "securityContext": pod_security_context(cfg),
        "terminationGracePeriodSeconds": cfg.termination_grace_period_seconds,
        **scheduling(cfg),
    }
    if cfg.priority_class:
        spec["priorityClassName"] = cfg.priority_class
    if cfg.preprocess:
        spec["initContainers"] = [
            {
                "name": "preprocess",
                "image": cfg.image,
                "imagePullPolicy": cfg.image_pull_policy,
                "command": preprocess_command(cfg, name),
                "env": env,
                "resources": resources(cfg, gpus=False),
                "volumeMounts": mounts,
                "securityContext": container_security_context(),
            }
        ]
    spec["containers"] = [container]
    spec["volumes"] = volumes(cfg, name)
    return {
        "metadata": {"labels": labels(recipe, name), "annotations": {"llama-train/recipe-sha256": recipe.sha256()}},
        "spec": spec,
    }


# --------------------------------------------------------------------------------------------
# Objects


def _metadata(recipe: Recipe, cfg: K8sConfig, name: str, *, queue: bool = False) -> dict:
    meta_labels = labels(recipe, name)
    if queue and cfg.queue:
        meta_labels[QUEUE_LABEL] = cfg.queue
    return {
        "name": name,
        "namespace": cfg.namespace,
        "labels": meta_labels,
        "annotations": {"llama-train/recipe-sha256": recipe.sha256()},
    }


def render_configmap(recipe: Recipe, cfg: K8sConfig, name: str) -> dict:
    meta = _metadata(recipe, cfg, f"{name}-recipe")
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"recipe.yaml": dump_recipe(recipe)}}


def render_pvc(cfg: K8sConfig) -> dict:
    spec: dict[str, Any] = {
        # Several pods write checkpoints and read caches: RWX when there is more than one node.
        "accessModes": ["ReadWriteMany" if (cfg.max_nodes or cfg.nodes) > 1 else "ReadWriteOnce"],
        "resources": {"requests": {"storage": cfg.pvc_size}},
    }
    if cfg.storage_class:
        spec["storageClassName"] = cfg.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": cfg.pvc, "namespace": cfg.namespace, "labels": {"app.kubernetes.io/name": "llama-train"}},
        "spec": spec,
    }


def render_pytorchjob(recipe: Recipe, **flags: Any) -> dict:
    cfg = resolve_k8s(recipe, **{**flags, "kind": "pytorchjob"})
    return _pytorchjob(recipe, cfg, job_name(recipe, cfg))


def _pytorchjob(recipe: Recipe, cfg: K8sConfig, name: str) -> dict:
    template = pod_template(recipe, cfg, name)
    # ExitCode: 1-127 (bad recipe/data) fail the job; >= 128 (143 preemption, infra) recreate the pod.
    replica = {"restartPolicy": "ExitCode", "template": template}
    run_policy: dict[str, Any] = {"backoffLimit": cfg.backoff_limit, "cleanPodPolicy": cfg.clean_pod_policy}
    if cfg.ttl_seconds_after_finished is not None:
        run_policy["ttlSecondsAfterFinished"] = cfg.ttl_seconds_after_finished
    if cfg.active_deadline_seconds is not None:
        run_policy["activeDeadlineSeconds"] = cfg.active_deadline_seconds
    spec: dict[str, Any] = {"nprocPerNode": str(nproc_per_node(cfg)), "runPolicy": run_policy}
    if is_elastic(cfg):
        # Elastic: identical Worker pods (no Master), c10d rendezvous on <job>-worker-0:23456.
        spec["elasticPolicy"] = {
            "minReplicas": cfg.min_nodes or cfg.nodes,
            "maxReplicas": cfg.max_nodes or cfg.nodes,
            "rdzvBackend": "c10d",
            "rdzvId": name,
            "maxRestarts": cfg.max_restarts,
        }
        spec["pytorchReplicaSpecs"] = {"Worker": {"replicas": cfg.nodes, **replica}}
    else:
        spec["pytorchReplicaSpecs"] = {"Master": {"replicas": 1, **replica}}
        if cfg.nodes > 1:
            spec["pytorchReplicaSpecs"]["Worker"] = {"replicas": cfg.nodes - 1, **replica}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(recipe, cfg, name, queue=True),
        "spec": spec,
    }


def render_trainjob(recipe: Recipe, **flags: Any) -> dict:
    cfg = resolve_k8s(recipe, **{**flags, "kind": "trainjob"})
    return _trainjob(recipe, cfg, job_name(recipe, cfg))


def _trainjob(recipe: Recipe, cfg: K8sConfig, name: str) -> dict:
    command = train_command(cfg, name)
    if cfg.preprocess:
        # The runtime's pod has no preprocess init container (patches may only touch containers the
        # runtime defines), so preprocess first in the same container; `exec` keeps signals and
        # exit codes with torchrun.
        script = 'llama-train preprocess "$@" && exec ' + " ".join(command[:-2]) + ' "$@"'
        command = ["/bin/sh", "-c", script, "llama-train", *recipe_args(cfg, name)]
    pod = pod_template(recipe, cfg, name)["spec"]
    pod_patch: dict[str, Any] = {
        "serviceAccountName": cfg.service_account,
        "securityContext": pod["securityContext"],
        "terminationGracePeriodSeconds": cfg.termination_grace_period_seconds,
        **scheduling(cfg),
        "volumes": volumes(cfg, name),
        "containers": [
            {
                "name": TRAINJOB_CONTAINER,
                "volumeMounts": volume_mounts(cfg),
                "securityContext": container_security_context(),
            }
        ],
    }
    patch = {
        "manager": "llama-train",
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": "node",
                            "template": {
                                "spec": {
                                    "template": {
                                        "metadata": {"labels": labels(recipe, name)},
                                        "spec": pod_patch,
                                    }
                                }
                            },
                        }
                    ]
                }
            }
        },
    }
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime", "name": cfg.runtime},
        "trainer": {
            "image": cfg.image,
            "command": command,
            "numNodes": cfg.nodes,
            "numProcPerNode": nproc_per_node(cfg),
            "resourcesPerNode": resources(cfg),
            "env": env_vars(recipe, cfg),  # never PET_*: the torch plugin owns them
        },
        "runtimePatches": [patch],
    }
    if cfg.active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = cfg.active_deadline_seconds
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": _metadata(recipe, cfg, name, queue=True),
        "spec": spec,
    }


def render_manifests(recipe: Recipe, *, kind: str | None = None, **flags: Any) -> list[dict]:
    """[ConfigMap(recipe), (PVC,) job]: what `llama-train k8s render` prints and `submit` creates."""
    from llama_train.errors import PreflightError
    from llama_train.preflight import check_world

    cfg = resolve_k8s(recipe, kind=kind, **flags)
    # The world-size half of `recipe validate --world-size` (strategy, global batch): a job that
    # cannot start is refused here rather than after its pods are scheduled. (The hardware half
    # is left to the pods: the machine that renders has other devices.)
    world = cfg.nodes * nproc_per_node(cfg)
    try:
        check_world(recipe, world)
    except PreflightError as exc:
        raise PreflightError(
            f"{exc} (world size {world} = --nodes {cfg.nodes} x {nproc_per_node(cfg)} process(es) per node)"
        ) from None
    name = job_name(recipe, cfg)
    job = _pytorchjob(recipe, cfg, name) if cfg.kind == "pytorchjob" else _trainjob(recipe, cfg, name)
    objects = [render_configmap(recipe, cfg, name)]
    if cfg.create_pvc:
        objects.append(render_pvc(cfg))
    objects.append(job)
    return objects


def to_yaml(objects: list[dict]) -> str:
    import yaml

    class NoAliasDumper(yaml.SafeDumper):
        """Shared sub-dicts (env, volume mounts) are written in full: no &id001 anchors in manifests."""

        def ignore_aliases(self, data):
            return True

    return yaml.dump_all(objects, Dumper=NoAliasDumper, sort_keys=False, default_flow_style=False)
