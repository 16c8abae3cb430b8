"""Check rendered objects: the Kubeflow admission-webhook rules (not in the CRD schemas), the
upstream CRD schemas (Draft 7, from ../shared/k8s-schemas), the Pod Security Standards
`restricted` fields, and pod templates as core Pods (kubernetes-validate, strict).

All checks return a list of problems (empty = fine); they never raise for a bad object.
"""

from __future__ import annotations

import copy
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMAS_ENV = "LLAMA_TRAIN_K8S_SCHEMAS"
PET_OWNED = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
CRD_FILES = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.v1.9.4.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): "trainer.kubeflow.org_clustertrainingruntimes.yaml",
}
# prometheus-operator CRDs, shipped in this repository (k8s/schemas): they are not in ../shared.
MONITORING_CRD_FILES = {
    ("monitoring.coreos.com/v1", kind): f"monitoring.coreos.com_{kind.lower()}s.v0.93.0.yaml"
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule")
}
MONITORING_SCHEMAS = Path(__file__).resolve().parents[2] / "k8s" / "schemas"
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# --------------------------------------------------------------------------------------------
# Webhook rules


def webhook_errors(obj: dict) -> list[str]:
    kind = obj.get("kind")
    if kind == "PyTorchJob":
        return _pytorchjob_webhook(obj)
    if kind == "TrainJob":
        return _trainjob_webhook(obj)
    return []


def _name_errors(obj: dict, max_len: int) -> list[str]:
    name = (obj.get("metadata") or {}).get("name") or ""
    if not _DNS1035.match(name) or len(name) > max_len:
        return [f"metadata.name {name!r} must be a DNS-1035 label of at most {max_len} characters"]
    return []


def _pytorchjob_webhook(job: dict) -> list[str]:
    errors = _name_errors(job, 63)
    spec = job.get("spec") or {}
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not replicas:
        errors.append("spec.pytorchReplicaSpecs is empty")
    for rtype, rspec in replicas.items():
        where = f"spec.pytorchReplicaSpecs.{rtype}"
        if rtype not in ("Master", "Worker"):
            errors.append(f"{where}: replica type must be Master or Worker")
        if rtype == "Master" and rspec.get("replicas", 1) != 1:
            errors.append(f"{where}.replicas must be 1, got {rspec.get('replicas')}")
        containers = (((rspec.get("template") or {}).get("spec") or {}).get("containers")) or []
        pytorch = [c for c in containers if c.get("name") == "pytorch"]
        if not pytorch:
            errors.append(f"{where}: the pod template needs a container named `pytorch`")
        elif not pytorch[0].get("image"):
            errors.append(f"{where}: container `pytorch` has no image")
    elastic = spec.get("elasticPolicy") or {}
    if spec.get("nprocPerNode") is not None and elastic.get("nProcPerNode") is not None:
        errors.append("spec.nprocPerNode and spec.elasticPolicy.nProcPerNode must not both be set")
    return errors


def _trainjob_webhook(job: dict) -> list[str]:
    errors = _name_errors(job, 63)
    env = ((job.get("spec") or {}).get("trainer") or {}).get("env") or []
    for item in env:
        if item.get("name") in PET_OWNED:
            errors.append(f"spec.trainer.env sets {item['name']}, which the torch plugin owns")
    return errors


# --------------------------------------------------------------------------------------------
# Upstream CRD schemas


def schemas_dir() -> Path | None:
    """$LLAMA_TRAIN_K8S_SCHEMAS, else ../shared/k8s-schemas next to the repository; None if absent."""
    env = os.environ.get(SCHEMAS_ENV)
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[2]
    candidates.append(repo.parent / "shared" / "k8s-schemas")
    return next((p for p in candidates if (p / CRD_FILES[("kubeflow.org/v1", "PyTorchJob")]).exists()), None)


@lru_cache(maxsize=8)
def _crd_schema(path: str, api_version: str) -> dict:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are ~1 MB
    crd = yaml.load(Path(path).read_text(), Loader=loader)
    version = api_version.rsplit("/", 1)[-1]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{path} has no version {version}")


def crd_errors(obj: dict, directory: Path | None = None) -> list[str]:
    """Draft 7 validation against the CRD's openAPIV3Schema; [] for kinds without a CRD file."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in MONITORING_CRD_FILES:
        schema = _crd_schema(str(MONITORING_SCHEMAS / MONITORING_CRD_FILES[key]), key[0])
        return _schema_errors(obj, schema)
    if key not in CRD_FILES:
        return []
    directory = directory or schemas_dir()
    if directory is None:
        raise FileNotFoundError(f"CRD schemas not found; set {SCHEMAS_ENV}")
    return _schema_errors(obj, _crd_schema(str(directory / CRD_FILES[key]), key[0]))


def _schema_errors(obj: dict, schema: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    ]


# --------------------------------------------------------------------------------------------
# Pods


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec-like dict) for every pod the object creates."""
    kind = obj.get("kind")
    if kind == "PyTorchJob":
        return [
            (f"spec.pytorchReplicaSpecs.{r}.template", s["template"])
            for r, s in obj["spec"]["pytorchReplicaSpecs"].items()
        ]
    if kind == "TrainJob":
        return [("spec.trainer + runtimePatches (node)", trainjob_pod_template(obj))]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [("spec.template", obj["spec"]["template"])]
    if kind == "Pod":
        return [("(pod)", {"metadata": obj.get("metadata", {}), "spec": obj["spec"]})]
    return []


def trainjob_pod_template(job: dict) -> dict:
    """The `node` pod the torch-distributed runtime builds from trainer + our runtime patch
    (a simplified merge: enough to validate the fields we render as a core Pod)."""
    trainer = job["spec"]["trainer"]
    patch: dict[str, Any] = {}
    for p in job["spec"].get("runtimePatches") or []:
        for rj in p["trainingRuntimeSpec"]["template"]["spec"].get("replicatedJobs", []):
            if rj["name"] == "node":
                patch = copy.deepcopy(rj["template"]["spec"]["template"])
    spec = patch.get("spec", {})
    patched = {c["name"]: c for c in spec.pop("containers", [])}
    container = {
        "name": "node",
        "image": trainer.get("image", "pytorch/pytorch"),
        "command": trainer.get("command"),
        "env": trainer.get("env", []),
        "resources": trainer.get("resourcesPerNode", {}),
    }
    container.update({k: v for k, v in patched.get("node", {}).items() if k != "name"})
    container = {k: v for k, v in container.items() if v is not None}
    spec["containers"] = [container]
    spec["restartPolicy"] = "Never"
    return {"metadata": patch.get("metadata", {}), "spec": spec}


def restricted_errors(template: dict) -> list[str]:
    """Pod Security Standards `restricted` fields on a pod template."""
    spec = template.get("spec") or {}
    errors = []
    pod_sc = spec.get("securityContext") or {}
    if (pod_sc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        errors.append("pod securityContext.seccompProfile.type must be RuntimeDefault")
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        sc = c.get("securityContext") or {}
        name = c.get("name")
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"container {name}: allowPrivilegeEscalation must be false")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            errors.append(f"container {name}: capabilities.drop must contain ALL")
        if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
            errors.append(f"container {name}: runAsNonRoot must be true")
        if sc.get("privileged"):
            errors.append(f"container {name}: privileged is forbidden")
        if (sc.get("runAsUser", pod_sc.get("runAsUser")) or 1) == 0:
            errors.append(f"container {name}: runAsUser 0 is forbidden")
    for v in spec.get("volumes") or []:
        if "hostPath" in v:
            errors.append(f"volume {v.get('name')}: hostPath is forbidden")
    return errors


def pod_errors(template: dict, *, k8s_version: str | None = None) -> list[str]:
    """Validate a pod template as a core v1 Pod with kubernetes-validate (strict: unknown fields fail)."""
    import kubernetes_validate

    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "check", **(template.get("metadata") or {})},
        "spec": template.get("spec") or {},
    }
    version = k8s_version or kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(pod, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(map(str, exc.absolute_path)) or "(root)"
        return [f"{path}: {exc.message}"]
    return []


def mount_errors(template: dict) -> list[str]:
    """Mounts that no container runtime can set up: a mountPath inside another mount of the same
    container that is read-only. runc (and so containerd, CRI-O, kind, podman) creates the inner
    mount point in the outer mount, which fails with `read-only file system`."""
    errors = []
    spec = template.get("spec") or {}
    for kind in ("initContainers", "containers"):
        for c in spec.get(kind) or []:
            mounts = c.get("volumeMounts") or []
            for outer in mounts:
                if not outer.get("readOnly"):
                    continue
                top = outer["mountPath"].rstrip("/") + "/"
                for inner in mounts:
                    if inner is not outer and inner["mountPath"].startswith(top):
                        errors.append(
                            f"{kind}[{c.get('name')}].volumeMounts: {inner['mountPath']} lies inside "
                            f"the read-only mount {outer['mountPath']}; the runtime cannot create its "
                            "mount point there (read-only file system). Mount them side by side, or "
                            "drop the outer mount"
                        )
    return errors


def resource_errors(obj: dict, *, k8s_version: str | None = None) -> list[str]:
    """A core object (ConfigMap, Deployment, ...) with kubernetes-validate strict; CRs are skipped."""
    import kubernetes_validate

    version = k8s_version or kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return []
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(map(str, exc.absolute_path)) or "(root)"
        return [f"{path}: {exc.message}"]
    return []


def all_errors(obj: dict, *, schemas: Path | None = None, check_crd: bool = True) -> list[str]:
    """Every check that applies to one object, prefixed with `Kind/name`."""
    errors = webhook_errors(obj)
    monitoring = (obj.get("apiVersion"), obj.get("kind")) in MONITORING_CRD_FILES
    if check_crd and (monitoring or schemas or schemas_dir()):
        errors += crd_errors(obj, schemas)
    errors += resource_errors(obj)
    for where, template in pod_templates(obj):
        errors += [f"{where}: {e}" for e in pod_errors(template) + restricted_errors(template) + mount_errors(template)]
    ref = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
    return [f"{ref}: {e}" for e in errors]
