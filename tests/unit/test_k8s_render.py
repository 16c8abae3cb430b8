"""Rendering PyTorchJob / TrainJob from a recipe: upstream CRD schemas, webhook rules, core Pod
validation (kubernetes-validate strict), restricted security fields, golden files, bad input.

Golden files: UPDATE_GOLDEN=1 pytest tests/unit/test_k8s_render.py rewrites tests/unit/golden/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from llama_train.config import recipe_from_dict
from llama_train.errors import RecipeError
from llama_train.k8s import validate as v
from llama_train.k8s.render import render_manifests, render_pytorchjob, render_trainjob, to_yaml

GOLDEN = Path(__file__).parent / "golden"
IMAGE = "ghcr.io/example/llama-train-trainer:0.1.0"
SCHEMAS = v.schemas_dir()
needs_schemas = pytest.mark.skipif(
    SCHEMAS is None, reason="../shared/k8s-schemas not found (set LLAMA_TRAIN_K8S_SCHEMAS)"
)


def recipe(**k8s):
    # ddp: render runs the world-size preflight, and `single` cannot run on several ranks
    return recipe_from_dict(
        {
            "output_dir": "outputs/demo",
            "train": {"max_steps": 5},
            "parallel": {"strategy": "ddp"},
            "k8s": {"image": IMAGE, **k8s},
        }
    )


# name -> (k8s section, render flags)
SHAPES = {
    "pytorchjob_cpu_1node": ({}, {"kind": "pytorchjob"}),
    "pytorchjob_gpu_2x8": (
        {"gpu_product": "NVIDIA-H100-80GB-HBM3", "hf_token_secret": "hf-token", "priority_class": "training"},
        {"kind": "pytorchjob", "nodes": 2, "gpus_per_node": 8, "queue": "team-a"},
    ),
    "pytorchjob_elastic": ({"min_nodes": 1, "max_nodes": 4, "nproc_per_node": 2}, {"kind": "pytorchjob", "nodes": 2}),
    "trainjob_cpu_1node": ({}, {"kind": "trainjob"}),
    "trainjob_gpu_2x8": (
        {"hf_token_secret": "hf-token"},
        {"kind": "trainjob", "nodes": 2, "gpus_per_node": 8, "queue": "team-a"},
    ),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def shape(request):
    k8s, flags = SHAPES[request.param]
    return request.param, render_manifests(recipe(**k8s), **flags)


def test_golden(shape):
    name, objects = shape
    text = to_yaml(objects)
    path = GOLDEN / f"{name}.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing {path}; run UPDATE_GOLDEN=1 pytest {__file__}"
    assert text == path.read_text(), f"{path} is stale; review and run UPDATE_GOLDEN=1"


@needs_schemas
def test_validates_against_crd_schema(shape):
    _, objects = shape
    assert v.crd_errors(objects[-1], SCHEMAS) == []


def test_webhook_rules_pass(shape):
    _, objects = shape
    assert [e for o in objects for e in v.webhook_errors(o)] == []


def test_pods_are_valid_core_pods_and_restricted(shape):
    _, objects = shape
    templates = v.pod_templates(objects[-1])
    assert templates
    for where, template in templates:
        assert v.pod_errors(template) == [], where
        assert v.restricted_errors(template) == [], where
    assert v.resource_errors(objects[0]) == []  # the ConfigMap


def test_pytorchjob_topology_and_contract():
    job = render_pytorchjob(
        recipe(gpu_product="NVIDIA-H100-80GB-HBM3", hf_token_secret="hf"), nodes=3, gpus_per_node=8, queue="q"
    )
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
    for spec in specs.values():
        assert spec["restartPolicy"] == "ExitCode"
        pod = spec["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch"
        assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
        # torchrun (via the exit-code keeping launcher) runs the module; no PET_* set by us.
        assert c["command"][:5] == ["python", "-m", "llama_train.k8s.launch", "-m", "llama_train.train"]
        assert c["command"][5:] == [
            "/etc/llama-train/recipe.yaml",
            "output_dir=/mnt/llama-train/outputs/llama-train-demo",
        ]
        env = {e["name"]: e for e in c["env"]}
        assert not [n for n in env if n.startswith("PET_") or n in ("RANK", "WORLD_SIZE")]
        assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}}
        assert {"MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"} <= set(env)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        vols = {x["name"]: x for x in pod["volumes"]}
        assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
        assert vols["data"]["persistentVolumeClaim"]["claimName"] == "llama-train-data"
        assert vols["recipe"]["configMap"]["name"] == "llama-train-demo-recipe"
        assert pod["initContainers"][0]["command"][:2] == ["llama-train", "preprocess"]
    assert job["spec"]["runPolicy"]["backoffLimit"] == 3


def test_plain_torchrun_when_launcher_disabled_and_cpu_nproc():
    job = render_pytorchjob(recipe(exit_code_launcher=False, nproc_per_node=2, preprocess=False))
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["containers"][0]["command"][:3] == ["torchrun", "-m", "llama_train.train"]
    assert "initContainers" not in pod and "tolerations" not in pod
    assert job["spec"]["nprocPerNode"] == "2"
    assert "Worker" not in job["spec"]["pytorchReplicaSpecs"]


def test_elastic_is_worker_only_with_c10d():
    job = render_pytorchjob(recipe(min_nodes=1, max_nodes=4), nodes=2)
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
    assert job["spec"]["elasticPolicy"]["minReplicas"] == 1
    assert job["spec"]["elasticPolicy"]["maxReplicas"] == 4
    assert "nProcPerNode" not in job["spec"]["elasticPolicy"]


def test_trainjob_shape():
    job = render_trainjob(recipe(hf_token_secret="hf"), nodes=2, gpus_per_node=4)
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    assert spec["trainer"]["numNodes"] == 2 and spec["trainer"]["numProcPerNode"] == 4
    assert spec["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    assert "exec python -m llama_train.k8s.launch -m llama_train.train" in spec["trainer"]["command"][2]
    names = {e["name"] for e in spec["trainer"]["env"]}
    assert not names & set(v.PET_OWNED)
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == "node"
    assert pod["template"]["spec"]["template"]["spec"]["containers"][0]["name"] == "node"


def test_create_pvc_adds_rwx_claim_for_multinode():
    objects = render_manifests(recipe(create_pvc=True, storage_class="standard-rwx"), nodes=2)
    assert [o["kind"] for o in objects] == ["ConfigMap", "PersistentVolumeClaim", "PyTorchJob"]
    assert objects[1]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert v.resource_errors(objects[1]) == []


# --- the checks themselves catch broken objects


def test_webhook_rules_catch_violations():
    job = render_pytorchjob(recipe(), nodes=2)
    job["metadata"]["name"] = "9bad"
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    job["spec"]["pytorchReplicaSpecs"]["Chief"] = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "main"
    job["spec"]["elasticPolicy"] = {"nProcPerNode": 2}
    errors = "\n".join(v.webhook_errors(job))
    for needle in ("DNS-1035", "Master.replicas must be 1", "Chief: replica type", "named `pytorch`", "both be set"):
        assert needle in errors
    tj = render_trainjob(recipe())
    tj["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "2"})
    assert "PET_NNODES" in "\n".join(v.webhook_errors(tj))


def test_pod_and_security_checks_catch_violations():
    template = render_pytorchjob(recipe())["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    template["spec"]["containers"][0]["imagePullPolcy"] = "Always"  # misspelt: strict catches it
    assert v.pod_errors(template)
    del template["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"]
    assert "allowPrivilegeEscalation" in "\n".join(v.restricted_errors(template))


@needs_schemas
def test_crd_schema_catches_wrong_types():
    job = render_pytorchjob(recipe())
    job["spec"]["runPolicy"]["backoffLimit"] = "three"
    assert any("backoffLimit" in e for e in v.crd_errors(job, SCHEMAS))


# --- bad input names the flag / recipe key


@pytest.mark.parametrize(
    "flags, k8s, needle",
    [
        ({"gpus_per_node": -1}, {}, "--gpus-per-node / k8s.gpus_per_node"),
        ({"gpus_per_node": "eight"}, {}, "--gpus-per-node / k8s.gpus_per_node: expected a whole number"),
        ({"gpus_per_node": 64}, {}, "not a known node shape"),
        ({"nodes": 0}, {}, "--nodes / k8s.nodes: must be >= 1"),
        ({"namespace": "Team_A"}, {}, "--namespace / k8s.namespace: 'Team_A' is not a DNS-1123 label"),
        ({"name": "My.Job"}, {}, "k8s.name: 'My.Job' is not a DNS-1035 label"),
        ({"name": "a" * 60}, {}, "at most"),
        ({"image": ""}, {}, "k8s.image is not set: pass --image"),
        ({"kind": "mpijob"}, {}, "--kind / k8s.kind"),
        ({"queue": "bad queue"}, {}, "--queue / k8s.queue"),
        ({}, {"env": {"PET_NNODES": "2"}}, "k8s.env: PET_NNODES"),
        ({"gpus_per_node": 8}, {"nproc_per_node": 2}, "k8s.nproc_per_node (2) must equal"),
        ({"kind": "trainjob"}, {"max_nodes": 4}, "need --kind pytorchjob"),
        ({"nodes": 5}, {"min_nodes": 1, "max_nodes": 4}, "k8s.max_nodes (4)"),
        ({}, {"memory": "lots"}, "k8s.memory: 'lots' is not a Kubernetes quantity"),
    ],
)
def test_bad_input_is_a_recipe_error_naming_the_key(flags, k8s, needle):
    with pytest.raises(RecipeError) as err:
        render_manifests(recipe(**k8s), **flags)
    assert needle in str(err.value)
    assert err.value.exit_code == 2


def test_missing_image_in_recipe():
    r = recipe_from_dict({"train": {"max_steps": 5}})
    with pytest.raises(RecipeError, match=r"k8s.image is not set"):
        render_manifests(r)


def test_nccl_without_gpus_is_rejected():
    r = recipe_from_dict({"train": {"max_steps": 5}, "parallel": {"backend": "nccl"}, "k8s": {"image": IMAGE}})
    with pytest.raises(RecipeError, match="parallel.backend is nccl"):
        render_manifests(r)


def test_unknown_recipe_key_in_k8s_section():
    with pytest.raises(RecipeError, match="k8s.gpus"):
        recipe_from_dict({"train": {"max_steps": 5}, "k8s": {"gpus": 8}})


# --- CLI


def test_cli_render_writes_multidoc_yaml(tmp_path):
    from typer.testing import CliRunner

    from llama_train.k8s.cli import app

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "outputs/cli", "train": {"max_steps": 5}}))
    out = tmp_path / "job.yaml"
    result = CliRunner().invoke(
        app,
        [
            "render",
            str(path),
            "train.lr=1e-4",
            "parallel.strategy=ddp",
            "--image",
            IMAGE,
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--queue",
            "q",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob"]
    assert "lr: 0.0001" in docs[0]["data"]["recipe.yaml"]
    assert docs[1]["metadata"]["name"] == "llama-train-cli"

    bad = CliRunner().invoke(app, ["render", str(path), "--image", IMAGE, "--gpus-per-node", "-3"])
    assert isinstance(bad.exception, RecipeError) and "--gpus-per-node" in str(bad.exception)


def test_cli_render_runs_the_world_size_preflight_and_checks_the_output_path(tmp_path):
    """Same refusal (exit 4) as `recipe validate --world-size nodes x procs per node`; -o errors exit 2."""
    from typer.testing import CliRunner

    from llama_train.errors import PreflightError, UsageError
    from llama_train.k8s.cli import app

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "outputs/cli", "train": {"max_steps": 5}}))
    out = tmp_path / "job.yaml"
    for args, needle in [
        (["--nodes", "2"], "needs parallel.strategy ddp"),
        (
            ["--nodes", "2", "--gpus-per-node", "8", "parallel.strategy=ddp", "train.global_batch_size=7"],
            "train.global_batch_size=7",
        ),
    ]:
        res = CliRunner().invoke(app, ["render", str(path), "--image", IMAGE, "-o", str(out), *args])
        assert isinstance(res.exception, PreflightError) and res.exception.exit_code == 4, res.output
        assert needle in str(res.exception) and "--nodes 2" in str(res.exception)
        assert not out.exists()
    res = CliRunner().invoke(app, ["render", str(path), "--image", IMAGE, "-o", str(tmp_path)])
    assert isinstance(res.exception, UsageError) and "is a directory" in str(res.exception)
    nested = tmp_path / "new" / "dir" / "job.yaml"  # parent directories are created
    assert CliRunner().invoke(app, ["render", str(path), "--image", IMAGE, "-o", str(nested)]).exit_code == 0
    assert nested.read_text().startswith("apiVersion")


def test_client_verbs_fail_clearly_without_cluster(monkeypatch, tmp_path):
    from llama_train.k8s import client

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(client.ClusterError, match="no cluster configuration"):
        client.status("x", namespace="llama-train")
    with pytest.raises(RecipeError, match="--kind"):
        client.job_kind("tfjob")


def test_job_state_picks_latest_true_condition():
    from llama_train.k8s.client import job_state

    job = {
        "status": {
            "conditions": [
                {"type": "Created", "status": "True", "lastTransitionTime": "2025-01-01T00:00:00Z"},
                {"type": "Running", "status": "False", "lastTransitionTime": "2025-01-01T00:02:00Z"},
                {"type": "Succeeded", "status": "True", "lastTransitionTime": "2025-01-01T00:03:00Z"},
            ]
        }
    }
    assert job_state(job) == "Succeeded"
    assert job_state({}) == "Pending"
