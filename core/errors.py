"""Every failure shardvision knows, in one hierarchy: the command line (core/entry.py) turns a
`KnownFailure` into its `exit_code` and one line, instead of a traceback (core/exit_codes.py says
what each code asks of a scheduler or a person). Anything else is a crash, with its traceback."""

from __future__ import annotations

from core.exit_codes import ExitCode


class KnownFailure(Exception):
    exit_code = ExitCode.CRASH


class UserError(KnownFailure):
    """Bad input: the message names the key, file or value at fault and what to do."""

    exit_code = ExitCode.USER_ERROR


class ConfigError(UserError, ValueError):
    """A config problem a user can fix; the message names the key and where it came from."""


class DataError(UserError, ValueError):
    """A sample that cannot be used; the message names the file (or row) and the offending value."""


class WeightsError(UserError, ValueError):
    """Weights that cannot be loaded; the message names the file and the keys at fault."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used; the message names the folder or file at fault."""


class RunFolderError(UserError, FileNotFoundError):
    """A folder named as a run that holds none (no metrics.jsonl)."""


class NonFiniteLossError(KnownFailure, RuntimeError):
    """The loss became NaN or inf (loop.nonfinite_loss: error); the checkpoints before it are intact."""

    exit_code = ExitCode.NONFINITE_LOSS


class Preempted(KnownFailure):
    """Raised after a stop signal once the checkpoint of the current step is written. `signal`:
    the one this rank received (None when another rank's stopped it), so a submitit job requeues
    on its preemption signal and not on a cancellation's SIGTERM."""

    exit_code = ExitCode.PREEMPTED

    def __init__(self, message: str, signal: str | None = None):
        super().__init__(message)
        self.signal = signal

    def noted(self, note: str) -> Preempted:
        """The same stop, its message extended by what became of the run's state."""
        return Preempted(f"{self}; {note}", self.signal)


# Failures inside one mechanism, which its caller turns into a CheckpointError naming the
# checkpoint (or, for a failed background write, lets stop the run as a crash).


class CheckpointWriteError(RuntimeError):
    """A background save that could not be written (disk full, permissions): the run stops."""


class PerParameterStateError(RuntimeError):
    """Saved per-parameter state that does not fit this run's model or optimizer; the message says what differs."""


class WeightAverageError(RuntimeError):
    """A checkpoint whose average cannot be restored here; the message names the file."""
