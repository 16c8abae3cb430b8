"""Shutdown of the serving engine and of `llama-train serve` (issue 17): the engine's worker
thread is joined on stop (a torch-calling thread alive at interpreter exit aborts the process,
exit -6), and SIGTERM drains in-flight requests and exits 0 (every Kubernetes rollout sends it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import BASE_NAME, start_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CYCLES = 25

# Each cycle: load, start a long generation, stop while it runs (the worker is inside torch),
# check the thread is gone and the request was told. The process then exits right after a stop,
# as scripts/gpu_serve_check.py does.
CYCLE_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from llama_train.serve.engine import Engine, GenRequest, SamplingParams, ShuttingDown

    base, cycles = sys.argv[1], int(sys.argv[2])

    async def cycle(i):
        engine = Engine(base, served_model_name="tiny", batch_wait_ms=0)
        engine.start()
        assert await asyncio.to_thread(engine.ready.wait, 120), "model did not load"
        loop = asyncio.get_running_loop()
        gens = [GenRequest([1, 5 + i, 7, 9 + k], SamplingParams(max_tokens=900, temperature=0.7 * k,
                           ignore_eos=True), "tiny", None, loop) for k in range(3)]
        for gen in gens:
            engine.submit(gen)
        first = await asyncio.wait_for(gens[0].events.get(), 60)
        assert first.error is None and first.deltas, first
        engine.stop()
        assert not engine._thread.is_alive(), f"cycle {i}: the worker thread is still alive after stop()"
        for gen in gens:  # every request ends: finished, or told the server is shutting down
            while True:
                ev = await asyncio.wait_for(gen.events.get(), 10)
                if ev.error is not None:
                    assert isinstance(ev.error, ShuttingDown), ev.error
                    break
                if ev.deltas and ev.deltas[-1][2] is not None:
                    break

    async def main():
        for i in range(cycles):
            await cycle(i)
        print("cycles ok", flush=True)

    asyncio.run(main())
""")


def test_engine_start_stop_cycles_join_the_worker_and_exit_cleanly(tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CYCLE_SCRIPT, str(tiny_model_dir), str(CYCLES)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and "cycles ok" in proc.stdout, (
        f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


def test_sigterm_under_load_drains_in_flight_requests_and_exits_0(tiny_model_dir, tmp_path):
    server = start_server(
        [
            "--base",
            str(tiny_model_dir),
            "--served-model-name",
            BASE_NAME,
            "--max-concurrency",
            "16",
            "--drain-timeout-s",
            "60",
        ],
        tmp_path,
    )
    headers = {"authorization": f"Bearer {server.api_key}"}
    body = {"model": BASE_NAME, "prompt": "The quick brown", "max_tokens": 150, "temperature": 0, "ignore_eos": True}
    results: dict[int, object] = {}
    started = threading.Barrier(7)

    def non_stream(i):
        started.wait()
        try:
            r = httpx.post(f"{server.v1}/completions", json=body, headers=headers, timeout=120)
            results[i] = (r.status_code, r.json()["usage"]["completion_tokens"])
        except Exception as exc:  # noqa: BLE001  (asserted below)
            results[i] = exc

    def stream(i):
        started.wait()
        try:
            with httpx.stream(
                "POST", f"{server.v1}/completions", json={**body, "stream": True}, headers=headers, timeout=120
            ) as r:
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            results[i] = (r.status_code, lines[-1])
        except Exception as exc:  # noqa: BLE001
            results[i] = exc

    threads = [threading.Thread(target=non_stream if i % 2 else stream, args=(i,)) for i in range(6)]
    try:
        for t in threads:
            t.start()
        started.wait()
        deadline = time.monotonic() + 60  # all six in flight before the signal
        while "llama_train_inflight_requests 6.0" not in server.metrics():
            assert time.monotonic() < deadline, server.metrics()
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=120)
        for t in threads:
            t.join(timeout=120)
    finally:
        server.stop()
    assert code == 0, f"exit {code}:\n{server.log()[-3000:]}"
    for i in range(6):
        if i % 2:
            assert results[i] == (200, 150), results[i]
        else:
            assert results[i] == (200, "data: [DONE]"), results[i]
    assert "Traceback" not in server.log(), server.log()[-3000:]
