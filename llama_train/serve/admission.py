"""Deadline-aware admission: a request joins the running batch only if the batch's requests that
can still finish in time keep finishing in time.

All rows of a batch advance one token per engine iteration, and an iteration takes longer the
more rows it decodes. Admitting every queued request at once (what a plain continuous batcher
does) can make every request of a burst miss its deadline together: 32 requests x 16 tokens on
2 CPU cores all got 504 and nothing was served. Here the engine learns how long an iteration
takes as a function of its rows (least squares over recent iterations) and how long prefill takes
per prompt token, and admits the next queued request only when every running row that is on
track (its remaining tokens at the current step time end before its deadline) stays on track
with the new rows and the new prompt's prefill added. Until it has measured larger batches it
grows the batch at most twofold per iteration from an initial window of INITIAL_ROWS (slow
start), so the first burst after start is measured before it is trusted. A request that cannot be admitted waits in the queue (FIFO) and
is admitted when rows finish, or gets its 504 at its deadline; it never makes the others late.

Remaining tokens are counted up to `max_tokens` (a row may stop earlier at EOS: the estimate is
conservative, never optimistic).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

INITIAL_ROWS = 4  # rows admitted together before any iteration has been measured


@dataclass(frozen=True)
class Pending:
    """A running (or prefilling) row, as admission sees it."""

    remaining_tokens: int
    deadline: float | None  # time.monotonic() seconds; None: no deadline


class StepTimes:
    """Seconds per engine iteration as a function of the rows it decodes, and seconds per
    prefilled prompt token, from the engine's own recent iterations."""

    def __init__(self, window: int = 256, prefill_alpha: float = 0.2):
        self.samples: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self.prefill_s_per_token: float | None = None
        self.prefill_alpha = prefill_alpha
        self.max_rows_seen = 0
        self._fit: tuple[float, float] | None = None

    def add_step(self, rows: int, seconds: float) -> None:
        if rows <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        self.samples.append((rows, seconds))
        self.max_rows_seen = max(self.max_rows_seen, rows)
        self._fit = None

    def add_prefill(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        rate = seconds / tokens
        old = self.prefill_s_per_token
        self.prefill_s_per_token = rate if old is None else old + self.prefill_alpha * (rate - old)

    def _coefficients(self) -> tuple[float, float] | None:
        """(a, c) of seconds = a + c * rows, a, c >= 0; None before the first sample."""
        if self._fit is not None or not self.samples:
            return self._fit
        n = len(self.samples)
        mean_b = sum(b for b, _ in self.samples) / n
        mean_t = sum(t for _, t in self.samples) / n
        var = sum((b - mean_b) ** 2 for b, _ in self.samples)
        if var > 0:
            c = sum((b - mean_b) * (t - mean_t) for b, t in self.samples) / var
            c = max(c, 0.0)
            a = max(mean_t - c * mean_b, 0.0)
        else:  # one batch size seen: assume the time grows in proportion to the rows (pessimistic upwards)
            a, c = 0.0, mean_t / mean_b
        self._fit = (a, c)
        return self._fit

    def step_seconds(self, rows: int) -> float | None:
        """Predicted seconds of an iteration decoding `rows` rows (None: nothing measured yet)."""
        fit = self._coefficients()
        if fit is None:
            return None
        a, c = fit
        return a + c * rows

    def prefill_seconds(self, tokens: int) -> float:
        return (self.prefill_s_per_token or 0.0) * tokens


def admits(
    times: StepTimes,
    running: list[Pending],
    *,
    new_rows: int,
    new_prompt_tokens: int,
    now: float,
    admitted_prompt_tokens: int = 0,
) -> bool:
    """Whether `new_rows` rows (prompt of `new_prompt_tokens` tokens, prefilled once per row) may
    join the batch now, after the requests already admitted in this iteration (in `running`, with
    `admitted_prompt_tokens` prompt tokens still to prefill before the next token). Always when
    nothing runs; else within the slow-start limit and only if every running row on track stays
    on track."""
    rows = len(running)
    if rows == 0:
        return True
    if rows + new_rows > max(2 * times.max_rows_seen, INITIAL_ROWS):
        return False  # slow start: a batch size not measured yet (not even half of it)
    now_step = times.step_seconds(rows)
    new_step = times.step_seconds(rows + new_rows)
    if now_step is None or new_step is None:
        return True
    delay = times.prefill_seconds(admitted_prompt_tokens + new_prompt_tokens * new_rows)
    for p in running:
        if p.deadline is None:
            continue
        if now + p.remaining_tokens * now_step > p.deadline:
            continue  # already late at today's pace: admission does not decide its fate
        if now + delay + p.remaining_tokens * new_step > p.deadline:
            return False
    return True
