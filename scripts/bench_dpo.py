"""CPU DPO benchmark: llama-train (train.objective: dpo) vs TRL DPOTrainer, supervised tokens/s.

    python scripts/bench_dpo.py --repeats 2 --out bench_dpo.json          # tiny model, ~2 min on 2 idle cores
    python scripts/bench_dpo.py --model smollm2-135m-instruct --pairs 64 --repeats 2   # the real model

The same base model (the tiny Llama, seed 0, or a catalogue model), the same conversational pairs
(`builtin:preferences` of the chosen tasks, written to a jsonl file that both read), the same
LoRA (r 16, alpha 32, dropout 0, q/k/v/o/gate/up/down_proj; the reference is the base with the
adapter disabled in both), beta 0.1, sigmoid loss, AdamW (lr 2e-4, cosine to 0, no warmup, clip
1.0), seed 42, fp32, no activation checkpointing, `--batch` pairs per optimizer step, one epoch.

  llama_train  `python -m llama_train.train RECIPE` in-process; each pair is one row of two
               documents (prompt + chosen, prompt + rejected), unpacked rows padded per micro batch.
  trl          TRL DPOTrainer given the base model and a peft LoraConfig (so it adds a fresh adapter
               and takes the reference with adapters disabled, as llama-train), its
               DataCollatorForPreference (chosen and rejected rows padded to the longest of the batch).

Supervised tokens = completion tokens of both sides (identical in both by construction; checked).
Time = training-loop time from the end of every optimizer step, (t_last - t_first) * n / (n - 1),
as in scripts/bench_train.py (whose clock, children and rounds this reuses); rounds alternate the
order of the two frameworks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_train import (  # noqa: E402
    HP,
    LORA_TARGETS,
    RESULT_TAG,
    StepClock,
    bench_workdir,
    emit,
    hf_training_args,
    step_timer,
)

BETA = 0.1
FRAMEWORKS = ("llama_train", "trl")


def make_pairs(path: Path, *, num_pairs: int, tasks: list[str]) -> dict:
    from llama_train.data.builtin import generate_preference_splits

    rows, _ = generate_preference_splits(num_train=num_pairs, num_eval=1, seed=0, tasks=tuple(tasks))
    path.write_text("".join(json.dumps({k: r[k] for k in ("id", "prompt", "chosen", "rejected")}) + "\n" for r in rows))
    return {"pairs": len(rows), "tasks": tasks}


def child_llama_train(work: Path, args) -> dict:
    import yaml

    from llama_train import trainer
    from llama_train.train import main as train_main

    out = work / f"llama_train_run_round{args.round}"
    base = Path((work / "model_dir.txt").read_text())
    recipe = {
        "output_dir": str(out),
        "model": {"source": "tiny" if base == work / "tiny" else "hf", "path": str(base)},
        "data": {
            "sources": [{"path": str(work / "pairs.jsonl"), "format": "preference"}],
            "seq_len": args.seq_len,
            "cache_dir": str(work / "llama_train_cache"),
            "shuffle": False,
        },
        "lora": {"r": HP["r"], "alpha": HP["alpha"], "dropout": 0.0, "target_modules": LORA_TARGETS},
        "train": {
            "objective": "dpo",
            "epochs": 1,
            "micro_batch_size": args.batch,
            "lr": HP["lr"],
            "lr_scheduler": "cosine",
            "warmup_steps": 0,
            "max_grad_norm": HP["max_grad_norm"],
            "seed": HP["seed"],
            "num_threads": args.threads,
            "log_every_n_steps": 1,
        },
        "dpo": {"beta": BETA, "loss": "sigmoid"},
        "tracking": {"uri": f"sqlite:///{work}/mlruns.db", "log_system_metrics": False},
        "checkpoint": {"save_final": False, "resume": "never"},
    }
    path = out.with_name(out.name + "_recipe.yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    clock = StepClock()
    step = trainer._train_step

    def timed_step(run):
        res = step(run)
        clock.tick()
        return res

    trainer._train_step = timed_step
    if train_main([str(path)]):
        raise SystemExit("llama_train failed")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["metrics"] for r in rows if "train/loss" in r["metrics"]]
    return {
        "framework": "llama_train",
        "steps": len(steps),
        "supervised_tokens": int(sum(m["train/supervised_tokens"] for m in steps)),
        **clock.result(),
        "mean_loss": sum(m["train/loss"] for m in steps) / len(steps),
        "final_margin": steps[-1]["train/rewards/margins"],
    }


def child_trl(work: Path, args) -> dict:
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    base = Path((work / "model_dir.txt").read_text())
    tok = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa", dtype=torch.float32)
    torch.manual_seed(HP["seed"])
    lora = peft.LoraConfig(
        r=HP["r"],
        lora_alpha=HP["alpha"],
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    clock = StepClock()
    targs = hf_training_args(
        DPOConfig,
        work / f"trl_run_round{args.round}",
        batch=args.batch,
        accum=1,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=args.seq_len,
    )
    trainer = DPOTrainer(
        model=model, args=targs, train_dataset=ds, processing_class=tok, peft_config=lora, callbacks=[step_timer(clock)]
    )
    supervised = sum(int(b["completion_mask"][:, 1:].sum()) for b in trainer.get_train_dataloader())
    out = trainer.train()
    margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
    return {
        "framework": "trl",
        "steps": trainer.state.global_step,
        "supervised_tokens": supervised,
        **clock.result(),
        "mean_loss": out.training_loss,
        "final_margin": margins[-1] if margins else None,
    }


def spawn(name: str, work: Path, args) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--work",
        str(work),
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
        "--seq-len",
        str(args.seq_len),
        "--round",
        str(args.round),
    ]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        return {"framework": name, "error": f"exit {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    result = json.loads(lines[-1][len(RESULT_TAG) :])
    result["load_avg_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="`tiny` or a catalogue name, e.g. smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--tasks", default="reverse,sort,add", help="built-in tasks of the pairs (date for SmolLM2)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--seq-len", type=int, default=256, help="llama-train: tokens of a pair row; TRL: max_length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout-s", type=int, default=900)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        result = {"llama_train": child_llama_train, "trl": child_trl}[args.child](Path(args.work), args)
        result["process_s"] = round(time.perf_counter() - t0, 1)
        result["tokens_per_s"] = result["supervised_tokens"] / result["loop_s"]
        result["tokens_per_s_median_step"] = result["supervised_tokens"] / (result["median_step_s"] * result["steps"])
        emit(result)
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import trl

    work, base = bench_workdir(args.model, args.work, prefix="bench_dpo_")
    data = make_pairs(work / "pairs.jsonl", num_pairs=args.pairs, tasks=args.tasks.split(","))
    print(
        json.dumps(
            {
                "env": {
                    "trl": trl.__version__,
                    "model": args.model,
                    "data": data,
                    "batch": args.batch,
                    "threads": args.threads,
                    "argv": sys.argv[1:],
                    "work": str(work),
                }
            }
        ),
        flush=True,
    )
    rounds = []
    for k in range(args.repeats):
        args.round = k
        order = FRAMEWORKS if k % 2 == 0 else FRAMEWORKS[::-1]
        rounds.append({name: spawn(name, work, args) for name in order})
        for name in order:
            print(json.dumps({"round": k, **rounds[-1][name]}), flush=True)
    lines = [
        "| round | llama_train tokens/s | trl tokens/s | ratio | llama_train tokens/s (median step) | "
        "trl (median step) | ratio (median step) | supervised tokens (llama_train / trl) |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k, rnd in enumerate(rounds):
        a, b = rnd["llama_train"], rnd["trl"]
        if "error" in a or "error" in b:
            lines.append(f"| {k} | {a.get('error', '')} | {b.get('error', '')} | | | | | |")
            continue
        lines.append(
            f"| {k} | {a['tokens_per_s']:,.2f} | {b['tokens_per_s']:,.2f} | "
            f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x | {a['tokens_per_s_median_step']:,.2f} | "
            f"{b['tokens_per_s_median_step']:,.2f} | "
            f"{a['tokens_per_s_median_step'] / b['tokens_per_s_median_step']:.2f}x | "
            f"{a['supervised_tokens']:,} / {b['supervised_tokens']:,} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"rounds": rounds, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
