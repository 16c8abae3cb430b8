"""Preemption: SIGTERM (Kubernetes evicting a pod, a spot instance reclaimed, Ctrl-\\ under
torchrun) is recorded, and the loop stops at the next step boundary once every rank agrees, saves a
checkpoint and exits 143 (trainer.py)."""

from __future__ import annotations

import signal


class SigtermFlag:
    """Records SIGTERM; the loop checks it at step boundaries (agreed across ranks)."""

    def __init__(self):
        self.raised = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
