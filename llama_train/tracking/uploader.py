"""The tracker's background upload: one daemon thread running MLflow calls from a bounded queue,
so a training step never waits on the network and an unreachable server costs one timeout per
back-off window.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from llama_train.tracking.client import warn
from llama_train.tracking.sync import METRICS_FILE


class Uploader:
    """One daemon thread running MLflow calls from a bounded queue.

    A failed call is not retried (metrics are in metrics.jsonl; `track sync` fills gaps); after a
    failure, queued calls are dropped without trying for `backoff_s`, so an unreachable server
    costs one timeout per window instead of one per step.
    """

    def __init__(self, *, max_queue: int = 1000, backoff_s: float = 30.0):
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._backoff_s = backoff_s
        self._offline_until = 0.0
        self.num_failed = 0
        self.num_dropped = 0
        self.closing = False  # set by finish(): nothing is retried after the final items
        self._warned_full = False
        self._thread = threading.Thread(target=self._loop, name="llama-train-mlflow", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], what: str) -> None:
        try:
            self._queue.put_nowait((fn, what))
        except queue.Full:
            self.num_dropped += 1
            if not self._warned_full:
                self._warned_full = True
                warn(
                    "MLflow upload queue is full; dropping uploads (kept in metrics.jsonl, "
                    "run `llama-train track sync` later)"
                )

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                fn, what = item
                if isinstance(fn, threading.Event):
                    fn.set()
                    continue
                if time.monotonic() < self._offline_until:
                    self.num_dropped += 1
                    continue
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001  (tracking must never stop training)
                    self.num_failed += 1
                    self._offline_until = time.monotonic() + self._backoff_s
                    if self.closing:
                        warn(f"MLflow {what} failed ({type(exc).__name__}: {str(exc)[:200]})")
                    else:
                        warn(
                            f"MLflow {what} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                            f"training continues, retrying in {self._backoff_s:.0f} s; metrics "
                            f"are kept in {METRICS_FILE}"
                        )
            finally:
                self._queue.task_done()

    def retry_now(self) -> None:
        self._offline_until = 0.0

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far ran (or was dropped); False on timeout."""
        if not self._thread.is_alive():
            return True
        marker = threading.Event()
        try:
            self._queue.put((marker, "flush"), timeout=timeout)
        except queue.Full:
            return False
        return marker.wait(timeout)

    def close(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return not self._thread.is_alive()
