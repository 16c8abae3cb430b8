"""Pod-level simulation of a 2-node CPU PyTorchJob.

No API server runs here, so each replica's containers are run as local processes with exactly the
environment the Kubeflow training operator injects (../shared/k8s-schemas/pytorchjob_env_contract.json):
MASTER_ADDR/PET_MASTER_ADDR pointing to loopback instead of the master's headless Service, ports,
WORLD_SIZE, RANK = node rank, PET_NODE_RANK, PET_NNODES, PET_NPROC_PER_NODE. The ConfigMap is the
mounted recipe and a temp directory plays the shared PVC. What the test changes, and why, is only
what a cluster resolves: the Service name (→ 127.0.0.1), mount paths (→ temp dirs) and the MLflow
URI (the in-cluster server → a local store).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama_train.config import recipe_from_dict
from llama_train.k8s.render import render_manifests

from ..conftest import tiny_recipe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
RECIPE_MOUNT = "/etc/llama-train"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pods(tmp_path, tiny_dir, *, max_steps: int, every: int = 0):
    spec = tiny_recipe(
        tmp_path,
        tiny_dir,
        train={"max_steps": max_steps, "micro_batch_size": 4},
        parallel={"strategy": "ddp"},
        tracking={"enabled": True, "experiment": "podsim"},
        checkpoint={"save_final": True, "every_n_steps": every},
        k8s={"image": "llama-train:test", "nodes": 2, "gpus_per_node": 0},
    )
    objects = render_manifests(recipe_from_dict(spec), kind="pytorchjob")
    configmap, job = objects[0], objects[-1]
    mount = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["volumeMounts"]
    pvc_path = next(m["mountPath"] for m in mount if m["name"] == "data")
    recipe_dir = tmp_path / "configmap"
    recipe_dir.mkdir()
    for key, text in configmap["data"].items():
        (recipe_dir / key).write_text(text)
    pvc = tmp_path / "pvc"
    pvc.mkdir()
    return job, {RECIPE_MOUNT: str(recipe_dir), pvc_path: str(pvc)}, pvc


def _resolve(value: str, paths: dict[str, str]) -> str:
    for mount, local in paths.items():
        value = value.replace(mount, local)
    return value


def _operator_env(job: dict, replica_type: str, index: int, port: int) -> dict[str, str]:
    """What the training operator injects into container `pytorch` (v1.9 contract file)."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    nproc = job["spec"].get("nprocPerNode", "auto")
    replicas = sum(s["replicas"] for s in specs.values())
    node_rank = 0 if replica_type == "Master" else index + 1
    return {
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_ADDR": "127.0.0.1",  # <job>-master-0 resolves here
        "MASTER_PORT": str(port),
        "PET_MASTER_PORT": str(port),
        "WORLD_SIZE": str(replicas * (int(nproc) if nproc.isdigit() else 1)),
        "RANK": str(node_rank),
        "PET_NODE_RANK": str(node_rank),
        "PET_NPROC_PER_NODE": nproc,
        "PET_NNODES": str(replicas),
    }


def _container_env(container: dict, paths: dict[str, str], tracking_uri: str) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = _resolve(item["value"], paths)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["HOME"] = env.get("HOME", "/tmp")
    return env


def _start(job, paths, port, tracking_uri, logs: Path):
    procs = {}
    for rtype, spec in job["spec"]["pytorchReplicaSpecs"].items():
        pod = spec["template"]["spec"]
        container = next(c for c in pod["containers"] if c["name"] == "pytorch")
        assert container["ports"][0]["name"] == "pytorchjob-port"
        for index in range(spec["replicas"]):
            env = dict(os.environ)
            env.pop("WORLD_SIZE", None)
            env.update(_container_env(container, paths, tracking_uri))
            env.update(_operator_env(job, rtype, index, port))
            env["OMP_NUM_THREADS"] = "1"
            for init in pod.get("initContainers", []):  # e.g. `llama-train preprocess`
                cmd = [_resolve(a, paths) for a in init["command"] + init.get("args", [])]
                res = subprocess.run(_python(cmd), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
                assert res.returncode == 0, f"init container {init['name']} of {rtype}-{index}: {res.stderr[-1500:]}"
            cmd = [_resolve(a, paths) for a in container["command"] + container.get("args", [])]
            log = open(logs / f"{rtype.lower()}-{index}.log", "w")
            procs[f"{rtype.lower()}-{index}"] = (
                subprocess.Popen(
                    _python(cmd), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                ),
                log,
            )
    return procs


def _python(cmd: list[str]) -> list[str]:
    """The image's `python`/`llama-train` are this interpreter's."""
    if cmd[0] == "python":
        return [sys.executable, *cmd[1:]]
    if cmd[0] == "llama-train":
        return [sys.executable, "-m", "llama_train.cli", *cmd[1:]]
    return cmd


def _wait(procs, timeout=600) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    codes = {}
    for name, (p, log) in procs.items():
        codes[name] = p.wait(timeout=max(1, deadline - time.monotonic()))
        log.close()
    return codes


def test_two_node_cpu_pytorchjob_trains_and_only_master_writes(tmp_path, tiny_dir):
    job, paths, pvc = _pods(tmp_path, tiny_dir, max_steps=3)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = _start(job, paths, _free_port(), uri, tmp_path)
    codes = _wait(procs)
    logs = {n: (tmp_path / f"{n}.log").read_text() for n in procs}
    assert codes == {"master-0": 0, "worker-0": 0}, logs
    out = next(pvc.glob("outputs/*"))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["world_size"] == 2 and run["global_step"] == 3
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "llama-train" in logs["master-0"] and "step 3/3" in logs["master-0"]
    assert "step " not in logs["worker-0"]  # only global rank 0 prints progress
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("podsim")
    assert len(client.search_runs([exp.experiment_id])) == 1  # only the master tracks


def test_preempted_pods_exit_143_after_saving_a_checkpoint(tmp_path, tiny_dir):
    job, paths, pvc = _pods(tmp_path, tiny_dir, max_steps=400)
    procs = _start(job, paths, _free_port(), f"sqlite:///{tmp_path}/mlflow.db", tmp_path)
    master_log = tmp_path / "master-0.log"
    deadline = time.monotonic() + 300
    while "step " not in master_log.read_text():  # training has started on both ranks
        assert time.monotonic() < deadline and all(p.poll() is None for p, _ in procs.values()), master_log.read_text()
        time.sleep(0.5)
    for p, _ in procs.values():  # on eviction the kubelet sends SIGTERM to each container's PID 1
        os.kill(p.pid, signal.SIGTERM)
    codes = _wait(procs, timeout=300)
    assert codes == {"master-0": 143, "worker-0": 143}, master_log.read_text()[-3000:]
    out = next(pvc.glob("outputs/*"))
    ckpts = [d for d in (out / "checkpoints").iterdir() if (d / "COMPLETE").exists()]
    assert ckpts, "a checkpoint must be saved before exiting 143"
