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
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama_train.k8s.launch",
            "--nproc-per-node",
            "1",
            "--monitor-interval",
            "0.1",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == code, proc.stderr[-2000:]


def test_launcher_sigterm_exits_143(tmp_path):
    pytest.importorskip("torch")
    script = tmp_path / "rank.py"
    ready = tmp_path / "ready"
    script.write_text(
        "import signal, sys, time, pathlib\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))  # a trainer saving then exiting\n"
        f"pathlib.Path({str(ready)!r}).write_text('1')\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_train.k8s.launch",
            "--nproc-per-node",
            "1",
            "--monitor-interval",
            "0.1",
            str(script),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()


def _two_ranks(tmp_path, rank0: str, rank1: str) -> int:
    """Run a 2-rank launch whose ranks run the given bodies; the agent polls every 2 s, so
    failures close together are seen in one pass and get the same (whole-second) timestamp."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, pathlib, signal, sys, time\n"
        f"flag = pathlib.Path({str(tmp_path / 'peer_died')!r})\n"
        "if os.environ['RANK'] == '0':\n"
        + "".join(f"    {line}\n" for line in rank0.splitlines())
        + "else:\n"
        + "".join(f"    {line}\n" for line in rank1.splitlines())
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "llama_train.k8s.launch",
            "--nproc-per-node",
            "2",
            "--monitor-interval",
            "2",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode


# rank 1 is SIGKILLed (an OOM kill); rank 0 notices its peer is gone a moment later
KILLED_RANK1 = "flag.write_text('1')\nos.kill(os.getpid(), signal.SIGKILL)"
WAIT_FOR_PEER = "while not flag.exists():\n    time.sleep(0.05)\ntime.sleep(0.2)\n"


@pytest.mark.parametrize("rank0_then", ["sys.exit(130)", "os.abort()"], ids=["peer-exits-130", "peer-teardown-aborts"])
def test_launcher_reports_the_killed_rank_not_the_peer_that_failed_after_it(tmp_path, rank0_then):
    """The root cause of a 2-rank failure is the rank SIGKILLed first (137, retried by ExitCode),
    not rank 0, which failed because of it (torch's first failure is rank 0: same second, lower
    rank). Without `root_cause` this launch exits 130 or 134."""
    pytest.importorskip("torch")
    assert _two_ranks(tmp_path, WAIT_FOR_PEER + rank0_then, KILLED_RANK1) == 137


def test_launcher_ignores_the_exit_codes_of_ranks_it_ended_itself(tmp_path):
    """Rank 1 hangs; rank 0 gives up (130, as at parallel.timeout_s); torchrun then ends rank 1,
    whose exit code (1 here, from its SIGTERM handler) it records as a failure as well. The job
    failed with 130 (infrastructure), not with the code of the rank the agent ended."""
    pytest.importorskip("torch")
    hang = "signal.signal(signal.SIGTERM, lambda *a: os._exit(1))\nflag.write_text('1')\nwhile True:\n    time.sleep(1)"
    assert _two_ranks(tmp_path, WAIT_FOR_PEER + "sys.exit(130)", hang) == 130


def test_launcher_reports_a_consequential_exit_when_it_is_the_only_failure(tmp_path):
    pytest.importorskip("torch")
    assert _two_ranks(tmp_path, "sys.exit(130)", "sys.exit(0)") == 130


def test_root_cause_order():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from llama_train.k8s.launch import root_cause

    def failure(rank, code, ts):
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="<N/A>")
        f.timestamp = ts
        return f

    same_second = {0: failure(0, 130, 5), 1: failure(1, -9, 5)}
    assert root_cause(same_second)[0] == 1
    assert root_cause({0: failure(0, -6, 5), 1: failure(1, 1, 6)})[0] == 1  # later, but not a consequence
    assert root_cause({0: failure(0, 2, 6), 1: failure(1, -9, 5)})[0] == 1  # both real: the earliest
    assert root_cause({0: failure(0, 130, 5), 1: failure(1, 130, 5)})[0] == 0  # all consequential: lowest rank
