"""The serving-target lint of an adapter: what vLLM and NIM accept (DESIGN.md "Contracts between
stages"). `lint_adapter` returns findings (errors stop an export unless allowed; warnings are
reported); export.py and the gate's format check run it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llama_train import adapter
from llama_train.errors import ExportRefused, ExportUsageError

# vLLM's `MaxLoRARanks` (vllm/config/lora.py); NIM passes --max-lora-rank through to vLLM.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
SERVABLE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = ("vllm", "nim")


@dataclass(frozen=True)
class Finding:
    """One lint result. `severity` "error" blocks the export; "warning" is only reported."""

    rule: str
    severity: Literal["error", "warning"]
    targets: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.rule} ({', '.join(self.targets)}): {self.message}"


def required_max_lora_rank(r: int) -> int:
    """Smallest vLLM --max-lora-rank value that serves rank `r`."""
    for value in VLLM_LORA_RANKS:
        if value >= r:
            return value
    raise ExportRefused(f"LoRA rank {r} is above vLLM's largest --max-lora-rank ({VLLM_LORA_RANKS[-1]})")


def _module_names_in_weights(keys: Iterable[str]) -> set[str]:
    """`...layers.0.self_attn.q_proj.lora_A.weight` -> `q_proj`; other (non-LoRA) keys by leaf."""
    names = set()
    for key in keys:
        m = re.search(r"\.([A-Za-z0-9_]+)\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)\b", key)
        if m:
            names.add(m.group(1))
    return names


def lint_adapter(
    adapter_dir: str | Path,
    targets: Iterable[str] | None = ("vllm", "nim"),
    *,
    max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
) -> list[Finding]:
    """Check a PEFT adapter directory against what the serving `targets` load.

    `max_lora_rank` is the --max-lora-rank the vLLM server will run with (vLLM's default: 16).
    Returns every finding (empty list = servable); never raises for a rule violation.
    """
    adapter_dir = Path(adapter_dir)
    targets = tuple(targets or ())
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ExportUsageError(f"unknown serving target(s) {unknown} (--target); choose from {list(TARGETS)}")
    if not targets:
        return []
    findings: list[Finding] = []

    def add(rule: str, message: str, severity: Literal["error", "warning"] = "error", only=None):
        findings.append(Finding(rule, severity, tuple(only or targets), message))

    present = sorted(p.name for p in adapter_dir.iterdir()) if adapter_dir.is_dir() else []
    if adapter.CONFIG_FILE not in present:
        add(
            "files",
            f"{adapter_dir} has no adapter_config.json (found: {present or 'nothing'}); "
            "export from a run's adapter/ directory or a checkpoint that holds an adapter",
        )
        return findings
    if adapter.WEIGHTS_FILE not in present:
        bins = [p for p in present if p.endswith(".bin")]
        found = f"found {bins}" if bins else f"found {present}"
        add(
            "files",
            f"adapter_model.safetensors is missing ({found}); vLLM/NIM exports must be "
            "safetensors: re-save with `model.save_pretrained(dir, safe_serialization=True)`",
        )
    for problem in adapter.unreadable_files(adapter_dir):
        add("readable", problem)
    if any(f.rule == "readable" for f in findings):
        return findings  # the rules below need both files parsed
    extra = [p for p in present if p not in adapter.FILES]
    if any(p.endswith(".bin") for p in extra):
        add(
            "files",
            f"pickle weight files {[p for p in extra if p.endswith('.bin')]} next to the "
            "adapter; only adapter_config.json + adapter_model.safetensors are allowed (export "
            "copies those two only)",
            severity="warning",
        )

    cfg = json.loads((adapter_dir / adapter.CONFIG_FILE).read_text())
    keys = (
        adapter.weight_keys(adapter_dir / adapter.WEIGHTS_FILE) if (adapter_dir / adapter.WEIGHTS_FILE).exists() else []
    )

    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        add(
            "peft_type",
            f"peft_type is {peft_type!r}; vLLM and NIM serve LoRA adapters only "
            "(set lora.enabled: true with plain LoRA)",
        )
    if cfg.get("use_dora"):
        add(
            "no_dora",
            "use_dora is true (DoRA); vLLM and NIM cannot serve DoRA adapters. "
            "Retrain with lora.use_dora: false, or export the `merged` format instead",
        )
    mts = cfg.get("modules_to_save") or []
    if mts:
        add(
            "no_modules_to_save",
            f"modules_to_save is {list(mts)}; vLLM and NIM load only LoRA "
            "matrices, so fully trained modules would be silently dropped. Retrain with "
            "lora.modules_to_save: [], or export the `merged` format instead",
        )
    special = sorted({k for k in keys if re.search(r"(lm_head|embed_tokens)", k)})
    if special:
        add(
            "no_lm_head_or_embeddings",
            f"the weights hold lm_head/embed_tokens tensors "
            f"({special[:3]}{' ...' if len(special) > 3 else ''}); vLLM/NIM adapters may only touch "
            f"{', '.join(SERVABLE_MODULES)}. Remove them from lora.target_modules / modules_to_save",
        )
    bias = cfg.get("bias", "none")
    if bias != "none":
        add(
            "bias_none",
            f'bias is {bias!r}; vLLM and NIM need bias "none" (trained biases are not '
            'loaded). Retrain with bias "none"',
        )
    if cfg.get("lora_bias"):
        add("bias_none", "lora_bias is true; vLLM and NIM do not load LoRA bias terms")

    r = int(cfg.get("r", 0))
    ranks = {r, *(int(v) for v in (cfg.get("rank_pattern") or {}).values())}
    bad = sorted(x for x in ranks if x not in VLLM_LORA_RANKS)
    if bad:
        add(
            "rank_allowed",
            f"LoRA rank {bad if len(bad) > 1 else bad[0]} is not one vLLM/NIM "
            f"accept ({', '.join(map(str, VLLM_LORA_RANKS))}); set lora.r to one of them, e.g. "
            f"{required_max_lora_rank(max(bad)) if max(bad) <= VLLM_LORA_RANKS[-1] else 512}",
        )
    top = max(ranks)
    if "vllm" in targets and top > max_lora_rank:
        default = " (vLLM's default)" if max_lora_rank == VLLM_DEFAULT_MAX_LORA_RANK else ""
        need = required_max_lora_rank(top) if top <= VLLM_LORA_RANKS[-1] else top
        add(
            "max_lora_rank",
            f"LoRA rank {top} exceeds max_lora_rank {max_lora_rank}{default}; "
            f"vLLM refuses the adapter unless started with `--max-lora-rank {need}` (and set "
            f"export.max_lora_rank: {need} in the recipe), or retrain with lora.r <= {max_lora_rank}",
            only=("vllm",),
        )
    if "nim" in targets and top > VLLM_DEFAULT_MAX_LORA_RANK:
        add(
            "max_lora_rank",
            f"LoRA rank {top} is above 16; start NIM with a max LoRA rank >= {top} "
            "(NIM_MAX_LORA_RANK, passed to vLLM as --max-lora-rank)",
            severity="warning",
            only=("nim",),
        )

    tm = cfg.get("target_modules") or []
    if isinstance(tm, str):
        declared = {tm} if tm in SERVABLE_MODULES else set()
        if not declared and not keys:
            add(
                "target_modules",
                f"target_modules is the regex {tm!r}; give a list of module names within {', '.join(SERVABLE_MODULES)}",
            )
    else:
        declared = set(tm)
    outside = sorted((declared | _module_names_in_weights(keys)) - set(SERVABLE_MODULES))
    if outside:
        add(
            "target_modules",
            f"adapter targets {outside}; vLLM and NIM serve LoRA on "
            f"{', '.join(SERVABLE_MODULES)} only. Set lora.target_modules to a subset of those",
        )
    return findings
