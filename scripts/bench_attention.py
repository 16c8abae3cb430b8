"""Per-document attention (the `auto` default) vs sdpa with a block-diagonal mask, on packed rows.

    python scripts/bench_attention.py --rounds 6 --rows 2          # SmolLM2-135M, LoRA r16, CPU

One process, one model (SmolLM2-135M-Instruct from the catalogue, LoRA r16 / alpha 32 on all
projections, float32, training mode); the same packed rows of 1,024 tokens (synthetic documents,
lognormal lengths with median ~230 tokens as in scripts/bench_train.py, each row filled to
exactly 1,024 tokens, the last document cut to fit). Each
round times one forward + backward over the rows with each kernel, the order alternating per round
(A B, B A, ...), so both see the same machine states; the ratio is taken per round and its median
reported. The two kernels' losses are printed too: they must agree (same math).

This isolates what `model.attn_implementation` changes in a training step; scripts/bench_train.py
measures whole runs.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SEQ = 1024


def packed_rows(n_rows: int, vocab: int, seed: int) -> list[dict]:
    """Rows of exactly SEQ tokens; a document that does not fit is cut to the space left."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        ids, lens = [], []
        while len(ids) < SEQ:
            n = min(SEQ - len(ids), max(16, int(rng.lognormvariate(math.log(230), 0.6))))
            ids += [rng.randrange(10, vocab - 10) for _ in range(n)]
            lens.append(n)
        rows.append({"input_ids": ids, "labels": ids[:], "doc_lens": lens})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--rows", type=int, default=2, help="packed rows of 1024 per step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from llama_train import attention
    from llama_train.data.loader import collate
    from llama_train.models.catalogue import pull

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir = pull(args.model, log=lambda m: print(m, file=sys.stderr))
    attention.register()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    model.train()
    rows = packed_rows(args.rows, base.config.vocab_size, args.seed)
    kernels = {"doc_sdpa": attention.resolve("auto") if not torch.cuda.is_available() else "doc_sdpa", "sdpa": "sdpa"}
    batches = {k: collate(rows, pad_id=0, attn_implementation=v) for k, v in kernels.items()}
    tokens = sum(len(r["input_ids"]) for r in rows)

    def step(kernel: str) -> tuple[float, float]:
        base.set_attn_implementation(kernels[kernel])
        batch = {k: v for k, v in batches[kernel].items() if k != "num_tokens"}
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        return time.perf_counter() - t0, loss.item()

    step("doc_sdpa"), step("sdpa")  # warm-up
    results = {k: [] for k in kernels}
    losses = {k: [] for k in kernels}
    ratios = []
    for rnd in range(args.rounds):
        order = list(kernels) if rnd % 2 == 0 else list(kernels)[::-1]
        this = {}
        for k in order:
            dt, loss = step(k)
            results[k].append(dt)
            losses[k].append(loss)
            this[k] = dt
        ratios.append(this["sdpa"] / this["doc_sdpa"])
        print(
            json.dumps({"round": rnd, "order": order, **{f"{k}_s": round(v, 3) for k, v in this.items()}}),
            file=sys.stderr,
        )
    print(
        f"\n{args.model}, LoRA r16 all projections, float32, {args.rows} packed row(s) of {SEQ} "
        f"({tokens} tokens, {sum(len(r['doc_lens']) for r in rows)} documents), forward + backward, "
        f"{args.threads} threads, {args.rounds} alternating rounds\n"
    )
    print("| kernel | median s/step | tokens/s | loss |")
    print("|---|---:|---:|---:|")
    for k in kernels:
        med = statistics.median(results[k])
        print(f"| {k} ({kernels[k]}) | {med:.3f} | {tokens / med:.0f} | {losses[k][0]:.6f} |")
    print(
        f"\nper-round speed-up of doc_sdpa over sdpa: {', '.join(f'{r:.2f}x' for r in ratios)}; "
        f"median {statistics.median(ratios):.2f}x"
    )
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "seconds": results,
                    "losses": losses,
                    "ratios": ratios,
                    "tokens": tokens,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
