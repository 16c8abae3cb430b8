"""Serving throughput and latency at 1, 4 and 16 concurrent clients.

    python scripts/bench_serve.py [--requests 32] [--max-tokens 32] [--concurrency 1 4 16]

Builds the tiny model and a LoRA adapter in a temp dir, starts `python -m llama_train.serve`
on 127.0.0.1 (free port), sends a bounded number of chat requests to the adapter at each
concurrency (every request generates exactly --max-tokens tokens: `ignore_eos`), and prints a
markdown table of requests/s, output tokens/s and p50/p95 latency.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_fixtures(root: Path) -> tuple[Path, Path]:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from llama_train.tiny import build_tiny

    base = build_tiny(root / "base", seed=0)
    torch.manual_seed(1)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        peft.LoraConfig(
            r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        ),
    )
    model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def start_server(base: Path, adapter: Path, port: int, log_path: Path, max_batch: int):
    argv = [
        sys.executable,
        "-m",
        "llama_train.serve",
        "--base",
        str(base),
        "--served-model-name",
        "tiny",
        "--adapter",
        f"tiny-lora={adapter}",
        "--port",
        str(port),
        "--max-concurrency",
        "64",
        "--max-batch-size",
        str(max_batch),
        "--log-level",
        "WARNING",
    ]
    env = {**os.environ, "LLAMA_TRAIN_API_KEY": "bench"}
    proc = subprocess.Popen(argv, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit("server did not become ready in 180 s")


def run_level(url: str, concurrency: int, num_requests: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(num_requests))

    def client():
        with httpx.Client(timeout=300, headers={"authorization": "Bearer bench"}) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {
                    "model": "tiny-lora",
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "messages": [{"role": "user", "content": f"Request {i}: add 12 and {i}."}],
                }
                t0 = time.perf_counter()
                r = http.post(f"{url}/v1/chat/completions", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    (latencies.append(dt) if r.status_code == 200 else errors.append(r.text[:200]))

    wall = run_clients(client, concurrency)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "rps": len(latencies) / wall,
        "tok_s": len(latencies) * max_tokens / wall,
        **quantiles(latencies),
    }


def run_clients(client, concurrency: int) -> float:
    """Run `client` in `concurrency` threads until each returns; the wall time in seconds."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def quantiles(latencies: list[float]) -> dict:
    lat = sorted(latencies)
    if not lat:
        return {"p50": float("nan"), "p95": float("nan")}
    return {"p50": statistics.median(lat), "p95": lat[min(len(lat) - 1, max(0, round(0.95 * len(lat)) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32, help="generated tokens per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-batch-size", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        root = Path(tmp)
        base, adapter = build_fixtures(root)
        port = free_port()
        proc = start_server(base, adapter, port, root / "server.log", args.max_batch_size)
        url = f"http://127.0.0.1:{port}"
        try:
            run_level(url, 2, 4, 4)  # warm-up (first-call allocations)
            rows = [run_level(url, c, args.requests, args.max_tokens) for c in args.concurrency]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    import torch

    print(
        f"\nTiny Llama + LoRA adapter (tiny-lora), {args.requests} chat requests per level, "
        f"{args.max_tokens} generated tokens each, greedy; CPU: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}\n"
    )
    print("| concurrent clients | requests/s | output tokens/s | p50 latency (s) | p95 latency (s) | errors |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['rps']:.2f} | {r['tok_s']:.0f} | {r['p50']:.3f} | "
            f"{r['p95']:.3f} | {r['errors']} |"
        )


if __name__ == "__main__":
    main()
