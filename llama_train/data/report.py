"""Preflight report of prepared data: counts per category, token-length histogram, packing
efficiency, and the recipe thresholds that turn it into a failure."""

from __future__ import annotations

import itertools

import numpy as np

from llama_train.config import Recipe
from llama_train.data.loader import padded_efficiency, row_lengths
from llama_train.data.packing import best_fit_decreasing, packing_efficiency
from llama_train.data.pipeline import Prepared, categories


def length_histogram(lengths: np.ndarray, seq_len: int) -> list[dict]:
    """Counts in power-of-two buckets up to seq_len, then one bucket for longer samples."""
    edges = [0]
    while edges[-1] * 2 < seq_len:
        edges.append(max(16, edges[-1] * 2))
    edges.append(seq_len)
    out = []
    for lo, hi in itertools.pairwise(edges):
        out.append({"min": lo + 1, "max": hi, "count": int(((lengths > lo) & (lengths <= hi)).sum())})
    out.append({"min": seq_len + 1, "max": None, "count": int((lengths > seq_len).sum())})
    return out


def build_report(recipe: Recipe, prepared: Prepared, *, cache: dict | None = None, world_size: int = 1) -> dict:
    d = recipe.data
    c = prepared.counts
    lengths = np.asarray(prepared.lengths, dtype=np.int64)
    trained = np.minimum(lengths, d.seq_len)
    rows_tokens = row_lengths(prepared.train)
    t = recipe.train
    # as the trainer batches the rows, for this job's number of ranks
    batching = {
        "micro_batch_size": t.micro_batch_size,
        "grad_accum_steps": t.grad_accum_steps,
        "world_size": world_size,
        "seed": t.seed,
        "shuffle": d.shuffle,
    }
    if d.packing:
        efficiency = float(sum(rows_tokens)) / max(1, len(rows_tokens) * d.seq_len)
        alternative = {"padded": padded_efficiency(trained, **batching)}
    else:
        efficiency = padded_efficiency(rows_tokens, group_by_length=d.group_by_length, **batching)
        alternative = {
            "packed": packing_efficiency(trained, best_fit_decreasing(trained, d.seq_len), d.seq_len)
            if trained.size
            else 0.0
        }
        if not d.group_by_length:
            alternative["group_by_length"] = padded_efficiency(rows_tokens, group_by_length=True, **batching)
    report = {
        "rows": c["rows"],
        "kept": c["kept"],
        "dropped": c["dropped"],
        "dropped_fraction": c["dropped"] / max(1, c["rows"]),
        "counts": {k: c.get(k, 0) for k in categories(recipe)},
        "truncated": c["truncated"],
        "overlength_policy": d.overlength,
        "eval_held_out": c["eval_held_out"],
        "examples": prepared.examples,
        "sources": prepared.sources,
        "tokens": {
            "samples": int(lengths.size),
            "total": int(trained.sum()),
            "min": int(lengths.min()) if lengths.size else 0,
            "mean": float(lengths.mean()) if lengths.size else 0.0,
            "p50": int(np.percentile(lengths, 50)) if lengths.size else 0,
            "p95": int(np.percentile(lengths, 95)) if lengths.size else 0,
            "max": int(lengths.max()) if lengths.size else 0,
        },
        "length_histogram": length_histogram(lengths, d.seq_len),
        "train_rows": c["train_rows"],
        "packing": d.packing,
        "seq_len": d.seq_len,
        "efficiency": efficiency,
        "efficiency_if": alternative,
        "cache": cache,
    }
    report["failures"] = failures(recipe, report)
    report["ok"] = not report["failures"]
    return report


def failures(recipe: Recipe, report: dict) -> list[str]:
    d = recipe.data
    out = []
    if report["kept"] == 0:
        out.append(f"no usable training rows out of {report['rows']}")
    if report["dropped_fraction"] > d.max_dropped_fraction:
        out.append(
            f"{report['dropped']} of {report['rows']} rows dropped ({report['dropped_fraction']:.2%}) > "
            f"data.max_dropped_fraction={d.max_dropped_fraction}; fix the rows listed or raise the threshold"
        )
    if d.min_packing_efficiency is not None and report["efficiency"] < d.min_packing_efficiency:
        out.append(
            f"efficiency {report['efficiency']:.3f} < data.min_packing_efficiency="
            f"{d.min_packing_efficiency}; "
            + (
                "lower the threshold, or raise data.seq_len (more documents fit a row)"
                if d.packing
                else "enable data.packing (or data.group_by_length), or lower the threshold"
            )
        )
    return out


def format_report(report: dict) -> str:
    lines = [
        (
            f"rows read {report['rows']}: kept {report['kept']}, dropped {report['dropped']} "
            f"({report['dropped_fraction']:.2%}), held out for eval {report['eval_held_out']}"
        )
    ]
    for k, n in report["counts"].items():
        extra = f" (policy {report['overlength_policy']})" if k == "overlength" else ""
        lines.append(f"  {k:<15} {n}{extra}")
        for ex in report["examples"].get(k, []):
            lines.append(f"      {ex}")
    lines.append(f"  {'truncated':<15} {report['truncated']}")
    t = report["tokens"]
    lines.append(
        f"tokens per sample: min {t['min']}, mean {t['mean']:.1f}, p50 {t['p50']}, p95 {t['p95']}, "
        f"max {t['max']} (seq_len {report['seq_len']})"
    )
    peak = max([b["count"] for b in report["length_histogram"]] + [1])
    for b in report["length_histogram"]:
        label = f"{b['min']}-{b['max']}" if b["max"] else f">{b['min'] - 1}"
        lines.append(f"  {label:>11} {b['count']:>8} {'#' * round(40 * b['count'] / peak)}")
    other = ", ".join(f"{k} {v:.3f}" for k, v in report["efficiency_if"].items())
    lines.append(
        f"{report['train_rows']} train rows, {'packed' if report['packing'] else 'padded'} "
        f"efficiency {report['efficiency']:.3f} (non-pad tokens / slots; if {other})"
    )
    if report.get("cache"):
        lines.append(f"cache {'hit' if report['cache']['hit'] else 'built'}: {report['cache']['path']}")
    lines.append("OK" if report["ok"] else "FAILED:\n  " + "\n  ".join(report["failures"]))
    return "\n".join(lines)
