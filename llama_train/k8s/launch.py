"""`python -m llama_train.k8s.launch [torchrun args] -m llama_train.train RECIPE ...`

This is torchrun (same parser, reads the same PET_* variables, same agent), except for its exit
code. Plain torchrun exits 1 whenever a rank fails or the agent is signalled (checked with torch
2.13: a rank exiting 143 or 2, and SIGTERM to torchrun, all give 1), so a PyTorchJob with
`restartPolicy: ExitCode` would never retry a preempted pod. Here the pod exits with:

- the exit code of the rank whose failure is the root cause, a signal death as 128 + signal. When
  one rank dies (say SIGKILL by the OOM killer), its peers fail too: their collective breaks and
  they exit 130, or their C++ teardown aborts (SIGABRT). torchrun stamps failures to the second
  and breaks ties by rank, so `get_first_failure()` often names rank 0's 130 instead of rank 1's
  137. Such consequential exits rank last here, and the exit codes of ranks that the agent itself
  ended afterwards (SIGTERM/SIGKILL of a hung rank) are not candidates (see `root_cause`);
- 128 + signal when the agent itself is signalled (SIGTERM on preemption -> 143);
- 130 (InfrastructureError) when the agent fails otherwise (rendezvous timeout, lost peer).

It also defaults TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with c10d rendezvous (elastic PyTorchJobs)
and --max-restarts, the workers otherwise share the agent's TCPStore across restarts and the
restarted group hangs in init_process_group (pytorch/pytorch#135712; checked with torch 2.13 on
2 gloo ranks). In-place restarts need c10d rendezvous: the static one (--master-port only) keeps
one store across restarts, and the restarted ranks read the dead ranks' addresses from it.
"""

from __future__ import annotations

import os
import signal
import sys

INFRASTRUCTURE_EXIT = 130  # llama_train.errors.InfrastructureError.exit_code


def exit_code_of_failure(exitcode: int) -> int:
    """ProcessFailure.exitcode is negative (-signal) when a rank died from a signal."""
    if exitcode < 0:
        return 128 + (-exitcode)
    return exitcode if 0 < exitcode < 256 else INFRASTRUCTURE_EXIT


# What a rank exits with when a peer died under it: InfrastructureError's 130, or SIGABRT when
# the native teardown of a broken process group aborts ("terminate called without an active
# exception"). A failure of this kind is the root cause only when every failure is of this kind.
CONSEQUENTIAL_EXITS = (INFRASTRUCTURE_EXIT, -int(signal.SIGABRT))


ENDED_BY_AGENT = "_llama_train_ended_by_agent"


def root_cause(failures: dict) -> tuple[int, object]:
    """(global rank, ProcessFailure) of the failure that caused the others: the ranks that failed on
    their own (not ended by the agent's cleanup), consequential exits last, then the earliest, then
    the lowest rank (torchrun's own order)."""
    own = {r: f for r, f in failures.items() if not getattr(f, ENDED_BY_AGENT, False)} or failures
    return min(own.items(), key=lambda kv: (kv[1].exitcode in CONSEQUENTIAL_EXITS, kv[1].timestamp, kv[0]))


def _mark_failures_ended_by_agent() -> None:
    """Once a rank fails, torchrun's SubprocessContext closes the others (SIGTERM, then SIGKILL
    after a grace period) and records their exit codes as failures too, with later timestamps
    only when the close took a second or more. Mark every failure recorded after `close()` began,
    so a hung rank that the agent killed (-9) is not taken for the cause of the peer's 130."""
    from torch.distributed.elastic.multiprocessing.api import SubprocessContext

    if getattr(SubprocessContext.close, "_llama_train", False):
        return
    close = SubprocessContext.close

    def marking_close(self, *args, **kwargs):
        before = set(self._failures)
        try:
            return close(self, *args, **kwargs)
        finally:
            self._llama_train_failed_before_close = before

    capture = SubprocessContext._capture_process_failures

    def marking_capture(self, done_local_ranks):
        capture(self, done_local_ranks)
        before = getattr(self, "_llama_train_failed_before_close", None)
        if before is not None:
            for local_rank, failure in self._failures.items():
                if local_rank not in before:
                    setattr(failure, ENDED_BY_AGENT, True)

    marking_close._llama_train = True
    SubprocessContext.close = marking_close
    SubprocessContext._capture_process_failures = marking_capture


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    _mark_failures_ended_by_agent()
    try:
        torchrun_main(argv)
    except ChildFailedError as exc:
        rank, failure = root_cause(exc.failures)
        if rank != exc.get_first_failure()[0]:  # torchrun's summary above names another rank
            print(
                f"llama_train.k8s.launch: root cause is rank {rank} (exitcode {failure.exitcode}); "
                "the other ranks failed after it",
                file=sys.stderr,
            )
        return exit_code_of_failure(failure.exitcode)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except Exception as exc:  # rendezvous errors and the like: the infrastructure, retried
        print(f"llama_train.k8s.launch: torchrun agent failed: {exc!r}", file=sys.stderr)
        return INFRASTRUCTURE_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())
