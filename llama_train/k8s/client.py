"""submit / status / logs / wait / delete through the official kubernetes Python client.

The client is imported lazily so rendering works without it. Configuration: in-cluster service
account when running in a pod, else the current kubeconfig context.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from llama_train.errors import LlamaTrainError, RecipeError


class ClusterError(LlamaTrainError):
    """The cluster could not be reached or refused a request (exit code 1)."""

    exit_code = 1


@dataclass(frozen=True)
class JobKind:
    group: str
    version: str
    plural: str
    kind: str
    pod_selector: str  # label selecting the job's pods; `{name}` is the job name
    container: str
    done: tuple[str, ...]  # condition types that end the job (success first)


KINDS = {
    "pytorchjob": JobKind(
        "kubeflow.org",
        "v1",
        "pytorchjobs",
        "PyTorchJob",
        "training.kubeflow.org/job-name={name}",
        "pytorch",
        ("Succeeded", "Failed"),
    ),
    "trainjob": JobKind(
        "trainer.kubeflow.org",
        "v1alpha1",
        "trainjobs",
        "TrainJob",
        "jobset.sigs.k8s.io/jobset-name={name}",
        "node",
        ("Complete", "Failed"),
    ),
}


def job_kind(kind: str) -> JobKind:
    if kind not in KINDS:
        raise RecipeError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    return KINDS[kind]


def _client() -> Any:
    try:
        import kubernetes
    except ImportError:
        raise ClusterError("the kubernetes client is not installed: pip install 'llama_train[k8s]'") from None
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config()
        except Exception as exc:
            raise ClusterError(f"no cluster configuration (in-cluster or kubeconfig): {exc}") from None
    return kubernetes.client


def _api_error(action: str, exc: Exception) -> ClusterError:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", "") or str(exc)
    return ClusterError(f"{action} failed" + (f" (HTTP {status} {reason})" if status else f": {reason}"))


def submit(objects: list[dict]) -> list[str]:
    """Create the rendered objects in order. The recipe ConfigMap is replaced when it exists; an
    existing PVC is kept (it holds checkpoints); an existing job is an error (delete it first)."""
    client = _client()
    from kubernetes.client.rest import ApiException

    core, custom = client.CoreV1Api(), client.CustomObjectsApi()
    created = []
    for obj in objects:
        ns, name, kind = obj["metadata"]["namespace"], obj["metadata"]["name"], obj["kind"]
        try:
            if kind == "ConfigMap":
                try:
                    core.create_namespaced_config_map(ns, obj)
                except ApiException as exc:
                    if exc.status != 409:
                        raise
                    core.replace_namespaced_config_map(name, ns, obj)
            elif kind == "PersistentVolumeClaim":
                try:
                    core.create_namespaced_persistent_volume_claim(ns, obj)
                except ApiException as exc:
                    if exc.status != 409:
                        raise
            else:
                k = job_kind(kind.lower())
                try:
                    custom.create_namespaced_custom_object(k.group, k.version, ns, k.plural, obj)
                except ApiException as exc:
                    if exc.status == 409:
                        raise ClusterError(
                            f"{kind} {ns}/{name} already exists; `llama-train k8s "
                            f"delete {name} -n {ns}` first, or set k8s.name"
                        ) from None
                    raise
        except ApiException as exc:
            raise _api_error(f"creating {kind} {ns}/{name}", exc) from None
        created.append(f"{kind.lower()}/{name}")
    return created


def get_job(name: str, *, namespace: str, kind: str = "pytorchjob") -> dict:
    client = _client()
    from kubernetes.client.rest import ApiException

    k = job_kind(kind)
    try:
        return client.CustomObjectsApi().get_namespaced_custom_object(k.group, k.version, namespace, k.plural, name)
    except ApiException as exc:
        raise _api_error(f"reading {k.kind} {namespace}/{name}", exc) from None


def job_state(job: dict) -> str:
    """The newest true condition type (Created, Running, Restarting, Succeeded/Complete, Failed...)."""
    conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    if not conditions:
        return "Pending"
    return sorted(conditions, key=lambda c: c.get("lastTransitionTime") or "")[-1]["type"]


def status(name: str, *, namespace: str, kind: str = "pytorchjob") -> dict:
    job = get_job(name, namespace=namespace, kind=kind)
    st = job.get("status") or {}
    return {
        "name": name,
        "namespace": namespace,
        "kind": job_kind(kind).kind,
        "state": job_state(job),
        "conditions": [
            {k: c.get(k) for k in ("type", "status", "reason", "message")} for c in st.get("conditions") or []
        ],
        "replicas": st.get("replicaStatuses") or st.get("jobsStatus") or {},
    }


def logs(
    name: str, *, namespace: str, kind: str = "pytorchjob", follow: bool = False, tail_lines: int | None = None
) -> Iterator[str]:
    """Log lines of every pod of the job, prefixed with the pod name (follow: first pod only)."""
    client = _client()
    from kubernetes.client.rest import ApiException

    k = job_kind(kind)
    core = client.CoreV1Api()
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=k.pod_selector.format(name=name)).items
    except ApiException as exc:
        raise _api_error(f"listing pods of {k.kind} {namespace}/{name}", exc) from None
    if not pods:
        raise ClusterError(f"no pods for {k.kind} {namespace}/{name} yet (see `llama-train k8s status {name}`)")
    pods = sorted(pods, key=lambda p: p.metadata.name)
    for pod in pods[:1] if follow else pods:
        pod_name = pod.metadata.name
        try:
            if follow:
                from kubernetes import watch

                stream = watch.Watch().stream(
                    core.read_namespaced_pod_log, pod_name, namespace, container=k.container, tail_lines=tail_lines
                )
                for line in stream:
                    yield f"[{pod_name}] {line}"
            else:
                text = core.read_namespaced_pod_log(pod_name, namespace, container=k.container, tail_lines=tail_lines)
                for line in text.splitlines():
                    yield f"[{pod_name}] {line}"
        except ApiException as exc:
            raise _api_error(f"reading logs of {pod_name}", exc) from None


def wait(name: str, *, namespace: str, kind: str = "pytorchjob", timeout_s: float = 3600, poll_s: float = 10) -> str:
    """Block until the job succeeds or fails; returns the final state. Raises on timeout."""
    k = job_kind(kind)
    deadline = time.monotonic() + timeout_s
    while True:
        state = job_state(get_job(name, namespace=namespace, kind=kind))
        if state in k.done:
            return state
        if time.monotonic() > deadline:
            raise ClusterError(f"{k.kind} {namespace}/{name} still {state} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def delete(name: str, *, namespace: str, kind: str = "pytorchjob") -> list[str]:
    """Delete the job and its recipe ConfigMap (the PVC with checkpoints is kept)."""
    client = _client()
    from kubernetes.client.rest import ApiException

    k = job_kind(kind)
    deleted = []
    try:
        client.CustomObjectsApi().delete_namespaced_custom_object(
            k.group, k.version, namespace, k.plural, name, propagation_policy="Foreground"
        )
        deleted.append(f"{kind}/{name}")
    except ApiException as exc:
        raise _api_error(f"deleting {k.kind} {namespace}/{name}", exc) from None
    try:
        client.CoreV1Api().delete_namespaced_config_map(f"{name}-recipe", namespace)
        deleted.append(f"configmap/{name}-recipe")
    except ApiException as exc:
        if exc.status != 404:
            raise _api_error(f"deleting ConfigMap {namespace}/{name}-recipe", exc) from None
    return deleted
