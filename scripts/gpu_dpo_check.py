"""DPO on an accelerator vs the CPU: the same tiny model, LoRA adapter and preference pairs, packed
as DPO packs them (each pair one row of two documents), through `llama_train.dpo.DPOModule`.

On CUDA the accelerator side runs as `train.objective: dpo` does there by default: bf16 autocast
and `doc_varlen` (per-document flash attention); the CPU side is the float32 `doc_sdpa` reference.
Per-side completion log-probs must agree within --rtol, the loss and TRL-named metrics too, and a
backward pass must give finite LoRA gradients close to the reference's (cosine similarity).
Needs only torch, transformers and peft (no datasets or mlflow).

    PYTHONPATH=. python3 scripts/gpu_dpo_check.py --out $OUT/dpo_check.json     # on the GPU machine
    PYTHONPATH=. python scripts/gpu_dpo_check.py --device cpu                   # smoke run here

Exit code 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def pair_rows(vocab: int, *, pairs: int, seed: int) -> list[dict]:
    """Rows as data/preference.py tokenizes pairs: prompt+chosen then prompt+rejected, loss on the
    completions only."""
    from llama_train.data.chat import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(pairs):
        prompt = torch.randint(4, vocab, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
        ids, labels, lens = [], [], []
        for _side in range(2):
            completion = torch.randint(4, vocab, (int(torch.randint(4, 30, (1,), generator=g)),), generator=g).tolist()
            ids += prompt + completion
            labels += [IGNORE_INDEX] * len(prompt) + completion
            lens.append(len(prompt) + len(completion))
        rows.append({"input_ids": ids, "labels": labels, "doc_lens": lens})
    return rows


def run(model_dir: Path, adapter_dir: Path, rows: list[dict], *, device: str, attn: str, bf16: bool) -> dict:
    import peft
    from transformers import AutoModelForCausalLM

    from llama_train import attention
    from llama_train.data.loader import MODEL_INPUTS, collate
    from llama_train.dpo import STAT_NAMES, DPOModule, completion_logps

    attention.register()
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True).to(device)
    module = DPOModule(model, beta=0.1, loss="sigmoid", label_smoothing=0.0, chunk_size=64)
    batch = collate(rows, pad_id=0, attn_implementation=attn, pairs=True)
    inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            logps, counts = completion_logps(
                model,
                inputs["input_ids"],
                inputs["labels"],
                inputs["doc_ids"],
                num_docs=2 * len(rows),
                position_ids=inputs.get("position_ids"),
                attention_mask=inputs.get("attention_mask"),
            )
        loss_sum, stats = module(**inputs)
    loss_sum.backward()
    grads = torch.cat([p.grad.flatten().float().cpu() for n, p in model.named_parameters() if p.grad is not None])
    return {
        "logps": logps.cpu().tolist(),
        "counts": counts.cpu().tolist(),
        "loss": float(loss_sum) / len(rows),
        "metrics": {k: float(v) / len(rows) for k, v in zip(STAT_NAMES[1:], stats[1:])},
        "grad": grads,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--rtol", type=float, default=2e-2, help="relative tolerance of log-probs and loss")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    from llama_train.tiny import build_random_lora, build_tiny

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny(Path(tmp) / "model", seed=0)
        adapter = build_random_lora(base, Path(tmp) / "adapter", seed=1, scale=1.0)
        vocab = json.loads((base / "config.json").read_text())["vocab_size"]
        rows = pair_rows(vocab, pairs=args.pairs, seed=0)
        cuda = args.device == "cuda"
        ref = run(base, adapter, rows, device="cpu", attn="doc_sdpa", bf16=False)
        dev = run(base, adapter, rows, device=args.device, attn="doc_varlen" if cuda else "doc_sdpa", bf16=cuda)
    rel = [abs(a - b) / max(abs(b), 1e-6) for a, b in zip(dev["logps"], ref["logps"])]
    cos = float(torch.nn.functional.cosine_similarity(dev["grad"], ref["grad"], dim=0))
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "pairs": args.pairs,
        "bf16": cuda,
        "attention": "doc_varlen" if cuda else "doc_sdpa",
        "max_rel_logp_diff": max(rel),
        "same_counts": dev["counts"] == ref["counts"],
        "loss": [dev["loss"], ref["loss"]],
        "metrics": {k: [dev["metrics"][k], ref["metrics"][k]] for k in ref["metrics"]},
        "grad_cosine": cos,
        "grad_finite": bool(torch.isfinite(dev["grad"]).all()),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    result["ok"] = (
        result["same_counts"]
        and result["max_rel_logp_diff"] <= args.rtol
        and abs(dev["loss"] - ref["loss"]) <= args.rtol * max(abs(ref["loss"]), 1e-3)
        and result["grad_finite"]
        and cos > 0.99
    )
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
