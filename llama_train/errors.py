"""Every process exit code, and the exceptions that map to them (README "Exit codes" mirrors
`EXIT_CODES`; a unit test keeps them equal).

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


class ExportError(LlamaTrainError):
    """The run cannot be exported: files missing or unreadable (exit 1, "other usage error")."""

    exit_code = 1


class ExportUsageError(ExportError):
    """A flag is invalid: --format, --target, --out, --adapter-name (exit 2, "CLI usage")."""

    exit_code = 2


class ExportRefused(ExportError):
    """The adapter breaks a serving target's rules (the lint); exit 7 is reserved for this."""

    exit_code = 7


class GateError(LlamaTrainError):
    """The gate could not run (bad candidate reference, no recipe). A failed check is not an error:
    it is a report with passed=False (exit code 10)."""

    exit_code = 9


class Preempted(LlamaTrainError):
    """SIGTERM received; a checkpoint was saved. Retried by the operator."""

    exit_code = 143


class InfrastructureError(LlamaTrainError):
    """A rank died, a collective timed out, a filesystem failed. Retried by the operator."""

    exit_code = 130


GATE_FAILED = 10  # not an exception: the gate ran and wrote its report, and a check failed

# code: (meaning, retried by a PyTorchJob with restartPolicy ExitCode)
EXIT_CODES: dict[int, tuple[str, bool]] = {
    0: ("success", False),
    1: ("other usage error", False),
    2: ("invalid recipe, override or CLI usage", False),
    3: ("data missing, malformed, or over a preflight threshold", False),
    4: ("the recipe cannot run on this hardware / world size", False),
    5: (
        "a checkpoint cannot be resumed (recipe or data changed, damaged files), or `output_dir` holds "
        "an earlier run and nothing is resumed",
        False,
    ),
    6: ("too many consecutive non-finite (NaN/Inf) steps", False),
    7: ("export refused: the adapter breaks a serving target's rules (see the lint message)", False),
    9: (
        "the gate could not run (bad candidate reference or missing registry version, no recipe, "
        "`--report-dir` a file, `--promote` without a registered model); checked before any check runs",
        False,
    ),
    GATE_FAILED: (
        "the gate ran and the candidate failed a check (see gate_report.md; unreadable files fail `format`)",
        False,
    ),
    130: ("infrastructure: a rank died, a collective timed out, the agent failed", True),
    143: ("preempted (SIGTERM): a checkpoint was saved first", True),
}
