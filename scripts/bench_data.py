"""Preprocessing throughput and packing efficiency: llama_train's pipeline vs TRL's SFTTrainer
dataset preparation (tokenize + BFD packing) on the same rows and tokenizer.

    python scripts/bench_data.py --rows 10000 --num-proc 2 --seq-len 2048

Rows are prompt/completion pairs whose token lengths follow a lognormal distribution (mean ~200
tokens). Both sides train on the completion only and pack into seq_len rows; efficiency is
non-pad tokens / (rows x seq_len). Results print as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "you",
    "are",
    "a",
    "helpful",
    "assistant",
    "answer",
    "with",
    "result",
    "only",
]


def make_rows(n: int, *, seed: int, tokens_per_word: float) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        total = max(8, min(1900, int(rng.lognormvariate(5.3 - 0.5, 1.0))))  # exp(4.8+0.5) ~ 200 tokens
        words = max(2, int(total / tokens_per_word))
        cut = max(1, int(words * rng.uniform(0.3, 0.8)))
        text = [rng.choice(WORDS) for _ in range(words)]
        rows.append({"id": f"r{i}", "prompt": " ".join(text[:cut]), "completion": " ".join(text[cut:])})
    return rows


def bench_ours(rows, model_dir: Path, tok, args, tmp: Path) -> dict:
    from llama_train.config import recipe_from_dict
    from llama_train.data.pipeline import prepare

    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = recipe_from_dict(
        {
            "output_dir": str(tmp / "run"),
            "model": {"source": "tiny", "path": str(model_dir)},
            "train": {"max_steps": 1},
            "tracking": {"enabled": False},
            "data": {
                "sources": [{"path": str(path), "format": "completion"}],
                "seq_len": args.seq_len,
                "packing": True,
                "overlength": "truncate",
                "num_proc": args.num_proc,
                "cache": False,
            },
        }
    )
    t0 = time.perf_counter()
    out = prepare(recipe, tok)
    dt = time.perf_counter() - t0
    lens = [len(x) for x in out.train["input_ids"]]
    return {
        "seconds": dt,
        "tokens": sum(lens),
        "packed_rows": len(lens),
        "efficiency": sum(lens) / (len(lens) * args.seq_len),
    }


def bench_trl(rows, model_dir: Path, tok, args, tmp: Path) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    ds = datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "completion": [{"role": "assistant", "content": r["completion"]}],
            }
            for r in rows
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = SFTConfig(
        output_dir=str(tmp / "trl"),
        max_length=args.seq_len,
        packing=True,
        packing_strategy="bfd",
        dataset_num_proc=args.num_proc,
        completion_only_loss=True,
        report_to=[],
        use_cpu=True,
    )
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    dt = time.perf_counter() - t0
    lens = [len(x) for x in trainer.train_dataset["input_ids"]]
    return {
        "seconds": dt,
        "tokens": sum(lens),
        "packed_rows": len(lens),
        "efficiency": sum(lens) / (len(lens) * args.seq_len),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import trl
    from transformers import AutoTokenizer

    from llama_train.tiny import build_tiny

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = build_tiny(tmp / "model", seed=0)
        tok = AutoTokenizer.from_pretrained(model_dir)
        probe = make_rows(200, seed=args.seed + 1, tokens_per_word=1.0)
        tpw = sum(len(tok(r["prompt"] + " " + r["completion"]).input_ids) for r in probe) / sum(
            len((r["prompt"] + " " + r["completion"]).split()) for r in probe
        )
        rows = make_rows(args.rows, seed=args.seed, tokens_per_word=tpw)
        results = {
            "llama_train": bench_ours(rows, model_dir, tok, args, tmp),
            f"trl {trl.__version__}": bench_trl(rows, model_dir, tok, args, tmp),
        }
    print(f"{args.rows} rows, seq_len {args.seq_len}, num_proc {args.num_proc}, tiny Llama tokenizer\n")
    print("| pipeline | seconds | rows/s | tokens/s | packed rows | tokens | packing efficiency |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['seconds']:.1f} | {args.rows / r['seconds']:,.0f} | {r['tokens'] / r['seconds']:,.0f} "
            f"| {r['packed_rows']} | {r['tokens']:,} | {r['efficiency']:.4f} |"
        )


if __name__ == "__main__":
    main()
