"""`llama-train serve` vs `transformers serve` on the same real model, prompts and clients.

    python scripts/bench_serve_compare.py --rounds 2 --requests 16 --max-tokens 32 --out bench_serve_compare.json

Both servers run the same local SmolLM2-135M-Instruct directory (the catalogue's, fetched on first
use), one at a time on a free 127.0.0.1 port with the same torch threads; the order alternates per
round (round 0: llama_train first, round 1: transformers first, ...), so both see the machine in the
same states. Per server and round:

- throughput: `--requests` greedy chat requests at each of `--concurrency` (default 1, 4, 16)
  concurrent clients; requests/s and generated tokens/s (from each answer's
  `usage.completion_tokens`), p50/p95 latency;
- time to first token of short streamed prompts while `--long-clients` long prompts (~1,500
  tokens each) are being served: the interference of prefill with decoding.

Prints the per-round tables and the llama_train / transformers ratios of each round (the runs
compared within a round saw the same machine state). transformers serve is started with its
defaults (`transformers serve MODEL_DIR`: the model preloaded, no continuous batching) unless
`--hf-continuous-batching` is given.
"""

from __future__ import annotations

import argparse
import json
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench_serve import quantiles, run_clients  # noqa: E402  (scripts/, next to this file)

KEY = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, kind: str, model_dir: Path, log_dir: Path, args):
        self.kind, self.port = kind, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "LLAMA_TRAIN_API_KEY": KEY,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        if kind == "llama_train":
            argv = [
                sys.executable,
                "-m",
                "llama_train.serve",
                "--base",
                str(model_dir),
                "--served-model-name",
                "smollm2",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--max-concurrency",
                "64",
                "--max-batch-size",
                "32",
                "--log-level",
                "WARNING",
            ]
            self.model, ready = "smollm2", "/ready"
        else:
            argv = [
                "transformers",
                "serve",
                str(model_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *(["--continuous-batching"] if args.hf_continuous_batching else []),
            ]
            self.model, ready = str(model_dir), "/health"
        self.log_path = log_dir / f"{kind}-{self.port}.log"
        self.proc = subprocess.Popen(argv, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{kind} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + ready, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        sys.exit(f"{kind} not ready in 300 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def body(self, content: str, max_tokens: int, stream: bool = False) -> dict:
        return {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
            "messages": [{"role": "user", "content": content}],
        }


def throughput(server: Server, concurrency: int, num_requests: int, max_tokens: int) -> dict:
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()
    counter = iter(range(num_requests))

    def client():
        with httpx.Client(timeout=600, headers={"authorization": f"Bearer {KEY}"}) as http:
            while (i := next(counter, None)) is not None:
                prompt = f"Request {i}: write a short story about the number {i}, in five sentences."
                t0 = time.perf_counter()
                r = http.post(f"{server.url}/v1/chat/completions", json=server.body(prompt, max_tokens))
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        tokens.append(r.json()["usage"]["completion_tokens"])
                    else:
                        errors.append(f"{r.status_code} {r.text[:200]}")

    wall = run_clients(client, concurrency)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "rps": len(latencies) / wall,
        "tok_s": sum(tokens) / wall,
        "tokens": sum(tokens),
        **quantiles(latencies),
    }


def first_token_seconds(http: httpx.Client, server: Server, content: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    with http.stream(
        "POST", f"{server.url}/v1/chat/completions", json=server.body(content, max_tokens, stream=True)
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                choices = json.loads(line[5:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    return time.perf_counter() - t0
    return float("nan")


def ttft_under_long_prompts(server: Server, long_clients: int, probes: int) -> dict:
    """Median time to first token of short prompts sent while long prompts are served."""
    long_text = "Summarize the following log. " + " ".join(
        f"line {i}: the job step {i} finished ok." for i in range(150)
    )  # ~1,500 tokens
    done = threading.Event()

    def long_client():
        with httpx.Client(timeout=600, headers={"authorization": f"Bearer {KEY}"}) as http:
            while not done.is_set():
                http.post(f"{server.url}/v1/chat/completions", json=server.body(long_text, 16))

    threads = [threading.Thread(target=long_client) for _ in range(long_clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    with httpx.Client(timeout=600, headers={"authorization": f"Bearer {KEY}"}) as http:
        ttfts = [first_token_seconds(http, server, f"Say hello number {i}.", 8) for i in range(probes)]
    done.set()
    for t in threads:
        t.join()
    with httpx.Client(timeout=600, headers={"authorization": f"Bearer {KEY}"}) as http:
        alone = statistics.median(first_token_seconds(http, server, f"Say hello number {i}.", 8) for i in range(3))
    return {"ttft_short_under_long": statistics.median(ttfts), "ttft_short_alone": alone}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--long-clients", type=int, default=2)
    ap.add_argument("--probes", type=int, default=5)
    ap.add_argument("--hf-continuous-batching", action="store_true")
    ap.add_argument("--frameworks", default="llama_train,transformers")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from llama_train.models.catalogue import pull

    model_dir = pull(args.model, log=lambda m: print(m, file=sys.stderr))
    kinds = args.frameworks.split(",")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_serve_compare_") as tmp:
        for rnd in range(args.rounds):
            order = kinds if rnd % 2 == 0 else kinds[::-1]
            for kind in order:
                load_before = os.getloadavg()[0]
                server = Server(kind, model_dir, Path(tmp), args)
                try:
                    throughput(server, 2, 2, 4)  # warm-up
                    levels = [throughput(server, c, args.requests, args.max_tokens) for c in args.concurrency]
                    ttft = ttft_under_long_prompts(server, args.long_clients, args.probes)
                finally:
                    server.stop()
                row = {
                    "round": rnd,
                    "framework": kind,
                    "levels": levels,
                    **ttft,
                    "load_before": load_before,
                    "load_after": os.getloadavg()[0],
                }
                results.append(row)
                print(json.dumps(row), file=sys.stderr)
    import torch

    print(
        f"\n{args.model}, {args.requests} greedy chat requests per level, max_tokens {args.max_tokens}; "
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}\n"
    )
    print(
        "| round | framework | "
        + " | ".join(f"req/s @{c} | tok/s @{c} | p95 s @{c}" for c in args.concurrency)
        + " | TTFT short alone s | TTFT short under long prompts s | errors | load before/after |"
    )
    print("|---:|---|" + "---:|" * (3 * len(args.concurrency) + 4))
    for r in results:
        cells = " | ".join(f"{lv['rps']:.2f} | {lv['tok_s']:.1f} | {lv['p95']:.2f}" for lv in r["levels"])
        errors = sum(lv["errors"] for lv in r["levels"])
        print(
            f"| {r['round']} | {r['framework']} | {cells} | {r['ttft_short_alone']:.2f} | "
            f"{r['ttft_short_under_long']:.2f} | {errors} | {r['load_before']:.2f} / {r['load_after']:.2f} |"
        )
    if set(kinds) == {"llama_train", "transformers"}:
        print(
            "\n| round | "
            + " | ".join(f"tok/s ratio @{c}" for c in args.concurrency)
            + " | TTFT under long prompts ratio (transformers / llama_train) |"
        )
        print("|---:|" + "---:|" * (len(args.concurrency) + 1))
        for rnd in range(args.rounds):
            a = next(r for r in results if r["round"] == rnd and r["framework"] == "llama_train")
            b = next(r for r in results if r["round"] == rnd and r["framework"] == "transformers")
            ratios = " | ".join(
                f"{x['tok_s'] / y['tok_s']:.2f}x" if y["tok_s"] else "n/a" for x, y in zip(a["levels"], b["levels"])
            )
            print(f"| {rnd} | {ratios} | {b['ttft_short_under_long'] / a['ttft_short_under_long']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
