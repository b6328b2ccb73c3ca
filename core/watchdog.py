"""Hang detection: a rank that makes no progress for too long reports where it is, then exits.

A rank stuck in a collective whose peer died or froze, in a save on a stalled filesystem, or on a
deadlocked loader worker otherwise waits until the backend's collective timeout (an hour by
default), and then dies with a message that says nothing about why. The trainer instead calls
`beat(phase, step)` as it moves on (each micro-batch, each eval batch, before and after a save). A
thread checks the time since the last beat; past the limit it writes every thread's Python stack
(faulthandler) to `<output_dir>/hang-<rank>.txt`, prints one line naming the phase and the
optimizer step, and exits with ExitCode.HANG. The launcher then stops the other ranks. Nothing is
published half-way: an unfinished save stays an unpublished `.tmp-*` folder, so the newest
complete checkpoint is still the one `--resume auto` takes.

Startup (rendezvous, building the model and data, resuming, the first optimizer step with any
compilation in it) gets a limit of its own, usually longer.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from core.exit_codes import ExitCode

T = TypeVar("T")


class HangWatchdog:
    def __init__(self, output_dir: str, rank: int, hang_minutes: float, startup_minutes: float):
        self.path = os.path.join(output_dir, f"hang-{rank}.txt")
        self.rank, self.hang_seconds = rank, hang_minutes * 60
        self.phase, self.step = "startup", 0
        self.limit = startup_minutes * 60  # until started() is called
        self.last_beat = time.monotonic()
        self.paused = False
        self._done = threading.Event()
        self._thread = None
        if self.limit > 0 or self.hang_seconds > 0:
            self._thread = threading.Thread(target=self._watch, name="shardvision-hang-watchdog", daemon=True)
            self._thread.start()

    def beat(self, phase: str, step: int) -> None:
        """Progress: the rank is now in `phase` at optimizer step `step`."""
        self.phase, self.step, self.last_beat = phase, step, time.monotonic()

    def started(self) -> None:
        """Startup is over (the first step is done): from now on the hang limit applies."""
        self.limit = self.hang_seconds
        self.last_beat = time.monotonic()

    def pause(self) -> None:
        """The caller has the time, not the run (a trainer built and not yet fitting): no limit
        applies until resume()."""
        self.paused = True

    def resume(self) -> None:
        self.last_beat = time.monotonic()
        self.paused = False

    def stop(self) -> None:
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(self._poll_seconds()):
            if self.paused:  # read before the time: resume() sets the time, then unpauses
                continue
            idle = time.monotonic() - self.last_beat
            if self.limit > 0 and idle > self.limit:
                self._report_and_exit(idle)

    def _poll_seconds(self) -> float:
        limits = [s for s in (self.limit, self.hang_seconds) if s > 0]
        return min(10.0, max(0.2, min(limits) / 20)) if limits else 10.0

    def _report_and_exit(self, idle: float) -> None:
        what = (
            f"rank {self.rank} made no progress for {idle / 60:.1f} min in phase '{self.phase}' at "
            f"optimizer step {self.step}"
        )
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "w") as f:
            f.write(f"{what}\nPython stacks of every thread of this rank, most recent call first:\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        limit = "distributed.startup_timeout_minutes" if self.phase == "startup" else "distributed.hang_timeout_minutes"
        print(
            f"shardvision: error: {what}: another rank stopped or died, or this one is stuck (a "
            "collective, the filesystem, "
            f"a loader worker). Stacks in {self.path}. Rerun with --resume auto; raise {limit} if the "
            "phase is just slow.",
            file=sys.stderr,
            flush=True,
        )
        # The main thread is blocked (that is the point); nothing it holds can be unwound from here.
        os._exit(ExitCode.HANG)


def watched(items: Iterable[T], watchdog: HangWatchdog, phase: str, step: Callable[[], int]) -> Iterator[T]:
    """`items`, with the time spent waiting for each one (the data loader) and the time spent on
    it (`phase`) told apart, so a report says which of the two hung."""
    iterator = iter(items)
    while True:
        watchdog.beat("waiting for the data loader", step())
        try:
            item = next(iterator)
        except StopIteration:
            return
        watchdog.beat(phase, step())
        yield item
