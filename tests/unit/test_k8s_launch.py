"""`python -m llama_train.k8s.launch` is torchrun that keeps exit codes: plain torchrun exits 1 for
any failure, so `restartPolicy: ExitCode` would never retry a preempted (143) pod."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest


def test_exit_code_mapping():
    from llama_train.k8s.launch import exit_code_of_failure

    assert exit_code_of_failure(2) == 2
    assert exit_code_of_failure(143) == 143
    assert exit_code_of_failure(-9) == 137  # a rank killed by SIGKILL (OOM killer)


def test_launcher_propagates_rank_exit_code(tmp_path):
    code = 2  # bad input: must stay 1-127 so ExitCode does not retry it
    pytest.importorskip("torch")
    script = tmp_path / "rank.py"
    script.write_text(f"import sys\nsys.exit({code})\n")
    proc = subprocess.run([sys.executable, "-m", "llama_train.k8s.launch", "--nproc-per-node", "1",
                           "--monitor-interval", "0.1", str(script)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]


def test_launcher_sigterm_exits_143(tmp_path):
    pytest.importorskip("torch")
    script = tmp_path / "rank.py"
    ready = tmp_path / "ready"
    script.write_text(
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # a trainer saving then exiting\n"
        f"pathlib.Path({str(ready)!r}).write_text('1')\n"
        "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-m", "llama_train.k8s.launch", "--nproc-per-node", "1",
                           "--monitor-interval", "0.1", str(script)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
