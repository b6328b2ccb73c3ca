"""What a shardvision process's exit code means, and so what a scheduler or a person should do.

docs/failures.md gives the same table with what to do for each. Codes other than these are a
crash (1: an unexpected exception, with its traceback) or a kill by a signal (128 + N from a
shell, -N from Python's subprocess)."""

from enum import IntEnum


class ExitCode(IntEnum):
    SUCCESS = 0  # the run finished its work: trained, evaluated, exported
    CRASH = 1  # an unexpected exception (Python's own code for one): read the traceback
    USER_ERROR = 2  # bad config, data, checkpoint or weights: one line names the key, file or value
    NONFINITE_LOSS = 3  # the loss became NaN/inf (loop.nonfinite_loss: error); the checkpoints before it are intact
    PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; requeue with --resume auto
    HANG = 124  # a rank made no progress for distributed.hang_timeout_minutes (as timeout(1) exits)
