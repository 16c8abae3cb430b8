"""Test hooks of the training loop: fault injection and the per-rank sample ledger.

The loop calls a `TrainHooks`; in production (neither variable below set) it is `NO_HOOKS`, whose
methods do nothing. The failure-injection tests (tests/integration/test_resume.py and friends)
set the environment and get `TestHooks`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


class TrainHooks:
    """What the loop tells its hooks; every method is a no-op here (production)."""

    def before_step(self, step: int) -> None:
        """About to run optimizer step `step`."""

    def nan(self, step: int) -> bool:
        """Whether this rank's loss becomes NaN at step `step`."""
        return False

    def in_checkpoint(self, phase: str, step: int) -> None:
        """Writing checkpoint step_`step` reached `phase` (see checkpoint.save_checkpoint)."""

    def started(self, step: int, digest: Callable[[], str]) -> None:
        """The run (re)starts at `step`; `digest()`: sha256 of this rank's trainable shards."""

    def after_step(self, entry: Callable[[], dict]) -> None:
        """A step ended; `entry()` builds its ledger record (only called when a ledger is kept)."""


NO_HOOKS = TrainHooks()


class Faults:
    """Test hooks for fault injection, read from the environment (never set in production).

    LLAMA_TRAIN_FAULT: comma-separated `kind:key=value:...` items, each for one rank and step:
      kill:rank=R:step=S            SIGKILL rank R when it is about to run step S
      sigterm:rank=R:step=S         send SIGTERM to rank R itself before step S (preemption)
      nan:rank=R:step=S             rank R's loss is NaN at step S
      hang:rank=R:step=S            rank R stops (sleeps, ignoring SIGTERM) before step S: a hung rank
      ckpt_kill:rank=R:step=S:phase=P   SIGKILL rank R while writing checkpoint step_S, at phase P
                                    (weights_written | files_synced | renamed; see checkpoint.py)
      any item may add `:attempt=N`: only in torchrun restart N (TORCHELASTIC_RESTART_COUNT)
    LLAMA_TRAIN_LEDGER=1: every rank appends {step, ids, lr, loss, skipped, digest} per step to
      <output_dir>/ledger/rank<R>.jsonl (digest: sha256 of its trainable parameter shards).
    """

    def __init__(self, rank: int, spec: str | None = None):
        self.rank = rank
        self.items = []
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        for item in filter(None, (spec if spec is not None else os.environ.get("LLAMA_TRAIN_FAULT", "")).split(",")):
            kind, *kvs = item.strip().split(":")
            kv = dict(x.split("=", 1) for x in kvs)
            if kv.get("attempt", attempt) == attempt:
                self.items.append((kind, int(kv.get("rank", 0)), int(kv.get("step", 0)), kv.get("phase")))

    def _hit(self, kind: str, step: int, phase: str | None = None) -> bool:
        return any(k == kind and r == self.rank and s == step and p == phase for k, r, s, p in self.items)

    def before_step(self, step: int) -> None:
        if self._hit("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._hit("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._hit("hang", step):
            while True:  # like a rank stuck in a kernel or a deadlock: only SIGKILL ends it
                time.sleep(3600)

    def nan(self, step: int) -> bool:
        return self._hit("nan", step)

    def in_checkpoint(self, phase: str, step: int) -> None:
        if self._hit("ckpt_kill", step, phase):
            os.kill(os.getpid(), signal.SIGKILL)


class Ledger:
    """Per-rank record of the samples and result of every step (test hook, LLAMA_TRAIN_LEDGER=1)."""

    def __init__(self, out: Path, rank: int):
        self.path = out / "ledger" / f"rank{rank}.jsonl"
        self.enabled = os.environ.get("LLAMA_TRAIN_LEDGER") == "1"

    def rewind(self, step: int) -> None:
        """Drop entries after `step` (the resumed step): the ledger is the effective history."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        self.path.write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= step))

    def write(self, entry: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
                fh.flush()
                os.fsync(fh.fileno())


class TestHooks(TrainHooks):
    """Faults and the ledger, from LLAMA_TRAIN_FAULT and LLAMA_TRAIN_LEDGER."""

    __test__ = False  # not a pytest class

    def __init__(self, out: Path, rank: int):
        self.faults = Faults(rank)
        self.ledger = Ledger(out, rank)

    def before_step(self, step: int) -> None:
        self.faults.before_step(step)

    def nan(self, step: int) -> bool:
        return self.faults.nan(step)

    def in_checkpoint(self, phase: str, step: int) -> None:
        self.faults.in_checkpoint(phase, step)

    def started(self, step: int, digest: Callable[[], str]) -> None:
        self.ledger.rewind(step)
        if step == 0:
            self.ledger.write({"step": 0, "digest": digest()})

    def after_step(self, entry: Callable[[], dict]) -> None:
        if self.ledger.enabled:
            self.ledger.write(entry())


def hooks_from_env(out: Path, rank: int) -> TrainHooks:
    """`TestHooks` when a test set LLAMA_TRAIN_FAULT or LLAMA_TRAIN_LEDGER, else `NO_HOOKS`."""
    if os.environ.get("LLAMA_TRAIN_FAULT") or os.environ.get("LLAMA_TRAIN_LEDGER") == "1":
        return TestHooks(out, rank)
    return NO_HOOKS
