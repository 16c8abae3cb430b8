"""A real `mlflow server` on localhost for integration tests (import the fixture in a test module).

    from mlflow_fixtures import mlflow_server  # noqa: F401  (pytest fixture)

One server per test module (startup takes 10-30 s on 2 CPU cores). `MlflowServer.kill()` and
`.start()` stop and restart it on the same store and port, to test a server that goes away.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a SQLite store in `root`, or, given `command` (argv) and `env`, that
    command, which must serve on `port` (free_port()) of 127.0.0.1."""

    def __init__(
        self, root: Path, *, command: list[str] | None = None, env: dict | None = None, port: int | None = None
    ):
        self.root = root
        self.db = root / "mlflow.db"
        self.artifacts = root / "artifacts"
        self.command, self.extra_env = command, env or {}
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = self.command or [
            shutil.which("mlflow") or "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.db}",
            "--default-artifact-root",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_TRACKING_URI": "", **self.extra_env}
        # Own process group: the server forks uvicorn workers, kill() stops the whole group.
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-3000:]}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"mlflow server not healthy after {STARTUP_TIMEOUT_S} s: {self.log.read_text()[-3000:]}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None
        # The port is free again once nothing answers.
        deadline = time.monotonic() + 10
        while self.healthy() and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    if shutil.which("mlflow") is None:
        pytest.skip("the mlflow CLI is not installed")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
