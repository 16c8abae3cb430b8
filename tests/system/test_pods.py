"""The rendered PyTorchJob's Master and Worker pod templates, run as pods with `podman kube play`
on one podman network: the closest thing to a kubelet on a CI machine (no API server, no operator).

The harness plays the Kubeflow training operator and the cluster, and changes only what they would
provide (../shared/k8s-schemas/pytorchjob_env_contract.json; see test_k8s_pod_sim.py):
- the operator's environment (MASTER_ADDR = the master pod's address, which the headless Service
  resolves to on a cluster; ports, WORLD_SIZE, RANK = node rank, PET_*), and restartPolicy Never
  (the operator, not the kubelet, restarts on ExitCode);
- the PVC is a host directory owned by UID 1000 (what a provisioner plus fsGroup give; podman 4.3
  makes a root-owned volume), the emptyDirs likewise (podman turns them into root-owned volumes);
- MLFLOW_TRACKING_URI: the in-cluster server becomes a SQLite store on the shared volume;
- the containerPort declaration is dropped (podman 4.3 publishes it on the host, where the two pods'
  23456 would collide; on a cluster it is informational).
Everything else (command, init container, ConfigMap, security contexts, limits) runs as rendered."""

from __future__ import annotations

import copy
import json
import os
import time
import uuid
from pathlib import Path

import pytest
import yaml

from llama_train.config import recipe_from_dict
from llama_train.k8s.render import render_manifests

from ..conftest import tiny_recipe
from ..integration.test_k8s_pod_sim import _operator_env
from .containers import podman

pytestmark = pytest.mark.slow
PORT = 23456  # the rendered pytorchjob-port
MAX_STEPS = 60  # long enough to be preempted after the first checkpoint (every 2 steps)


def _host_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)
    os.chown(path, 1000, 1000)
    return path


class Cluster:
    """One podman network; pods get fixed addresses on it (the master's is MASTER_ADDR)."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.id = uuid.uuid4().hex[:8]
        self.network = f"lt-pods-{self.id}"
        podman("network", "create", self.network)  # podman picks a free /24 (10.89.x.0/24)
        (net,) = json.loads(podman("network", "inspect", self.network).stdout)
        cidr = net["subnets"][0]["subnet"]
        assert cidr.endswith(".0/24"), cidr
        self.subnet = cidr.rsplit(".", 1)[0]
        self.yamls: list[Path] = []

    def play(self, objects: list[dict], *, ip: str, configmaps: list[Path] = ()) -> None:
        path = self.tmp / f"kube-{len(self.yamls)}.yaml"
        path.write_text(yaml.safe_dump_all(objects))
        self.yamls.append(path)
        args = ["kube", "play", "--network", self.network, "--ip", ip]
        for cm in configmaps:
            args += ["--configmap", str(cm)]
        podman(*args, str(path), timeout=600)

    def down(self) -> None:
        for path in self.yamls:
            podman("kube", "down", str(path), check=False)
        self.yamls = []

    def close(self) -> None:
        self.down()
        podman("network", "rm", "-f", self.network, check=False)


def _render(tmp_path: Path, image: str, *, max_steps: int, every: int, save_final: bool = True):
    spec = tiny_recipe(
        tmp_path,
        train={"max_steps": max_steps, "micro_batch_size": 4, "num_threads": 1},
        parallel={"strategy": "ddp", "backend": "gloo"},
        tracking={"enabled": True, "experiment": "pods"},
        checkpoint={"save_final": save_final, "every_n_steps": every},
        k8s={"image": image, "nodes": 2, "gpus_per_node": 0, "cpu": "1", "memory": "3Gi"},
    )
    objects = render_manifests(recipe_from_dict(spec), kind="pytorchjob")
    configmap, job = objects[0], objects[-1]
    assert configmap["kind"] == "ConfigMap" and job["kind"] == "PyTorchJob"
    return configmap, job


def _pod(job: dict, rtype: str, *, master_ip: str, pvc: Path, scratch: Path, pvc_read_only: bool = False) -> dict:
    """`pvc_read_only`: the training container sees the shared volume read-only (a probe: a rank
    that writes to it fails)."""
    template = copy.deepcopy(job["spec"]["pytorchReplicaSpecs"][rtype]["template"])
    spec = template["spec"]
    spec["restartPolicy"] = "Never"
    claims = {v["name"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
    for vol in spec["volumes"]:
        if "persistentVolumeClaim" in vol:
            vol.pop("persistentVolumeClaim")
            vol["hostPath"] = {"path": str(pvc), "type": "Directory"}
        elif "emptyDir" in vol:
            vol.pop("emptyDir")
            vol["hostPath"] = {"path": str(_host_dir(scratch / f"{rtype.lower()}-{vol['name']}")), "type": "Directory"}
    operator = _operator_env(job, rtype, 0, PORT)
    operator.update(MASTER_ADDR=master_ip, PET_MASTER_ADDR=master_ip)
    for container in spec.get("initContainers", []) + spec["containers"]:
        env = [e for e in container.get("env", []) if e["name"] != "MLFLOW_TRACKING_URI"]
        env.append({"name": "MLFLOW_TRACKING_URI", "value": "sqlite:////mnt/llama-train/mlflow.db"})
        if container["name"] == "pytorch":
            env += [{"name": k, "value": v} for k, v in operator.items()]
            # podman 4.3 publishes every containerPort on the host (then the second pod's 23456
            # collides); on a cluster the declaration is informational: the pods reach each other
            # on the pod network either way.
            assert container.pop("ports")[0]["containerPort"] == PORT
            if pvc_read_only:
                for mount in container["volumeMounts"]:
                    if mount["name"] in claims:
                        mount["readOnly"] = True
        container["env"] = env
    name = f"{job['metadata']['name']}-{rtype.lower()}-0"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": template["metadata"].get("labels", {})},
        "spec": spec,
    }


def _wait_exit(container: str, timeout: float = 900) -> int:
    return int(podman("wait", container, timeout=timeout).stdout.strip().splitlines()[-1])


def _logs(container: str) -> str:
    proc = podman("logs", container, check=False)
    return proc.stdout + proc.stderr


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()


def _start_job(
    cluster: Cluster, job: dict, configmap: dict, pvc: Path, *, worker_read_only: bool = False
) -> dict[str, str]:
    cm_path = cluster.tmp / "configmap.yaml"
    cm_path.write_text(yaml.safe_dump(configmap))
    master_ip, worker_ip = f"{cluster.subnet}.10", f"{cluster.subnet}.11"
    names = {}
    for rtype, ip in (("Master", master_ip), ("Worker", worker_ip)):
        pod = _pod(
            job,
            rtype,
            master_ip=master_ip,
            pvc=pvc,
            scratch=cluster.tmp / "scratch",
            pvc_read_only=worker_read_only and rtype == "Worker",
        )
        cluster.play([pod], ip=ip, configmaps=[cm_path])
        names[rtype] = f"{pod['metadata']['name']}-pytorch"
    return names


def test_pytorchjob_pods_train_with_two_ranks_and_only_the_master_writes(images, cluster, tmp_path):
    # no checkpoint here (each rank writes its own RNG state into one: rng_rank<N>.pt; the
    # preemption test below covers checkpoints)
    configmap, job = _render(tmp_path, images["trainer"], max_steps=3, every=0, save_final=False)
    pvc = _host_dir(tmp_path / "pvc")
    t0 = time.monotonic()
    # the worker's training container gets the shared volume read-only: if rank 1 wrote anything
    # there (outputs, adapter, run.json, tracking), it would fail and the job with it
    names = _start_job(cluster, job, configmap, pvc, worker_read_only=True)
    codes = {rtype: _wait_exit(name) for rtype, name in names.items()}
    print(f"2-pod PyTorchJob: {time.monotonic() - t0:.0f} s")
    logs = {rtype: _logs(name) for rtype, name in names.items()}
    assert codes == {"Master": 0, "Worker": 0}, logs
    out = next(pvc.glob("outputs/*"))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["world_size"] == 2 and run["global_step"] == 3
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "step 3/3" in logs["Master"] and "step " not in logs["Worker"]  # only global rank 0 reports
    owners = {p.stat().st_uid for p in out.rglob("*")}
    assert owners == {1000}, owners  # written by the pods' runAsUser
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{pvc}/mlflow.db")
    exp = client.get_experiment_by_name("pods")
    (tracked,) = client.search_runs([exp.experiment_id])  # only the master tracks
    assert tracked.info.status == "FINISHED" and tracked.data.metrics


def test_preempted_pods_exit_143_and_the_rerun_resumes(images, cluster, tmp_path):
    configmap, job = _render(tmp_path, images["trainer"], max_steps=MAX_STEPS, every=2)
    pvc = _host_dir(tmp_path / "pvc")
    names = _start_job(cluster, job, configmap, pvc)
    deadline = time.monotonic() + 600
    while "step " not in _logs(names["Master"]):  # training runs on both ranks
        assert time.monotonic() < deadline, _logs(names["Master"])[-3000:]
        state = podman("inspect", "--format", "{{.State.Status}}", names["Master"]).stdout.strip()
        assert state == "running", _logs(names["Master"])[-3000:]
        time.sleep(1)
    out = next(pvc.glob("outputs/*"))
    while not any((d / "COMPLETE").exists() for d in (out / "checkpoints").glob("step_*")):
        assert time.monotonic() < deadline, _logs(names["Master"])[-3000:]
        time.sleep(1)
    for name in names.values():  # eviction: the kubelet sends SIGTERM to each container's PID 1
        podman("kill", "--signal", "TERM", name)
    codes = {rtype: _wait_exit(name, timeout=300) for rtype, name in names.items()}
    assert codes == {"Master": 143, "Worker": 143}, {r: _logs(n)[-2000:] for r, n in names.items()}
    saved = sorted(int(d.name.split("_")[1]) for d in (out / "checkpoints").glob("step_*") if (d / "COMPLETE").exists())
    assert saved and saved[-1] < MAX_STEPS

    # ExitCode restart policy: 143 is retried; the operator recreates the pods with the same spec.
    cluster.down()
    names = _start_job(cluster, job, configmap, pvc)
    codes = {rtype: _wait_exit(name) for rtype, name in names.items()}
    master = _logs(names["Master"])
    assert codes == {"Master": 0, "Worker": 0}, master[-3000:]
    assert f"resumed from step_{saved[-1]}" in master, master[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["global_step"] == MAX_STEPS
