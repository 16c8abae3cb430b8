"""Integration fixtures: the tiny model, a LoRA adapter on it, and real server processes.

`tiny_model_dir` / `tiny_adapter_dir` are generic (session scope). `serve_server` starts
`python -m llama_train.serve` (uvicorn) in a subprocess on a free 127.0.0.1 port; the session
`served` server (base + adapter, API key set) is shared by the serving and routing tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

SERVER_START_TIMEOUT_S = 120  # model load on 2 busy CPU cores
API_KEY = "test-key-123"
ADAPTER_NAME = "tiny-lora"
BASE_NAME = "tiny-base"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_dir) -> Path:
    """The session's tiny model (tests/conftest.py `tiny_dir`), under the name these tests use."""
    return tiny_dir


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A rank-8 LoRA on all attention and MLP projections, random (non-zero) B matrices scaled
    up so greedy outputs visibly differ from the base model's."""
    from llama_train.tiny import build_random_lora

    return build_random_lora(tiny_model_dir, tmp_path_factory.mktemp("tiny_adapter") / "adapter", seed=1)


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None
    argv: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, api_key: str | None = None, **kw):
        import openai

        return openai.OpenAI(
            base_url=self.v1,
            api_key=api_key or self.api_key or "none",
            max_retries=0,
            timeout=kw.pop("timeout", 120),
            **kw,
        )

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(
    args: list[str], log_dir: Path, *, api_key: str | None = API_KEY, env: dict | None = None
) -> ServerProcess:
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_TRAIN_")}
    full_env.update(env or {})
    full_env.setdefault("OMP_NUM_THREADS", "1")
    if api_key:
        full_env["LLAMA_TRAIN_API_KEY"] = api_key
    argv = [sys.executable, "-m", "llama_train.serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(proc, port, log_path, api_key, argv)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server not ready after {SERVER_START_TIMEOUT_S} s:\n{server.log()[-4000:]}")


@pytest.fixture(scope="session")
def served(tiny_model_dir, tiny_adapter_dir, tmp_path_factory):
    """Base + adapter, API key required, max 4 generation requests in flight."""
    server = start_server(
        [
            "--base",
            str(tiny_model_dir),
            "--served-model-name",
            BASE_NAME,
            "--adapter",
            f"{ADAPTER_NAME}={tiny_adapter_dir}",
            "--max-concurrency",
            "4",
            "--batch-wait-ms",
            "10",
            "--json-logs",
        ],
        tmp_path_factory.mktemp("server_logs"),
    )
    yield server
    server.stop()
