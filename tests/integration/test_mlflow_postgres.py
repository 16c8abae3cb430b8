"""MLflow on PostgreSQL as k8s/overlays/mlflow-postgres deploys it (issue 19), for real.

A real PostgreSQL 15 (password authentication over TCP), then the Deployment's own init container
(`mlflow db upgrade`) and server command, read from the rendered manifest with only the host,
port, password and paths substituted, then a 2-rank torchrun run of the tiny model that tracks to
that server and registers its adapter. Checked through the server: params, metrics, the run's
status, the registered version and its alias, the artifacts (downloaded through the server's
--serve-artifacts proxy, byte for byte), in PostgreSQL itself: the rows are there, and a second
replica of the same command serves the same run (what the RollingUpdate Deployment relies on).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.integration.mlflow_fixtures import MlflowServer, free_port
from tests.integration.test_distributed import run_recipe, torchrun

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / "k8s" / "overlays" / "mlflow-postgres"
PASSWORD = "s3cret-only-in-env"  # what the Secret `mlflow-postgres` holds in a cluster
MODEL_NAME = "pg-tiny-lora"


def _pg_bin() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if shutil.which("initdb"):
        candidates.insert(0, str(Path(shutil.which("initdb")).resolve().parent))  # may be a symlink
    tools = ("initdb", "pg_ctl", "createdb")
    return next((Path(c) for c in candidates if all((Path(c) / t).exists() for t in tools)), None)


class Postgres:
    """A throwaway PostgreSQL cluster: superuser `mlflow` with a password, database `mlflow`,
    on 127.0.0.1:<free port>. PostgreSQL refuses to run as root: as root, it runs as `postgres`."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="llama-train-pg-"))  # not under pytest's 0700 tmp
        self.data, self.sock, self.port = self.root / "data", self.root / "sock", free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def run(self, *args: str) -> None:
        proc = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"

    def start(self) -> None:
        self.sock.mkdir()
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_user:
            shutil.chown(self.root, "postgres")
            for p in (self.sock, pwfile):
                shutil.chown(p, "postgres")
        self.run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "mlflow",
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "-E",
            "UTF8",
        )
        self.run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-w",
            "-o",
            f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1",
            "start",
        )
        self.run(str(self.bindir / "createdb"), "-h", str(self.sock), "-p", str(self.port), "-U", "mlflow", "mlflow")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                [*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(self.root, ignore_errors=True)

    def query(self, sql: str) -> list[tuple]:
        import psycopg2

        with (
            psycopg2.connect(
                host="127.0.0.1", port=self.port, user="mlflow", password=PASSWORD, dbname="mlflow"
            ) as conn,
            conn.cursor() as cur,
        ):
            cur.execute(sql)
            return cur.fetchall()


def manifest_commands(pg: Postgres, *, artifacts: Path, port: int) -> tuple[list[str], list[str], dict]:
    """The mlflow Deployment's init container and server argv, and their environment, from the
    rendered overlay: the DB host/port, the Secret's password, the artifact path and the listen
    address substituted; every other argument as the manifest has it."""
    proc = subprocess.run(
        [shutil.which("kubectl") or "kubectl", "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    dep = next(
        o
        for o in yaml.safe_load_all(proc.stdout)
        if o and o["kind"] == "Deployment" and o["metadata"]["name"] == "mlflow"
    )
    pod = dep["spec"]["template"]["spec"]
    (init,), (server,) = pod["initContainers"], pod["containers"]
    env = {}
    for e in server["env"]:
        if "valueFrom" in e:
            assert e["name"] == "PGPASSWORD" and e["valueFrom"]["secretKeyRef"]["name"] == "mlflow-postgres"
            env[e["name"]] = PASSWORD
        else:
            env[e["name"]] = e["value"]
    env.update(MLFLOW_DB_HOST="127.0.0.1", MLFLOW_DB_PORT=str(pg.port))
    env.pop("HOME")  # the pod's writable /tmp; here the test's own HOME

    def expand(arg: str) -> str:  # Kubernetes' $(VAR) expansion from the container's env
        return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)

    substitutions = {
        "--artifacts-destination=/mlflow/artifacts": f"--artifacts-destination={artifacts}",
        "--host=0.0.0.0": "--host=127.0.0.1",
        "--port=5000": f"--port={port}",
    }
    server_args = [substitutions.get(a, a) for a in server["args"]]
    assert not set(substitutions) - set(server["args"]), f"the manifest's args changed: {server['args']}"
    mlflow = shutil.which("mlflow") or "mlflow"
    init_cmd = [mlflow, *init["command"][1:], *map(expand, init["args"])]
    server_cmd = [mlflow, *server["command"][1:], *map(expand, server_args)]
    return init_cmd, server_cmd, env


@pytest.fixture(scope="module")
def postgres():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin; apt-get install postgresql)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        pytest.fail("psycopg2 is missing: pip install -e '.[dev]' (psycopg2-binary)")
    pg = Postgres(bindir)
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="module")
def pg_mlflow(postgres, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_pg")
    port = free_port()
    init_cmd, server_cmd, env = manifest_commands(postgres, artifacts=root / "artifacts", port=port)
    assert server_cmd[2].endswith(f"mlflow@127.0.0.1:{postgres.port}/mlflow"), server_cmd  # the URI, substituted
    proc = subprocess.run(init_cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert proc.returncode == 0, f"init container `{' '.join(init_cmd)}` failed:\n{proc.stderr[-3000:]}"
    server = MlflowServer(root, command=server_cmd, env=env, port=port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
def test_two_rank_run_tracks_and_registers_through_mlflow_on_postgres(pg_mlflow, postgres, tiny_dir, tmp_path):
    from mlflow import MlflowClient

    from llama_train.tracking.registry import download_adapter

    recipe = run_recipe(
        tmp_path,
        tiny_dir,
        parallel={"strategy": "ddp"},
        micro_batch_size=2,
        train={"max_steps": 2},
        tracking={
            "enabled": True,
            "uri": pg_mlflow.uri,
            "experiment": "pg-test",
            "registered_model_name": MODEL_NAME,
            "log_system_metrics": False,
        },
    )
    launch = torchrun(recipe, tmp_path, env={"MLFLOW_TRACKING_URI": ""})
    assert launch.returncode == 0, launch.output[-4000:]
    assert "did not receive everything" not in launch.output

    client = MlflowClient(tracking_uri=pg_mlflow.uri, registry_uri=pg_mlflow.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pg-test").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: clients need no volume
    assert run.data.tags["llama_train.world_size"] == "2"
    assert run.data.params["parallel.world_size"] == "2" and run.data.params["lora.r"] == "8"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]

    version = client.get_model_version_by_alias(MODEL_NAME, "candidate")
    assert version.run_id == run.info.run_id
    adapter = Path(download_adapter(f"models:/{MODEL_NAME}@candidate", uri=pg_mlflow.uri))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (adapter / name).read_bytes() == (launch.out / "adapter" / name).read_bytes(), name
    recipe_copy = Path(client.download_artifacts(run.info.run_id, "recipe.yaml", str(tmp_path / "dl")))
    assert recipe_copy.read_bytes() == (launch.out / "recipe.yaml").read_bytes()
    # the files are under --artifacts-destination, and the tables in PostgreSQL
    assert list((pg_mlflow.root / "artifacts").rglob("adapter_model.safetensors"))
    assert postgres.query("SELECT run_uuid, status FROM runs") == [(run.info.run_id, "FINISHED")]
    assert postgres.query("SELECT name FROM registered_models") == [(MODEL_NAME,)]

    # a second replica (same database, same artifact volume) serves the same run and adapter
    port = free_port()
    _, command, env = manifest_commands(postgres, artifacts=pg_mlflow.root / "artifacts", port=port)
    replica = MlflowServer(tmp_path / "replica2", command=command, env=env, port=port)
    replica.root.mkdir()
    replica.start()
    try:
        client2 = MlflowClient(tracking_uri=replica.uri, registry_uri=replica.uri)
        assert client2.get_run(run.info.run_id).info.status == "FINISHED"
        adapter2 = Path(download_adapter(f"models:/{MODEL_NAME}@candidate", uri=replica.uri))
        assert (adapter2 / "adapter_model.safetensors").read_bytes() == (
            adapter / "adapter_model.safetensors"
        ).read_bytes()
    finally:
        replica.stop()
