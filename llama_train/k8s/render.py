"""Render a recipe as Kubernetes objects (plain dicts): recipe ConfigMap + PyTorchJob or TrainJob.

Pure functions, no cluster access. The pod command is torchrun (through `llama_train.k8s.launch`,
torchrun with exit codes kept) reading the operator's PET_* variables; the recipe comes from the
ConfigMap, and `output_dir` is overridden onto the PVC so checkpoints survive pod restarts and
`checkpoint.resume: auto` picks them up on retry. The settings (recipe k8s section + CLI flags,
checked) come from llama_train.k8s.settings.
"""

from __future__ import annotations

from typing import Any

from llama_train.config import Recipe, dump_recipe
from llama_train.k8s.config import K8sConfig
from llama_train.k8s.settings import is_elastic, job_name, nproc_per_node, output_dir, resolve_k8s
from llama_train.tracking.client import DEFAULT_EXPERIMENT

RECIPE_DIR = "/etc/llama-train"
RECIPE_PATH = f"{RECIPE_DIR}/recipe.yaml"
MASTER_PORT = 23456  # the v1 operator's default for the port named `pytorchjob-port`
PYTORCHJOB_CONTAINER = "pytorch"  # the v1 webhook requires this container name
TRAINJOB_CONTAINER = "node"  # the container of the torch-distributed ClusterTrainingRuntime
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


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
