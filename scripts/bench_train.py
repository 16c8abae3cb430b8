"""CPU training benchmark: llama-train vs HF Trainer (PEFT, padding) vs TRL SFTTrainer (packing).

    python scripts/bench_train.py --out bench_train.json        # ~3 min on 2 idle cores
    python scripts/bench_train.py --rows 600 --repeats 3 --out bench_train.json   # the BENCHMARKS.md run
    python scripts/bench_train.py --model smollm2-135m-instruct --rows 64 --repeats 2   # the real model

`--model` is `tiny` (default) or a catalogue name (`llama-train model list`), fetched on first use.
With SmolLM2 (ChatML), TRL's completion mask also trains the "\n" after each <|im_end|> (one token
per row more than llama-train and hf, which stop at <|im_end|>): its count is reported, not matched.

`--repeats R` runs R rounds of every framework, rotating the order per round (no framework always
first or last); the table shows each framework's median round and a second table the per-round
ratios (the two runs compared within a round saw the same machine state). `--frameworks` may add
`llama_train_compiled` (the same recipe with `train.compile: true`), `llama_train_padded`
(data.packing false: one sample per row, padded to the longest of `--hf-batch` rows per step, as
hf), `llama_train_grouped` (the same with data.group_by_length) and `llama_train_sdpa` (packed
rows with `model.attn_implementation: sdpa` and its block-diagonal 4D mask, the default before
`auto`).

The same tiny Llama (llama_train.tiny.build_tiny, seed 0), the same synthetic chat data (one
user and one assistant turn of random letter words from the tiny tokenizer's vocabulary; user and
answer lengths lognormal, ~200 tokens per conversation on average, none over seq_len 1024), the
same LoRA (r 16, alpha 32, dropout 0, q/k/v/o/gate/up/down_proj), AdamW (lr 2e-4, no weight decay,
cosine to 0, no warmup, grad-norm clip 1.0), seed 42, fp32, the same torch threads; one pass
(epoch) over the same rows, so every framework trains exactly the same supervised tokens (the
assistant answer and its <|eot_id|>; checked, the run fails if the counts differ):

  llama_train  `python -m llama_train.train RECIPE` in-process: data.packing (best-fit-decreasing
               rows of 1024), the default model.attn_implementation (`auto`: doc_sdpa, per-document
               attention, on CPU),
               1 packed row per optimizer step.
  hf           transformers Trainer + PEFT, one sample per row padded to the longest of the batch
               (DataCollatorForSeq2Seq), sdpa, 4 samples per optimizer step (a packed row holds
               ~4.4 samples on average).
  trl          TRL SFTTrainer, conversational prompt/completion rows, completion_only_loss, packing
               (its default "bfd" strategy: padding-free rows of max_length 1024, documents isolated
               by position ids), sdpa, 1 packed row per optimizer step. (TRL flattens a batch of
               k packed rows into one row of k*1024 tokens, so batch 1 is its fastest setting.)
               SFTConfig's own defaults bf16=True and gradient_checkpointing=True are turned off
               (fp32 and no checkpointing, like the other two; bf16 autocast is slow on most CPUs).

Each framework runs in its own subprocess; the child reports its peak RSS (getrusage ru_maxrss).
Time = training-loop time, measured the same way for all three from the clock read at the end of
every optimizer step (a wrapper around llama-train's step function, a TrainerCallback for HF/TRL):
(t_last - t_first) * n / (n - 1), i.e. the n-1 measured step intervals extrapolated to n steps,
which leaves out model loading, preprocessing and the first step's one-off setup. Two clocks:
wall time (time.perf_counter) and the process's CPU time (time.process_time, all threads; in the
JSON only: spinning OpenMP threads burn CPU while they wait, so it is no cleaner under load).
Throughput = supervised tokens / loop time. On a shared machine another process's burst of work
slows single steps 10x or more, so the table also gives throughput at the median step time
(supervised tokens / (median step s x steps)); it is robust to such bursts but flatters hf, whose
padded batches vary in cost. The load average before and after each child is recorded.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEQ_LEN = 1024
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HP = {"lr": 2e-4, "seed": 42, "r": 16, "alpha": 32, "max_grad_norm": 1.0}
FRAMEWORKS = ("llama_train", "hf", "trl")
# not in the default set: llama_train with train.compile: true; unpacked rows (padded like hf),
# without and with data.group_by_length
OPTIONAL = ("llama_train_compiled", "llama_train_padded", "llama_train_grouped", "llama_train_sdpa")
RESULT_TAG = "BENCH_RESULT "


# ------------------------------------------------------------------------------- data
def make_data(
    path: Path,
    tokenizer,
    *,
    num_rows: int,
    seed: int,
    mean_user: float = 110.0,
    mean_answer: float = 80.0,
    sigma: float = 0.7,
) -> dict:
    """Write `num_rows` conversations; return token-length stats (rendered with the chat template)."""
    vocab = sorted(t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and t[1:].isascii())
    rng = random.Random(seed)

    def lognormal(mean: float) -> int:  # E[exp(N(mu, s^2))] = exp(mu + s^2/2)
        return max(1, int(rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma)))

    def text(n_words: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(n_words))

    lengths = []
    with open(path, "w") as fh:
        for i in range(num_rows):
            n_user, n_answer = lognormal(mean_user), lognormal(mean_answer)
            while True:
                msgs = [
                    {"role": "user", "content": f"q{i} " + text(n_user)},
                    {"role": "assistant", "content": text(n_answer)},
                ]
                n = len(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
                if n <= SEQ_LEN:
                    break
                n_user, n_answer = max(1, int(n_user * 0.9)), max(1, int(n_answer * 0.9))  # cap at seq_len
            lengths.append(n)
            fh.write(json.dumps({"messages": msgs}) + "\n")
    lengths.sort()
    return {
        "rows": num_rows,
        "tokens": sum(lengths),
        "mean": round(sum(lengths) / num_rows, 1),
        "median": lengths[num_rows // 2],
        "p95": lengths[int(num_rows * 0.95)],
        "max": lengths[-1],
    }


def read_conversations(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in Path(path).read_text().splitlines()]


# ------------------------------------------------------------------------------- helpers
def loop_seconds(step_end_times: list[float]) -> float:
    """Training-loop time from the end times of n steps: (last - first) * n / (n - 1)."""
    n = len(step_end_times)
    if n < 2:
        raise RuntimeError("need at least 2 optimizer steps to time the loop")
    return (step_end_times[-1] - step_end_times[0]) * n / (n - 1)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def emit(result: dict) -> None:
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    print(RESULT_TAG + json.dumps(result), flush=True)


class StepClock:
    """Wall and process CPU time at the end of every optimizer step."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def tick(self) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def result(self) -> dict:
        steps = sorted(b - a for a, b in zip(self.wall, self.wall[1:]))
        return {
            "loop_s": loop_seconds(self.wall),
            "loop_cpu_s": loop_seconds(self.cpu),
            "median_step_s": steps[len(steps) // 2],
        }


def step_timer(clock: StepClock):
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    return StepTimes()


def model_dir(work: Path) -> Path:
    """The base model every framework trains (written by the parent: the tiny model or a catalogue model)."""
    return Path((work / "model_dir.txt").read_text().strip())


def lora_model(model_dir: Path):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", dtype=torch.float32)
    torch.manual_seed(HP["seed"])
    cfg = peft.LoraConfig(
        r=HP["r"],
        lora_alpha=HP["alpha"],
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, cfg)


def hf_training_args(cls, out: Path, *, batch: int, accum: int, **extra):
    return cls(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        num_train_epochs=1,
        learning_rate=HP["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=HP["max_grad_norm"],
        optim="adamw_torch",
        seed=HP["seed"],
        data_seed=HP["seed"],
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        # Same numerics and memory policy as the llama-train recipe: fp32, no activation
        # checkpointing (TRL's SFTConfig defaults to bf16=True and gradient_checkpointing=True).
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        **extra,
    )


def run_dir(work: Path, args, name: str) -> Path:
    """The output directory of one framework in one round (every run starts from an empty one)."""
    return work / (f"{name}_run" + (f"_round{args.round}" if args.round else ""))


def supervised_in_loader(loader) -> int:
    """Tokens that carry loss after the causal shift, as the model's loss sees them."""
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in loader)


# ------------------------------------------------------------------------------- children
def child_llama_train(work: Path, args, *, variant: str = "") -> dict:
    import inspect

    import yaml

    name = f"llama_train_{variant}" if variant else "llama_train"
    compiled, packed = variant == "compiled", variant not in ("padded", "grouped")
    out = run_dir(work, args, name)
    recipe = {
        "output_dir": str(out),
        "model": {
            "source": "tiny" if model_dir(work) == work / "tiny" else "hf",
            "path": str(model_dir(work)),
            **({"attn_implementation": "sdpa"} if variant == "sdpa" else {}),
        },
        "data": {
            "sources": [{"path": str(work / "chat.jsonl"), "format": "messages"}],
            "packing": packed,
            "group_by_length": variant == "grouped",
            "seq_len": SEQ_LEN,
            "cache_dir": str(work / "llama_train_cache"),
        },
        "lora": {"r": HP["r"], "alpha": HP["alpha"], "dropout": 0.0, "target_modules": LORA_TARGETS},
        "train": {
            "epochs": 1,
            "micro_batch_size": args.packed_rows if packed else args.hf_batch,
            "grad_accum_steps": 1,
            "lr": HP["lr"],
            "lr_scheduler": "cosine",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": HP["max_grad_norm"],
            "seed": HP["seed"],
            "precision": "fp32",
            "num_threads": args.threads,
            "log_every_n_steps": 1,
            "compile": compiled,
        },
        "tracking": {"uri": f"sqlite:///{work}/mlruns.db", "log_system_metrics": False},
        "checkpoint": {"save_final": False, "resume": "never"},
    }
    path = out.with_name(out.name + "_recipe.yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))

    from llama_train import trainer
    from llama_train.train import main as train_main

    note = "trainer passes attn_implementation to collate"
    if "attn_implementation" not in inspect.getsource(trainer._train_step):
        # The call the trainer is about to make (issue 10): without it collate builds the 4D mask
        # for sdpa, and doc_sdpa correctly falls back to full seq x seq attention.
        import functools

        from llama_train.data.loader import collate

        trainer.collate = functools.partial(collate, attn_implementation="doc_sdpa")
        note = "collate patched in the benchmark to pass attn_implementation=doc_sdpa (trainer not updated yet)"
    clock = StepClock()
    step = trainer._train_step

    def timed_step(run):  # the loop calls the module-level name; behaviour unchanged
        res = step(run)
        clock.tick()
        return res

    trainer._train_step = timed_step
    code = train_main([str(path)])
    if code:
        raise SystemExit(f"llama_train exited {code}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r["metrics"]]
    run = json.loads((out / "run.json").read_text())
    losses = [r["metrics"]["train/loss"] for r in steps]
    return {
        "framework": name,
        "steps": len(steps),
        "note": note,
        "supervised_tokens": int(sum(r["metrics"]["train/supervised_tokens"] for r in steps)),
        **clock.result(),
        "metrics_jsonl_loop_s": loop_seconds([r["time"] for r in steps]),
        "train_runtime_s": run.get("train_runtime_s"),
        "supervised_tokens_total": run.get("supervised_tokens_total"),
        "mean_loss": sum(losses) / len(losses),
        "final_loss": losses[-1],
        "train_rows": run.get("data", {}).get("train_rows"),
    }


def _tokenize_hf(tokenizer, conversations):
    """input_ids + labels (-100 except the assistant answer and its end-of-turn token; ChatML's "\n"
    after <|im_end|> is -100, as in llama-train)."""
    from llama_train.data.chat import end_of_turn_ids

    eot = end_of_turn_ids(tokenizer)
    rows = []
    for msgs in conversations:
        full = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)[
            "input_ids"
        ]
        assert full[: len(prompt)] == prompt
        end = max(j for j in range(len(full)) if full[j] in eot) + 1
        labels = [-100] * len(prompt) + full[len(prompt) : end] + [-100] * (len(full) - end)
        rows.append({"input_ids": full, "labels": labels})
    return rows


def child_hf(work: Path, args) -> dict:
    import datasets
    from transformers import (
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(model_dir(work))
    ds = datasets.Dataset.from_list(_tokenize_hf(tok, read_conversations(work / "chat.jsonl")))
    model = lora_model(model_dir(work))
    clock = StepClock()
    timer = step_timer(clock)
    targs = hf_training_args(TrainingArguments, run_dir(work, args, "hf"), batch=args.hf_batch, accum=1)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=ds,
        callbacks=[timer],
        data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100),
    )
    supervised = supervised_in_loader(trainer.get_train_dataloader())
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "framework": "hf",
        "steps": trainer.state.global_step,
        "supervised_tokens": supervised,
        **clock.result(),
        "train_runtime_s": out.metrics.get("train_runtime"),
        "mean_loss": out.training_loss,
        "final_loss": losses[-1] if losses else None,
    }


def child_trl(work: Path, args) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir(work))
    convs = read_conversations(work / "chat.jsonl")
    ds = datasets.Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in convs])
    model = lora_model(model_dir(work))
    clock = StepClock()
    timer = step_timer(clock)
    targs = hf_training_args(
        SFTConfig,
        run_dir(work, args, "trl"),
        batch=args.packed_rows,
        accum=1,
        max_length=SEQ_LEN,
        packing=True,
        completion_only_loss=True,
    )
    trainer = SFTTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, callbacks=[timer])
    supervised = supervised_in_loader(trainer.get_train_dataloader())
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "framework": "trl",
        "steps": trainer.state.global_step,
        "supervised_tokens": supervised,
        **clock.result(),
        "train_runtime_s": out.metrics.get("train_runtime"),
        "mean_loss": out.training_loss,
        "final_loss": losses[-1] if losses else None,
        "packing_strategy": targs.packing_strategy,
        "padding_free": trainer.padding_free,
    }


CHILDREN = {
    "llama_train": child_llama_train,
    "hf": child_hf,
    "trl": child_trl,
    **{
        f"llama_train_{v}": functools.partial(child_llama_train, variant=v)
        for v in ("compiled", "padded", "grouped", "sdpa")
    },
}


def run_child(name: str, work: Path, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    result = CHILDREN[name](work, args)
    result["process_s"] = round(time.perf_counter() - t0, 1)
    result["threads"] = torch.get_num_threads()
    result["tokens_per_s"] = result["supervised_tokens"] / result["loop_s"]
    result["tokens_per_cpu_s"] = result["supervised_tokens"] / result["loop_cpu_s"]
    # Robust to bursts of load from other processes (they slow single steps 10x or more), but it
    # flatters frameworks whose steps vary in cost (hf: batches padded to different lengths).
    result["tokens_per_s_median_step"] = result["supervised_tokens"] / (result["median_step_s"] * result["steps"])
    return result


# ------------------------------------------------------------------------------- parent
def spawn(name: str, work: Path, args) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
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
        "--packed-rows",
        str(args.packed_rows),
        "--hf-batch",
        str(args.hf_batch),
        "--round",
        str(args.round),
    ]
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"framework": name, "error": f"exit {proc.returncode}", "log_tail": tail}
    result = json.loads(lines[-1][len(RESULT_TAG) :])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def markdown(results: list[dict], base: str = "llama_train") -> str:
    ok = {r["framework"]: r for r in results if "error" not in r}
    lines = [
        (
            "| framework | optimizer steps | supervised tokens | loop s | supervised tokens/s | "
            f"{base} speed-up | median step s | tokens/s at median step | {base} speed-up (median) | "
            "peak RSS MiB | mean train loss | load avg before/after |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['framework']} | failed: {r['error']} |" + " |" * 10)
            continue
        b = ok.get(base)
        wall = b["tokens_per_s"] / r["tokens_per_s"] if b else float("nan")
        med = b["tokens_per_s_median_step"] / r["tokens_per_s_median_step"] if b else float("nan")
        lines.append(
            f"| {r['framework']} | {r['steps']} | {r['supervised_tokens']:,} | {r['loop_s']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {wall:.2f}x | {r['median_step_s']:.3f} | "
            f"{r['tokens_per_s_median_step']:,.0f} | {med:.2f}x | {r['peak_rss_mib']:,.0f} | "
            f"{r['mean_loss']:.3f} | {r['load_avg_1min'][0]} / {r['load_avg_1min'][1]} |"
        )
    return "\n".join(lines)


def median_result(runs: list[dict]) -> dict:
    """One framework over the rounds: the round with the median supervised tokens/s (one round: itself)."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["tokens_per_s"])
    if not ok:
        return runs[0]
    return {
        **ok[(len(ok) - 1) // 2],
        "rounds": len(runs),
        "rounds_ok": len(ok),
        "tokens_per_s_all_rounds": [round(r["tokens_per_s"]) for r in ok],
    }


def round_ratios(rounds: list[dict], names: list[str], base: str = "llama_train") -> str:
    """llama-train's speed-up over each other framework, round by round (same round = same conditions)."""
    others = [n for n in names if n != base]
    lines = ["| round | " + " | ".join(f"{base} / {n}" for n in others) + " |", "|---:|" + "---:|" * len(others)]
    for k, rnd in enumerate(rounds):
        b = rnd.get(base, {})
        cells = [
            f"{b['tokens_per_s'] / rnd[n]['tokens_per_s']:.2f}x"
            if "error" not in b and "error" not in rnd.get(n, {"error": 1}) and b
            else "-"
            for n in others
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_workdir(model: str, work: str | None, *, prefix: str) -> tuple[Path, Path]:
    """The benchmark's work directory and base model (`tiny` built there, or a catalogue model
    pulled into the cache); the model path is recorded in work/model_dir.txt for the children."""
    work_dir = Path(work or tempfile.mkdtemp(prefix=prefix))
    work_dir.mkdir(parents=True, exist_ok=True)
    if model == "tiny":
        from llama_train.tiny import build_tiny

        base = build_tiny(work_dir / "tiny", seed=0)
    else:
        from llama_train.models.catalogue import pull

        base = pull(model)
    (work_dir / "model_dir.txt").write_text(str(base))
    return work_dir, base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1000, help="conversations in the synthetic data set")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--model", default="tiny", help="`tiny` or a catalogue name, e.g. smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every framework")
    # One packed row (~4.4 conversations) per step, matching hf's 4 samples. With k > 1 the last
    # step of the epoch is topped up with filler rows (no labels), so the supervised tokens match.
    ap.add_argument(
        "--packed-rows", type=int, default=1, help="packed rows of 1024 per optimizer step (llama_train, trl)"
    )
    ap.add_argument("--hf-batch", type=int, default=4, help="padded samples per optimizer step (hf)")
    ap.add_argument(
        "--frameworks", default=",".join(FRAMEWORKS), help=f"comma-separated, from {', '.join(FRAMEWORKS + OPTIONAL)}"
    )
    ap.add_argument("--timeout-s", type=int, default=900, help="per framework")
    ap.add_argument("--work", default=None, help="working directory (default: a new temp dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of all frameworks; the order rotates per round and the table shows medians",
    )
    ap.add_argument("--child", choices=FRAMEWORKS + OPTIONAL, help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        emit(run_child(args.child, Path(args.work), args))
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer

    work, base = bench_workdir(args.model, args.work, prefix="bench_train_")
    data = make_data(work / "chat.jsonl", AutoTokenizer.from_pretrained(base), num_rows=args.rows, seed=args.data_seed)
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "packed_rows_per_step": args.packed_rows,
        "hf_samples_per_step": args.hf_batch,
        "data": data,
        "model": args.model,
        "argv": sys.argv[1:],
        "work": str(work),
    }
    print(json.dumps({"env": env}), flush=True)
    names = args.frameworks.split(",")
    rounds = []
    for k in range(args.repeats):
        # Rotate the order, so that no framework always runs first (cold caches) or last.
        args.round = k
        order = names[k % len(names) :] + names[: k % len(names)]
        rounds.append({name: spawn(name, work, args) for name in order})
        for name in order:
            print(json.dumps({"round": k, **rounds[-1][name]}), flush=True)
    results = [median_result([r[name] for r in rounds]) for name in names]
    counts = {
        r["supervised_tokens"]
        for rnd in rounds
        for name, r in rnd.items()
        if "error" not in r and (args.model == "tiny" or name != "trl")
    }  # TRL trains ChatML's "\n" after <|im_end|>
    status = 0
    if len(counts) > 1:
        print(f"ERROR: supervised token counts differ between frameworks or rounds: {counts}", file=sys.stderr)
        status = 1
    print()
    print(markdown(results))
    if args.repeats > 1:
        print()
        print(round_ratios(rounds, names))
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "results": results, "rounds": rounds}, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
