"""Rank-0 progress: a rich progress bar on a terminal, plain log lines otherwise (CI, k8s logs),
and `log`, the trainer's rank-0 message line."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, *, total: int, start: int = 0, enabled: bool = True, every_s: float = 10.0):
        self.total, self.start, self.enabled, self.every_s = total, start, enabled, every_s
        self._bar = None
        self._last_line = 0.0
        self._t0 = time.perf_counter()

    def __enter__(self):
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("train", total=self.total, completed=self.start, info="")
        return self

    def update(self, step: int, *, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.every_s or step == self.total or step == self.start + 1:
            done = step - self.start
            eta = (now - self._t0) / max(done, 1) * (self.total - step)
            print(f"step {step}/{self.total}  {info}  eta {eta:.0f}s", file=sys.stderr, flush=True)
            self._last_line = now

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)


def log(ctx, msg: str) -> None:
    """Print `msg` on stderr from rank 0 only (`ctx`: a dist.DistContext)."""
    if ctx.is_main:
        from rich.console import Console

        Console(stderr=True).print(f"[bold cyan]llama-train[/] {msg}", highlight=False)
