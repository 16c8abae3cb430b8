"""Peak memory and time of the LM-head loss (forward + backward): naive full logits vs chunked.

    python scripts/bench_loss.py                       # seq 4096 x vocab 128256 x hidden 1024, fp32, CPU
    python scripts/bench_loss.py --hidden 4096 --train-head

Each variant runs in a fresh subprocess; its peak is ru_maxrss (the process high-water mark)
minus the RSS right before the loss, after the inputs were built, so only the loss's own
buffers count. Inputs are generated from the same seed in every subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("naive", "chunked", "chunked_recompute")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(args) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from llama_train.loss import chunked_cross_entropy

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    hidden = (torch.randn(args.seq, args.hidden, dtype=dtype)).requires_grad_()
    weight = torch.empty(args.vocab, args.hidden, dtype=dtype).normal_(std=0.02).requires_grad_(args.train_head)
    labels = torch.randint(0, args.vocab, (args.seq,))
    labels[: args.seq // 8] = -100  # a prompt: no loss there
    before = _rss_bytes()
    t0 = time.perf_counter()
    if args.child == "naive":
        logits = hidden @ weight.T
        loss = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
        del logits
    else:
        loss = chunked_cross_entropy(
            hidden, weight, labels, chunk_size=args.chunk_size, recompute=args.child == "chunked_recompute"
        )
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "variant": args.child,
        "loss": loss.item(),
        "peak_delta_mib": round((peak - before) / 2**20, 1),
        "seconds": round(seconds, 2),
        "grad_hidden_norm": hidden.grad.float().norm().item(),
        "grad_weight_norm": weight.grad.float().norm().item() if args.train_head else None,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=4096, help="tokens")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=1024, help="4096 for Llama-3 8B; 1024 keeps CPU time short")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--train-head", action="store_true", help="also compute the lm_head weight gradient")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch default)")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(_child(args)))
        return 0

    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = []
    for variant in VARIANTS:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *passthrough, "--child", variant],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    naive = results[0]
    print(
        f"\nseq {args.seq} x vocab {args.vocab} x hidden {args.hidden}, {args.dtype}, chunk {args.chunk_size}, "
        f"lm_head {'trained' if args.train_head else 'frozen'}\n"
    )
    print(
        "| variant | peak memory over inputs (MiB) | vs naive | loss (sum) | rel. loss diff | |grad h| rel. diff | time (s) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rel = abs(r["loss"] - naive["loss"]) / abs(naive["loss"])
        grel = abs(r["grad_hidden_norm"] - naive["grad_hidden_norm"]) / naive["grad_hidden_norm"]
        ratio = naive["peak_delta_mib"] / r["peak_delta_mib"]
        print(
            f"| {r['variant']} | {r['peak_delta_mib']:.0f} | {ratio:.1f}x lower | {r['loss']:.4f} | {rel:.1e} | "
            f"{grel:.1e} | {r['seconds']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
