"""What every rank must decide together at each optimizer step: is the step applied, does the run
stop (a stop signal, a non-finite loss, a bad sample)?

Ranks that took different branches would wait forever in the next collective, so one small
all-reduce per optimizer step sums three flags over the ranks: [ranks whose window loss is not
finite, ranks that met a bad sample (data.bad_samples: error), ranks asked to stop]. Reading the
sum on the host waits for the device, so how soon it is read depends on loop.nonfinite_loss:

- skip: the step must be dropped before the last backward (DeepSpeed steps inside it), so the
  flags are read at once: one host sync per optimizer step.
- error: nothing needs the answer before the step, so the flags are read one step late, and the
  host never waits for the step it just queued. `settle()` reads them at once where it matters:
  before anything is logged or saved, and at the end of the epoch or run.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator

from core.data import BadSamples
from core.errors import NonFiniteLossError, Preempted

logger = logging.getLogger("shardvision")

# What SLURM and cloud schedulers send before a kill; SIGUSR2 is submitit's preemption/timeout signal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Agreement(NamedTuple):
    finite: bool  # the loss was finite on every rank
    bad_data: bool  # some rank met a sample it must stop for
    stop: bool  # some rank was asked to stop


def agreement_flags(accelerator: Accelerator, loss: torch.Tensor, bad_data: bool, stop_requested: bool) -> torch.Tensor:
    """This rank's three flags, summed over ranks by one small all-reduce. Stays on the device
    until read_agreement."""
    host = torch.tensor([float(bad_data), float(stop_requested)], device=loss.device)
    flags = torch.cat([(~torch.isfinite(loss.detach())).float().reshape(1), host])
    return accelerator.reduce(flags.to(accelerator.device), reduction="sum")


def read_agreement(flags: torch.Tensor) -> Agreement:
    """What agreement_flags summed, read on the host."""
    nonfinite, bad_data, stop = flags.tolist()
    return Agreement(nonfinite == 0, bad_data > 0, stop > 0)


@dataclass
class _Window:
    """An accumulation window's flags, all-reduced but not yet read on the host."""

    flags: torch.Tensor
    loss: torch.Tensor  # this rank's summed window loss, for the error message
    where: str  # the optimizer step and micro-batch the window ended at


class StepAgreement:
    """Owns the stop signal, the per-window flags and their reading. After `settle()`,
    `stop_requested` says whether any rank asked to stop; a non-finite loss (error mode) or a bad
    sample raises on every rank at once."""

    def __init__(self, accelerator: Accelerator, nonfinite_loss: str, bad_samples: BadSamples):
        self.accelerator = accelerator
        self.read_at_once = nonfinite_loss == "skip"
        self.bad_samples = bad_samples
        self.stop_signal: str | None = None  # received by this rank
        self.stop_requested = False  # by any rank, as far as read
        self._bad_data = False  # a bad sample met in the current window
        self._unread: _Window | None = None  # the previous window, read one step late
        self._closing: _Window | None = None  # the window being stepped

    def listen_for_stop_signals(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop_signal)

    def note(self, bad_sample_in_batch: bool) -> None:
        self._bad_data = self._bad_data or bad_sample_in_batch

    def close_window(self, window_loss: torch.Tensor, where: str) -> bool:
        """Start this window's all-reduce; True if its optimizer step is to be applied. Only the
        skip mode can answer False, and it reads the flags now to do so."""
        flags = agreement_flags(self.accelerator, window_loss, self._bad_data, self.stop_signal is not None)
        self._bad_data = False
        if self.read_at_once:
            return self._read(_Window(flags, window_loss, where))
        self._closing = _Window(flags, window_loss.clone(), where)
        return True

    def step_taken(self) -> None:
        """After the optimizer step: read the previous window's flags, keep this one's for later."""
        if self._closing is not None:
            self.settle()
            self._unread, self._closing = self._closing, None

    def settle(self) -> None:
        """Read whatever is still unread, waiting for the device if it must."""
        if self._unread is not None:
            window, self._unread = self._unread, None
            self._read(window)

    def stop_agreed(self) -> bool:
        """Whether any rank has been asked to stop, agreed now (one small all-reduce): for the
        evaluation, which has no optimizer step to carry the flag."""
        asked = torch.tensor([float(self.stop_signal is not None)], device=self.accelerator.device)
        self.stop_requested = self.stop_requested or self.accelerator.reduce(asked, reduction="sum").item() > 0
        return self.stop_requested

    def stop_reason(self) -> str:
        return f"stopped by {self.stop_signal or 'a signal on another rank'}"

    def preempted(self, where: str) -> Preempted:
        """What every rank raises once the stop is agreed, `where` saying where it stopped."""
        return Preempted(f"{self.stop_reason()} {where}", self.stop_signal)

    def _read(self, window: _Window) -> bool:
        agreement = read_agreement(window.flags)
        if agreement.bad_data:
            raise self.bad_samples.error()
        self.stop_requested = self.stop_requested or agreement.stop
        if agreement.finite:
            return True
        if not self.read_at_once:
            raise NonFiniteLossError(
                f"non-finite loss ({window.loss.item()}) at {window.where} on at least one rank. Lower optim.lr, "
                "set loop.clip_grad_norm, check the data, or set loop.nonfinite_loss=skip."
            )
        logger.warning("non-finite loss at %s: skipping this optimizer step", window.where)
        return False

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self.stop_signal = signal.Signals(signum).name
        logger.warning(
            "%s received: stopping after this optimizer step (or evaluation batch), with a checkpoint", self.stop_signal
        )
