"""The serving engine on an accelerator vs on the CPU: same tiny model and LoRA adapter, same
requests (greedy with logprobs, penalties and biases, prompt logprobs with echo, stop and allowed
token ids, the adapter, seeded sampling), run through `llama_train.serve.engine.Engine` directly
(no HTTP stack, so it needs only torch, transformers and peft). Greedy results must match: the
same text and logprobs within --atol (float32, TF32 off). Sampled requests must run and report
finite logprobs (GPU and CPU softmax round differently, so the draws may differ).

    PYTHONPATH=. python3 scripts/gpu_serve_check.py --out $OUT/serve_check.json     # on the GPU machine
    PYTHONPATH=. python scripts/gpu_serve_check.py --device cpu                     # smoke run here

Exit code 0 when every check passes, 1 otherwise; the JSON lists each request's comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path


def build(work: Path) -> tuple[Path, Path]:
    from llama_train.tiny import build_random_lora, build_tiny

    base = build_tiny(work / "model", seed=0)
    return base, build_random_lora(base, work / "adapter", seed=1)


def requests(tok) -> list[dict]:
    """(name, prompt ids, SamplingParams kwargs, adapter, deterministic)."""
    prompt = tok("Question: what is the capital of France? Answer:")["input_ids"]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Reverse the word banana"}], add_generation_prompt=True, tokenize=False
    )
    chat_ids = tok(chat, add_special_tokens=False)["input_ids"]
    some = tok("the and of is")["input_ids"][:4]
    return [
        {"name": "greedy_logprobs", "ids": chat_ids, "p": {"max_tokens": 12, "temperature": 0, "logprobs": 3}},
        {
            "name": "adapter_greedy",
            "ids": chat_ids,
            "adapter": "lora",
            "p": {"max_tokens": 12, "temperature": 0, "logprobs": 2},
        },
        {
            "name": "penalties_and_bias",
            "ids": prompt,
            "p": {
                "max_tokens": 10,
                "temperature": 0,
                "frequency_penalty": 1.0,
                "presence_penalty": 0.5,
                "repetition_penalty": 1.3,
                "logit_bias": {some[0]: 3.0},
                "min_tokens": 4,
                "ignore_eos": True,
                "logprobs": 1,
            },
        },
        {
            "name": "echo_prompt_logprobs",
            "ids": prompt,
            "p": {"max_tokens": 1, "temperature": 0, "logprobs": 2, "prompt_logprobs": True, "report_stop_token": True},
        },
        {
            "name": "echo_only",
            "ids": prompt,
            "p": {"max_tokens": 0, "temperature": 0, "logprobs": 0, "prompt_logprobs": True},
        },
        {
            "name": "allowed_and_stop_ids",
            "ids": prompt,
            "p": {
                "max_tokens": 8,
                "temperature": 0,
                "allowed_token_ids": some,
                "stop_token_ids": [some[-1]],
                "logprobs": 0,
                "report_stop_token": True,
            },
        },
        {
            "name": "sampled_n2",
            "ids": chat_ids,
            "deterministic": False,
            "p": {
                "max_tokens": 8,
                "temperature": 0.8,
                "top_k": 20,
                "min_p": 0.05,
                "top_p": 0.9,
                "seed": 5,
                "n": 2,
                "ignore_eos": True,
                "logprobs": 2,
            },
        },
    ]


async def run_all(engine, specs: list[dict], base_id: str) -> list[dict]:
    from llama_train.serve.engine import GenRequest, SamplingParams

    loop = asyncio.get_running_loop()
    gens = []
    for spec in specs:  # submitted together: they batch, as concurrent HTTP requests would
        params = SamplingParams(**spec["p"])
        adapter = spec.get("adapter")
        gen = GenRequest(list(spec["ids"]), params, adapter or base_id, adapter, loop)
        engine.submit(gen)
        gens.append(gen)
    out = []
    for spec, gen in zip(specs, gens):
        n = spec["p"].get("n", 1)
        texts, finish, entries = [""] * n, [None] * n, [[] for _ in range(n)]
        while any(f is None for f in finish):
            event = await asyncio.wait_for(gen.events.get(), timeout=300)
            if event.error is not None:
                raise RuntimeError(f"{spec['name']}: {event.error!r}")
            for idx, text, fin, lps in event.deltas:
                texts[idx] += text
                entries[idx] += lps
                finish[idx] = fin or finish[idx]
        out.append(
            {
                "texts": texts,
                "finish": finish,
                "entries": entries,
                "prompt_logprobs": gen.prompt_logprobs,
                "completion_tokens": gen.completion_tokens,
            }
        )
    return out


def serve(device: str, base: Path, adapter: Path, specs: list[dict]) -> tuple[list[dict], float]:
    from llama_train.serve.engine import Engine

    engine = Engine(
        str(base), {"lora": str(adapter)}, served_model_name="tiny", dtype="float32", device=device, batch_wait_ms=50
    )
    engine.start()
    engine.ready.wait(600)
    if engine.load_error is not None:
        raise RuntimeError(f"{device}: model load failed: {engine.load_error!r}")
    t0 = time.perf_counter()
    results = asyncio.run(run_all(engine, specs, "tiny"))
    engine.stop()
    return results, time.perf_counter() - t0


def logprob_values(result: dict) -> list[float]:
    vals = [e["logprob"] for choice in result["entries"] for e in choice]
    vals += [e["logprob"] for e in result["prompt_logprobs"] or [] if e["logprob"] is not None]
    vals += [t["logprob"] for choice in result["entries"] for e in choice for t in e["top_logprobs"]]
    return vals


def compare(spec: dict, ref: dict, got: dict, atol: float) -> dict:
    row = {"request": spec["name"], "texts": got["texts"], "finish": got["finish"]}
    values = logprob_values(got)
    row["finite"] = all(math.isfinite(v) for v in values) and bool(values)
    if spec.get("deterministic", True):
        a, b = logprob_values(ref), logprob_values(got)
        row["same_text"] = ref["texts"] == got["texts"] and ref["finish"] == got["finish"]
        row["same_tokens"] = [[e["bytes"] for e in c] for c in ref["entries"]] == [
            [e["bytes"] for e in c] for c in got["entries"]
        ]
        row["max_logprob_diff"] = max((abs(x - y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else None
        row["ok"] = (
            row["same_text"]
            and row["same_tokens"]
            and row["finite"]
            and row["max_logprob_diff"] is not None
            and row["max_logprob_diff"] <= atol
        )
    else:
        row["ok"] = row["finite"] and all(f is not None for f in got["finish"])
    return row


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--atol", type=float, default=2e-3, help="logprob tolerance vs the CPU run")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        base, adapter = build(Path(tmp))
        specs = requests(AutoTokenizer.from_pretrained(base))
        ref, cpu_s = serve("cpu", base, adapter, specs)
        got, dev_s = serve(args.device, base, adapter, specs)
    rows = [compare(spec, r, g, args.atol) for spec, r, g in zip(specs, ref, got)]
    report = {
        "device": args.device,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "seconds": {"cpu": round(cpu_s, 2), args.device: round(dev_s, 2)},
        "ok": all(r["ok"] for r in rows),
        "requests": rows,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
