"""Exceptions that map to process exit codes (the contract in README "Exit codes").

Bad input (recipe, data, usage) exits 1-127 so a PyTorchJob `restartPolicy: ExitCode` does not
retry it; preemption exits 143 (128 + SIGTERM) and other infrastructure failures >= 128, which
the operator retries.
"""

from __future__ import annotations


class LlamaTrainError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1


class RecipeError(LlamaTrainError):
    """The recipe file, an override or a combination of options is invalid."""

    exit_code = 2


class UsageError(LlamaTrainError):
    """A command-line flag has a value the command cannot use (the message names the flag)."""

    exit_code = 2


class DataError(LlamaTrainError):
    """Training or eval data is missing, malformed or fails preflight thresholds."""

    exit_code = 3


class PreflightError(LlamaTrainError):
    """The recipe cannot run on this hardware or world size."""

    exit_code = 4


class CheckpointError(LlamaTrainError):
    """A checkpoint cannot be resumed (recipe changed, incompatible world size, missing files)."""

    exit_code = 5


class NonFiniteError(LlamaTrainError):
    """Too many consecutive steps with a NaN/Inf loss or gradient norm."""

    exit_code = 6


class Preempted(LlamaTrainError):
    """SIGTERM received; a checkpoint was saved. Retried by the operator."""

    exit_code = 143


class InfrastructureError(LlamaTrainError):
    """A rank died, a collective timed out, a filesystem failed. Retried by the operator."""

    exit_code = 130
