"""Figures of a run drawn from its metrics.jsonl (matplotlib, no pyplot global state): the loss
curve the tracker logs as an artifact when the run finishes.
"""

from __future__ import annotations

from pathlib import Path

from llama_train.tracking.client import warn
from llama_train.tracking.sync import read_metrics_file

LOSS_CURVE_FILE = "loss_curve.png"


def plot_loss_curve(output_dir: Path) -> Path | None:
    """`<output_dir>/loss_curve.png` of every loss metric in metrics.jsonl; None when there is no
    loss yet or it cannot be drawn (a warning: tracking must never stop training)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics_file(output_dir):
        for key, value in row.get("metrics", {}).items():
            if "loss" in key and isinstance(value, (int, float)):
                series.setdefault(key, []).append((int(row["step"]), float(value)))
    if not series:
        return None
    try:
        return plot_curves(series, output_dir / LOSS_CURVE_FILE)
    except Exception as exc:  # noqa: BLE001  (tracking must never stop training)
        warn(f"loss curve not drawn: {exc}")
        return None


def plot_curves(series: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """PNG of each series against step; Figure + Agg canvas, no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, points in sorted(series.items()):
        points.sort()
        ax.plot(
            [s for s, _ in points],
            [v for _, v in points],
            label=key,
            marker="." if len(points) < 50 else None,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
