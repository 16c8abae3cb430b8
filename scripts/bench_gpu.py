"""LoRA training throughput of Llama-3.1-8B (random bf16 weights) on one GPU: HF/PEFT vs fast path.

    PYTHONPATH=. python3 scripts/bench_gpu.py --out bench.json          # one CUDA GPU
    PYTHONPATH=. python3 scripts/bench_gpu.py --tiny                    # CPU smoke test

Needs only torch, transformers and peft (no hub download, datasets, accelerate or flash-attn).
Every variant trains the same PEFT model (LoRA r=16, alpha=32, dropout 0, on q,k,v,o,gate,up,down;
adapter weights float32 as PEFT creates them, forward under bf16 autocast like HF Trainer with
bf16=True), on the same packed rows (several documents per row, position ids restart per
document, the first token of each document is not a target), one row per optimizer step,
fused AdamW, grad-norm clipping at 1.0 (the HF Trainer step). Variants:

  hf_packed      model(input_ids, labels, position_ids, use_cache=False), sdpa: transformers builds
                 a block-diagonal 4D mask from the position ids (documents isolated); full logits loss.
  hf_causal      same without use_cache=False: plain causal mask, documents attend to each other
                 (what HF does with packed rows and the default cache setting; wrong but common).
  fast           causal_lm_loss (chunked CE, llama_train/loss.py) + per-document flash attention
                 (torch.nn.attention.varlen.varlen_attn over cu_seqlens; documents isolated).
  fast_ckpt      fast + non-reentrant gradient checkpointing of every decoder layer.
  fast_compile   fast + torch.compile of every decoder layer (regional compilation).
  trainer_compile  fast + the trainer's own `train.compile` (llama_train.model.compile_decoder_layers:
                 every decoder layer compiled, the per-document attention left eager).
  hf_trainer     transformers.Trainer itself (bf16=True, optim adamw_torch_fused, max_grad_norm 1.0,
                 per-device batch = --batch packed rows) on the same rows, model.config.use_cache
                 False so that sdpa isolates the documents (as hf_packed). Timed by a TrainerCallback
                 at each optimizer step's end (after a CUDA sync), warm-up steps excluded.

One JSON line per variant, then a markdown table. Throughput counts every token of the
packed rows; MFU uses llama_train.perf (4 x frozen + 6 x LoRA params + 12*L*H*seq per token).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch
import torch._dynamo

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from llama_train import attention
from llama_train.loss import causal_lm_loss  # noqa: E402
from llama_train.model import compile_decoder_layers, isolate_inductor_cache  # noqa: E402
from llama_train.perf import flops_per_token, matmul_param_counts, mfu, peak_flops  # noqa: E402

IGNORE = -100
ALL_VARIANTS = (
    "hf_packed",
    "hf_causal",
    "fast",
    "fast_ckpt",
    "hf_packed_compile",
    "fast_compile",
    "fast_compile_loop",
    "fast_compile_ckpt",
    "trainer_compile",
    "hf_trainer",
)


# --------------------------------------------------------------------------- attention
# doc_varlen (varlen flash on CUDA, per-document SDPA loop elsewhere) lives in llama_train.attention;
# `attention._VARLEN = None` forces the loop (the *_loop variants).
def register_attention():
    return attention.register()


def set_attn(model, name):
    base = model.get_base_model()
    base.config._attn_implementation = name
    for module in base.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name


# --------------------------------------------------------------------------- model and data
def build_model(args, device):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        cfg = LlamaConfig(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=args.seq,
        )
    else:  # Llama-3.1-8B architecture
        cfg = LlamaConfig(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=getattr(args, "layers", None) or 32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lora)  # adapters float32 (PEFT's autocast_adapter_dtype default)
    model.train()
    return model, cfg


def make_batch(args, device, vocab, step):
    """One packed batch; document lengths are fixed (seed 0), token ids vary with ``step``."""
    rng = torch.Generator().manual_seed(0)
    lo, hi = max(2, args.seq // 16), max(3, args.seq // 2)
    lengths = []
    while sum(lengths) < args.seq:
        lengths.append(int(torch.randint(lo, hi, (1,), generator=rng)))
    lengths[-1] -= sum(lengths) - args.seq
    if lengths[-1] < 2:
        lengths[-2] += lengths.pop()
    g = torch.Generator().manual_seed(1000 + step)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).repeat(args.batch, 1)
    labels = input_ids.clone()
    starts = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)[:-1].tolist()))
    labels[:, starts] = IGNORE  # first token of a document is not predicted from the previous one
    bounds = [0]
    for _ in range(args.batch):
        for n in lengths:
            bounds.append(bounds[-1] + n)
    extra = {
        "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32, device=device),
        "cu_seq_lens_k": torch.tensor(bounds, dtype=torch.int32, device=device),
        "max_length_q": args.seq,  # an upper bound: a constant keeps torch.compile from recompiling
        "max_length_k": args.seq,
        "doc_bounds": tuple(bounds),
    }
    return (input_ids.to(device), labels.to(device), position_ids.to(device), extra, lengths)


# --------------------------------------------------------------------------- steps
def hf_loss(model, batch, *, use_cache_false):
    input_ids, labels, position_ids, _, _ = batch
    kw = {"use_cache": False} if use_cache_false else {}
    return model(input_ids=input_ids, labels=labels, position_ids=position_ids, **kw).loss


def fast_loss(model, batch, chunk_size):
    input_ids, labels, position_ids, extra, _ = batch
    loss_sum, num_tokens = causal_lm_loss(
        model, input_ids, labels, position_ids=position_ids, chunk_size=chunk_size, **extra
    )
    return loss_sum / num_tokens


def train_step(model, loss_fn, batch, opt, params, amp_device):
    with torch.autocast(amp_device, dtype=torch.bfloat16):
        loss = loss_fn(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(name, model, cfg, args, device, flops_tok, peak):
    amp_device = device.type
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    compiled = []
    saved_varlen = attention._VARLEN
    if name.endswith("_loop"):
        attention._VARLEN = None  # force the per-document SDPA loop
    if name.startswith("hf"):
        set_attn(model, "sdpa")
        loss_fn = lambda m, b: hf_loss(m, b, use_cache_false=(name == "hf_packed"))  # noqa: E731
    else:
        set_attn(model, "doc_varlen")
        loss_fn = lambda m, b: fast_loss(m, b, args.chunk_size)  # noqa: E731
    if name.endswith("_ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if "_compile" in name:
        # Fresh dynamo state per variant: compiled graphs and recompile counts of an earlier
        # variant must not leak into this one (on the H100 run they hit the recompile limit).
        torch._dynamo.reset()
        for attr in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
            if hasattr(torch._dynamo.config, attr):
                setattr(torch._dynamo.config, attr, max(64, getattr(torch._dynamo.config, attr)))
        # Embedding output requiring grad makes layer 0 see the same input as layers 1..L-1,
        # so one graph serves every layer instead of two.
        hook = (
            model.get_base_model()
            .get_input_embeddings()
            .register_forward_hook(lambda mod, inp, out: out.requires_grad_(True))
        )
        isolate_inductor_cache()
        if name == "trainer_compile":
            compile_decoder_layers(model)  # what train.compile does (attention stays eager)
            compiled.extend(model.get_base_model().model.layers)
        else:
            for layer in model.get_base_model().model.layers:
                layer.compile()
                compiled.append(layer)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        for step in range(args.warmup):
            train_step(model, loss_fn, make_batch(args, device, cfg.vocab_size, step), opt, params, amp_device)
        sync(device)
        warmup_s = time.perf_counter() - t0
        batches = [make_batch(args, device, cfg.vocab_size, args.warmup + s) for s in range(args.steps)]
        sync(device)
        t0 = time.perf_counter()
        losses = [train_step(model, loss_fn, b, opt, params, amp_device) for b in batches]
        sync(device)
        elapsed = time.perf_counter() - t0
        check_loss = None
        if compiled:
            with torch.no_grad(), torch.autocast(amp_device, dtype=torch.bfloat16):
                check_loss = float(loss_fn(model, make_batch(args, device, cfg.vocab_size, 0)))
    finally:
        attention._VARLEN = saved_varlen
        if name.endswith("_ckpt"):
            model.gradient_checkpointing_disable()
        for layer in compiled:  # back to eager for any later variant
            layer._compiled_call_impl = None
        if compiled:
            hook.remove()
        if name == "trainer_compile":  # undo compile_decoder_layers' compiler-disabled registrations
            from transformers import AttentionInterface

            AttentionInterface.register("doc_sdpa", attention.doc_sdpa_attention)
            AttentionInterface.register("doc_varlen", attention.doc_varlen_attention)
    tokens = args.steps * args.batch * args.seq
    tps = tokens / elapsed
    result = {
        "variant": name,
        "tokens_per_s": round(tps, 1),
        "step_s": round(elapsed / args.steps, 4),
        "mfu": None if peak is None else round(mfu(tps, flops_tok, peak), 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "warmup_s": round(warmup_s, 1),
        "last_loss": round(float(losses[-1]), 4),
    }
    if compiled:
        from torch._dynamo.utils import counters

        with torch.no_grad(), torch.autocast(amp_device, dtype=torch.bfloat16):  # same weights, eager
            eager_loss = float(loss_fn(model, make_batch(args, device, cfg.vocab_size, 0)))
        result["check_loss_compiled_vs_eager"] = [round(check_loss, 5), round(eager_loss, 5)]
        result["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
    del opt
    return result


def run_hf_trainer(model, cfg, args, device, flops_tok, peak):
    """The same rows through transformers.Trainer (the HF side as users run it)."""
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    set_attn(model, "sdpa")
    base_cfg = model.get_base_model().config
    saved_cache, base_cfg.use_cache = base_cfg.use_cache, False  # sdpa + position ids: documents isolated
    n = args.warmup + args.steps
    rows = []
    for step in range(n):
        input_ids, labels, position_ids, _, _ = make_batch(args, torch.device("cpu"), cfg.vocab_size, step)
        rows += [
            {"input_ids": input_ids[i], "labels": labels[i], "position_ids": position_ids[i]} for i in range(args.batch)
        ]
    times: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            sync(device)
            times.append(time.perf_counter())

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            targs = TrainingArguments(
                output_dir=tmp,
                per_device_train_batch_size=args.batch,
                max_steps=n,
                learning_rate=1e-5,
                lr_scheduler_type="constant",
                warmup_steps=0,
                weight_decay=0.0,
                max_grad_norm=1.0,
                optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch",
                bf16=True,
                gradient_checkpointing=False,
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                dataloader_num_workers=0,
                disable_tqdm=True,
                remove_unused_columns=False,
                seed=0,
                use_cpu=device.type == "cpu",
            )
            stack = lambda feats: {k: torch.stack([f[k] for f in feats]) for k in feats[0]}  # noqa: E731
            t0 = time.perf_counter()
            Trainer(model=model, args=targs, train_dataset=rows, data_collator=stack, callbacks=[Clock()]).train()
    finally:
        base_cfg.use_cache = saved_cache
    elapsed = times[-1] - times[args.warmup - 1] if args.warmup else times[-1] - t0
    tps = args.steps * args.batch * args.seq / elapsed
    return {
        "variant": "hf_trainer",
        "tokens_per_s": round(tps, 1),
        "step_s": round(elapsed / args.steps, 4),
        "mfu": None if peak is None else round(mfu(tps, flops_tok, peak), 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "warmup_s": round((times[args.warmup - 1] if args.warmup else t0) - t0, 1),
        "last_loss": losses[-1] if losses else None,
        "optimizer_steps": len(times),
    }


def loss_check(model, cfg, args, device):
    """Loss of one packed batch: isolated-documents HF path vs fast path vs plain causal."""
    batch = make_batch(args, device, cfg.vocab_size, 0)
    out = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        set_attn(model, "sdpa")
        out["hf_packed"] = float(hf_loss(model, batch, use_cache_false=True))
        out["hf_causal"] = float(hf_loss(model, batch, use_cache_false=False))
        set_attn(model, "doc_varlen")
        out["fast"] = float(fast_loss(model, batch, args.chunk_size))
    out["num_documents_per_row"] = len(batch[4])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny config for a CPU smoke test")
    ap.add_argument("--seq", type=int, default=None, help="packed row length (default 4096; tiny 256)")
    ap.add_argument("--batch", type=int, default=1, help="packed rows per optimizer step")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per variant (default 4; tiny 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; tiny 3)")
    ap.add_argument("--chunk-size", type=int, default=2048, help="tokens per chunk of the chunked loss")
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS))
    ap.add_argument("--deadline-s", type=float, default=420.0, help="skip remaining variants after this")
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    args = ap.parse_args(argv)
    args.seq = args.seq or (256 if args.tiny else 4096)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 4)
    args.steps = args.steps or (3 if args.tiny else 10)
    start = time.perf_counter()

    import peft
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attention = register_attention()
    t0 = time.perf_counter()
    model, cfg = build_model(args, device)
    build_s = time.perf_counter() - t0
    trainable, frozen = matmul_param_counts(model)
    flops_tok = flops_per_token(cfg, num_trainable=trainable, num_frozen=frozen, seq_len=args.seq, lora=True)
    peak = peak_flops(device)
    env = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "seq": args.seq,
        "batch": args.batch,
        "warmup": args.warmup,
        "steps": args.steps,
        "chunk_size": args.chunk_size,
        "fast_attention": attention,
        "trainable_params": trainable,
        "frozen_matmul_params": frozen,
        "flops_per_token": flops_tok,
        "peak_flops": peak,
        "build_s": round(build_s, 1),
        "argv": sys.argv[1:],
    }
    print(json.dumps({"env": env}), flush=True)
    check = loss_check(model, cfg, args, device)
    print(json.dumps({"loss_check": check}), flush=True)

    results = []
    for name in args.variants.split(","):
        if time.perf_counter() - start > args.deadline_s:
            results.append({"variant": name, "skipped": "deadline"})
            print(json.dumps(results[-1]), flush=True)
            continue
        try:
            if name == "hf_trainer":  # last in the default order: Trainer may leave state on the model
                results.append(run_hf_trainer(model, cfg, args, device, flops_tok, peak))
            else:
                results.append(run_variant(name, model, cfg, args, device, flops_tok, peak))
        except Exception as exc:  # noqa: BLE001 - report and go on with the next variant
            msg = f"{type(exc).__name__}: {exc}"
            results.append({"variant": name, "error": msg[:500]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps(results[-1]), flush=True)

    print("\n| variant | tokens/s | MFU | step s | peak mem GiB | warmup+compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        if "tokens_per_s" in r:
            m = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(
                f"| {r['variant']} | {r['tokens_per_s']:.0f} | {m} | {r['step_s']} | {r['peak_mem_gib']} | {r['warmup_s']} |"
            )
        else:
            print(f"| {r['variant']} | {r.get('error') or r.get('skipped')} | | | | |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "loss_check": check, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
