"""Podman for the system tier: the configuration scripts/podman_base.sh writes (runtime runc,
explicit ulimits, layers under ~/.cache/llama_train/containers), the images scripts/build_images.sh
builds, and a few helpers. Tests skip, naming the component, only when podman cannot run here."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LLAMA_TRAIN_CACHE", Path.home() / ".cache" / "llama_train")) / "containers"
TAG = os.environ.get("LLAMA_TRAIN_IMAGE_TAG", "0.1.0")
IMAGES = {"trainer": f"localhost/llama-train-trainer:{TAG}", "server": f"localhost/llama-train-server:{TAG}"}
INSTALL_HINT = "bash scripts/ci_system_deps.sh installs it (root and apt-get needed)"


def env() -> dict[str, str]:
    return {
        **os.environ,
        "CONTAINERS_CONF": str(CACHE / "containers.conf"),
        "CONTAINERS_STORAGE_CONF": str(CACHE / "storage.conf"),
    }


def require_tools() -> None:
    for tool in ("podman", "runc", "mmdebstrap", "catatonit"):  # catatonit: the pods' pause image
        if shutil.which(tool) is None and not Path("/usr/libexec/podman", tool).exists():
            pytest.skip(f"{tool} is not installed; {INSTALL_HINT}")
    if os.geteuid() != 0:
        pytest.skip("the system tier runs rootful podman (runc; rootless needs subuid maps): run it as root")


def podman(*args: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], env=env(), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def require_runtime(log: Path) -> None:
    """The base image (scripts/podman_base.sh; a failure there is ours and fails the test), then a
    trivial container: where the machine cannot start one at all (an unprivileged container as CI
    runner: no mounts, no cgroups), skip and quote podman."""
    with log.open("w") as f:
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "podman_base.sh")],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=1800,
            cwd=ROOT,
        )
    assert proc.returncode == 0, f"scripts/podman_base.sh exited {proc.returncode}:\n{log.read_text()[-5000:]}"
    base = os.environ.get("LLAMA_TRAIN_BASE_IMAGE", "localhost/debian-py311:bookworm")
    probe = podman("run", "--rm", "--network", "none", base, "true", check=False, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"podman (runc) cannot start a container on this machine: {probe.stderr.strip()[-500:]}")


def build_images(log: Path) -> dict[str, str]:
    """Both images (cached layers make this seconds when nothing changed)."""
    with log.open("w") as f:
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "build_images.sh")],
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=3600,
            cwd=ROOT,
        )
    assert proc.returncode == 0, f"scripts/build_images.sh exited {proc.returncode}:\n{log.read_text()[-5000:]}"
    return dict(IMAGES)


def wait_ready(url: str, *, alive, log, timeout: float = 240) -> None:
    """Poll GET url until 200; `alive()` false or the deadline fails with `log()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert alive(), f"the server exited before it was ready:\n{log()[-4000:]}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} not ready after {timeout} s:\n{log()[-4000:]}")


def task_prompts(num: int) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of the quickstart's held-out eval split (recipes/quickstart.yaml)."""
    from llama_train.data.builtin import generate_splits

    _, rows = generate_splits(num_train=1, num_eval=num, seed=0)  # data.builtin.seed's default
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]


def exact_matches(client, model: str, prompts: list[tuple[str, str]]) -> int:
    """Greedy answers of `model` equal to the reference answer."""
    correct = 0
    for prompt, answer in prompts:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=16, temperature=0
        )
        assert r.model == model and r.choices[0].finish_reason in ("stop", "length")
        correct += r.choices[0].message.content.strip() == answer
    return correct


def readable(path: Path) -> None:
    """Files written by root on the host, read by UID 1000 in a container."""
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | (0o555 if p.is_dir() else 0o444))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
