"""The gate's five checks of a candidate adapter (gate.py runs them in order and writes the
report): format (files, hashes, lint), load (PEFT on the base, finite weights), quality (held-out
metrics against the base and the champion), behaviour (generations end at end-of-turn), serving
(the real server answers the OpenAI client)."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llama_train import adapter
from llama_train.artifacts import MANIFEST_FILE, ExportManifest
from llama_train.config import Recipe

REPORT_FILES = {MANIFEST_FILE, "gate_report.json", "gate_report.md"}


@dataclass
class Check:
    name: str
    status: str  # passed | failed | skipped
    message: str = ""
    figures: dict = field(default_factory=dict)


@dataclass
class Candidate:
    ref: str
    adapter_dir: Path
    manifest: ExportManifest | None
    report_dir: Path
    registry_name: str | None = None
    version: str | None = None
    manifest_error: str | None = None  # manifest.json exists but cannot be read: a failed format check


def check_format(c: Candidate, recipe: Recipe) -> Check:
    from llama_train.adapter_lint import lint_adapter

    problems = [c.manifest_error] if c.manifest_error else []
    present = {p.name for p in c.adapter_dir.iterdir() if p.is_file()}
    missing, extra = set(adapter.FILES) - present, present - set(adapter.FILES) - REPORT_FILES
    if missing:
        problems.append(f"missing {sorted(missing)}")
    if extra:
        problems.append(f"unexpected files {sorted(extra)} (only {sorted(adapter.FILES)}; no .bin/.pt)")
    tampered = []
    if c.manifest is not None:
        base = c.adapter_dir.parent if (c.adapter_dir.parent / "manifest.json").exists() else c.adapter_dir
        for rel, digest in c.manifest.files.items():
            p = base / rel
            if not p.is_file() or adapter.sha256_file(p) != digest:
                tampered.append(rel)
        if tampered:
            problems.append(f"sha256 mismatch against manifest.json: {tampered} (file changed after export)")
    # A truncated safetensors or broken JSON fails here, whatever the recipe's export.targets,
    # rather than crashing the lint or the load check.
    unreadable = adapter.unreadable_files(c.adapter_dir)
    problems += unreadable
    findings = (
        []
        if unreadable
        else [
            f
            for f in lint_adapter(c.adapter_dir, recipe.export.targets, max_lora_rank=recipe.export.max_lora_rank)
            if f.severity == "error"
        ]
    )
    problems += [str(f) for f in findings]
    figures = {
        "manifest": c.manifest is not None,
        "lint_errors": len(findings),
        "tampered": tampered,
        "unreadable": len(unreadable),
    }
    if problems:
        return Check("format", "failed", "; ".join(problems), figures)
    note = "" if c.manifest is not None else " (no manifest.json: hashes not checked)"
    return Check("format", "passed", f"file set ok, lint ok for {recipe.export.targets}{note}", figures)


@dataclass
class Loaded:
    model: object  # PeftModel with adapters "candidate" (+ "champion")
    tokenizer: object
    base_path: str


def check_load(c: Candidate, recipe: Recipe) -> tuple[Check, Loaded | None]:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from llama_train.model import load_base_model, load_tokenizer, resolve_base_path

    base_path = (c.manifest.base_model if c.manifest else None) or resolve_base_path(recipe)
    weights = load_file(str(c.adapter_dir / adapter.WEIGHTS_FILE))
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if not weights:
        return Check("load", "failed", "adapter_model.safetensors holds no tensors (empty adapter)"), None
    try:
        tokenizer = load_tokenizer(recipe, base_path)
        base = load_base_model(recipe.model, base_path)
        model = PeftModel.from_pretrained(base, str(c.adapter_dir), adapter_name="candidate")
    except Exception as exc:  # shape mismatch, missing keys, unreadable config
        return Check("load", "failed", f"PEFT could not load the adapter on {base_path}: {first_line(exc)}"), None
    if bad:
        return Check(
            "load",
            "failed",
            f"non-finite (NaN/Inf) values in {len(bad)} tensor(s), e.g. {bad[0]}",
            {"non_finite_tensors": len(bad)},
        ), None
    model.eval()
    n = sum(v.numel() for v in weights.values())
    return (
        Check(
            "load",
            "passed",
            f"{len(weights)} tensors ({n:,} values) loaded on {base_path}, all finite",
            {"tensors": len(weights), "values": n},
        ),
        Loaded(model, tokenizer, base_path),
    )


def first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:400]


def _eval_adapter(loaded: Loaded, recipe: Recipe, data, adapter: str | None) -> dict:
    from llama_train.evaluate import evaluate
    from llama_train.model import TrainModule

    if recipe.train.objective == "dpo":
        from llama_train.dpo import DPOModule, eval_preferences

        d = recipe.dpo
        if adapter is not None:
            loaded.model.set_adapter(adapter)
        module = DPOModule(
            loaded.model,
            beta=d.beta,
            loss=d.loss,
            label_smoothing=d.label_smoothing,
            policy_is_reference=adapter is None,
            chunk_size=recipe.train.loss_chunk_size,
        )
        return eval_preferences(
            module,
            data.eval,
            pad_id=loaded.tokenizer.pad_token_id,
            batch_size=recipe.train.micro_batch_size,
            device="cpu",
            attn_implementation=getattr(loaded.model.config, "_attn_implementation", None) or "sdpa",
        )
    module = TrainModule(loaded.model, chunk_size=recipe.train.loss_chunk_size)
    if adapter is None:
        with loaded.model.disable_adapter():
            result = evaluate(module, loaded.tokenizer, data.eval, data.eval_rows, recipe=recipe, device="cpu")
    else:
        loaded.model.set_adapter(adapter)
        result = evaluate(module, loaded.tokenizer, data.eval, data.eval_rows, recipe=recipe, device="cpu")
    result.pop("examples", None)
    return result


def check_quality(loaded: Loaded, recipe: Recipe, champion_dir: Path | None) -> tuple[Check, dict]:
    from llama_train.data.dataset import load_data

    data = load_data(recipe, loaded.tokenizer)
    if not data.eval:
        return Check("quality", "failed", "the recipe has no held-out eval data (data.eval)"), {}
    figures = {
        "candidate": _eval_adapter(loaded, recipe, data, "candidate"),
        "base": _eval_adapter(loaded, recipe, data, None),
    }
    if champion_dir is not None:
        loaded.model.load_adapter(str(champion_dir), adapter_name="champion")
        figures["champion"] = _eval_adapter(loaded, recipe, data, "champion")
        loaded.model.set_adapter("candidate")
    g = recipe.gate
    # a DPO candidate is gated on held-out pairs: the share whose chosen side it prefers
    metric = "preference_accuracy" if recipe.train.objective == "dpo" else g.metric
    cand, base = figures["candidate"][metric], figures["base"][metric]
    problems = []
    if not cand - base >= g.min_improvement_over_base:
        problems.append(
            f"{metric} {cand:.4f} does not beat the base ({base:.4f}) by "
            f"gate.min_improvement_over_base={g.min_improvement_over_base}"
        )
    if "champion" in figures:
        champ = figures["champion"][metric]
        if champ - cand > g.max_regression_vs_champion:
            problems.append(
                f"{metric} {cand:.4f} regresses the champion ({champ:.4f}) by more than "
                f"gate.max_regression_vs_champion={g.max_regression_vs_champion}"
            )
    if not math.isfinite(figures["candidate"]["loss"]):
        problems.append("candidate eval loss is not finite")
    summary = ", ".join(f"{who} {metric} {f[metric]:.4f} loss {f['loss']:.4f}" for who, f in figures.items())
    return Check(
        "quality",
        "failed" if problems else "passed",
        "; ".join(problems) or summary,
        {who: {metric: f[metric], "loss": f["loss"]} for who, f in figures.items()},
    ), figures


def check_behaviour(loaded: Loaded, recipe: Recipe, *, num_prompts: int = 8) -> Check:
    """Greedy generations through the chat template must be non-empty and stop at end-of-turn.
    One left-padded batch with a KV cache (a finished row is padded after its stop token)."""
    import torch

    from llama_train.data.chat import prompt_ids
    from llama_train.data.dataset import load_data
    from llama_train.evaluate import stop_token_ids

    tok = loaded.tokenizer
    data = load_data(recipe, tok)
    convs = [r["messages"] for r in data.eval_rows if r.get("messages")][:num_prompts]
    stops = set(stop_token_ids(tok))
    loaded.model.set_adapter("candidate")
    empty, unstopped = 0, 0
    prompts = [prompt_ids(conv, tok, chat_template=recipe.data.chat_template) for conv in convs]
    if prompts:
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p) :] = torch.tensor(p)
            mask[j, width - len(p) :] = 1
        with torch.no_grad():
            out = loaded.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=recipe.gate.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=sorted(stops),
            )
        for row in out[:, width:].tolist():
            text = tok.decode(row, skip_special_tokens=True).strip()
            empty += not text
            unstopped += not any(t in stops for t in row)
    figures = {"prompts": len(convs), "empty": empty, "no_end_of_turn": unstopped}
    if not convs:
        return Check("behaviour", "failed", "no chat eval rows to generate from", figures)
    if empty or unstopped:
        return Check(
            "behaviour",
            "failed",
            f"{empty} empty and {unstopped} without end-of-turn within "
            f"{recipe.gate.max_new_tokens} tokens, of {len(convs)} generations",
            figures,
        )
    return Check("behaviour", "passed", f"{len(convs)} generations non-empty and stopped at end-of-turn", figures)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_serving(loaded: Loaded, c: Candidate, *, timeout_s: float = 120.0) -> Check:
    """Start the real inference server with the adapter; one chat completion via the OpenAI client."""
    import httpx

    port = _free_port()
    env = dict(os.environ, LLAMA_TRAIN_API_KEY="gate-smoke-key")
    cmd = [
        sys.executable,
        "-m",
        "llama_train.serve",
        "--base",
        loaded.base_path,
        "--adapter",
        f"candidate={c.adapter_dir}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return Check("serving", "failed", f"server exited with {proc.returncode}: {proc.stdout.read()[-400:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            return Check("serving", "failed", f"server not ready within {timeout_s:.0f}s")
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key="gate-smoke-key", max_retries=0, timeout=60)
        models = [m.id for m in client.models.list().data]
        reply = client.chat.completions.create(
            model="candidate", max_tokens=16, temperature=0, messages=[{"role": "user", "content": "Sort: 321"}]
        )
        text = reply.choices[0].message.content or ""
        if "candidate" not in models or not text.strip():
            return Check("serving", "failed", f"models {models}; reply {text!r}")
        return Check(
            "serving",
            "passed",
            f"server answered as `candidate`: {text.strip()[:40]!r}",
            {"models": models, "completion_tokens": reply.usage.completion_tokens},
        )
    except Exception as exc:
        return Check("serving", "failed", f"OpenAI client call failed: {first_line(exc)}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
