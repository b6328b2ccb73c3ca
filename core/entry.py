"""What every recipe's train.py, and every command that runs a recipe, comes down to: parse the
config, build the task, then train, evaluate or check the data; a known failure (core/errors.py)
becomes its exit code and one line instead of a traceback.

    recipes/<task>/train.py:  run(CONFIG, TASK)         # python, torchrun, accelerate, deepspeed, srun
    core/commands/cli.py (train, eval, check-data), core/commands/submit.py (each task of a job), core/commands/plan.py
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any, NoReturn

# Models and data are local by contract; make the HF libraries fail fast instead of reaching out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from core.config_parsing import parse_args  # noqa: E402
from core.errors import DataError, KnownFailure, Preempted  # noqa: E402
from core.exit_codes import ExitCode  # noqa: E402

# Each task (recipes/<task>/train.py) and the demo config its help's examples name.
TASKS = {"classification": "digits.yaml", "detection": "shapes.yaml", "segmentation": "shapes.yaml"}


def recipe(task: str) -> ModuleType:
    """recipes/<task>/train.py: its CONFIG and TASK classes, and its main."""
    return importlib.import_module(f"recipes.{task}.train")


def run(
    config_cls: type,
    task_cls: type,
    argv: list[str] | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> dict[str, float]:
    """Parse the command line, build the task, then train, evaluate (--eval-only) or read every
    sample once (--check-data). A known failure exits with its ExitCode and one line instead of a
    traceback; every rank meets it together, so rank 0 alone prints it. `prog` and `description`
    title its --help (core.config_parsing.parse_args)."""
    with known_failures_exit():
        metrics = train(config_cls, task_cls, argv, prog, description)
    if one_of_several_ranks():
        leave(ExitCode.SUCCESS)
    _skip_final_collections()
    return metrics


def train(
    config_cls: type,
    task_cls: type,
    argv: list[str] | None = None,
    prog: str | None = None,
    description: str | None = None,
) -> dict[str, float]:
    """What `run` does, with failures raised rather than turned into exit codes."""
    from core.trainer import Trainer

    argv = list(sys.argv[1:] if argv is None else argv)
    check_only = "--check-data" in argv
    cfg = parse_args(config_cls, [a for a in argv if a != "--check-data"], prog, description)
    if check_only:
        check_data(task_cls(cfg), cfg)
        sys.exit(ExitCode.SUCCESS)
    return Trainer(cfg, task_cls(cfg)).fit()


@contextlib.contextmanager
def known_failures_exit() -> Iterator[None]:
    """A known failure inside the block leaves the process with its exit code and its message."""
    try:
        yield
    except Preempted as e:  # not an error: the run stopped where it was asked to
        leave(e.exit_code, str(e))
    except KnownFailure as e:
        leave(e.exit_code, f"error: {e}")


def one_of_several_ranks() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def leave(code: ExitCode, message: str = "") -> NoReturn:
    """Leave with `code`, the message said once.

    Every rank meets a known failure together (one config, and data, non-finite loss and stop
    signals agreed on each step), so rank 0 says it for all. The others go only after rank 0: the
    launcher (torchrun, accelerate, deepspeed, srun --kill-on-bad-exit) stops the rest as soon as
    one rank exits, and a rank 1 that left first would get rank 0 stopped before it had said
    anything. They leave with the same code when stopped; if no stop comes, rank 0 did not meet
    this failure, and they say it themselves.

    A rank of a multi-rank run leaves without finalizing the interpreter. gloo's worker threads
    free each finished collective's buffers in the background, and freeing a tensor that has a
    Python object takes the GIL. Once the main thread is finalizing, CPython answers that with
    pthread_exit, which the C++ frames of the worker turn into std::terminate: "terminate called
    without an active exception", SIGABRT, and a finished run reported as failed (caught with gdb:
    ProcessGroupGloo::AsyncWork::~AsyncWork -> TensorImpl::decref_pyobject -> take_gil ->
    PyThread_exit_thread, while the main thread was in Py_FinalizeEx; see docs/failures.md).
    By now Trainer.fit has shut everything down in order (trackers, checkpoint threads, loader
    workers, process group), so nothing is left for finalization to do but that race."""
    rank = int(os.environ.get("RANK", "0"))
    if not one_of_several_ranks():
        if message:
            print(f"shardvision: {message}", file=sys.stderr, flush=True)
        sys.exit(code)
    if message and rank != 0:
        _wait_for_the_launchers_stop(code)
        message = f"{message} (rank {rank})"
    if message:
        print(f"shardvision: {message}", file=sys.stderr, flush=True)
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _skip_final_collections() -> None:
    """At interpreter exit, move every object to the collector's permanent generation first.

    The run has shut itself down in order by now (Trainer.fit: trackers, checkpoint writes,
    loader workers). What finalization would still do is the cyclic collector's passes over the
    half a million objects torch, timm and their dependencies create at import: about 2 s of a
    single-process run's wall on a 2-core machine (`python -c "import timm"` exits in 2.4 s, in
    0.4 s when the heap is frozen first; benchmarks/fixed_cost.py), for memory the OS takes back
    anyway. atexit handlers and the final flushes of stdout/stderr still run. Registered at exit,
    not done here, so a caller that runs `run` in-process and carries on collects as before.
    (A rank of a multi-rank run never finalizes: see `leave`.)"""
    global _FREEZE_AT_EXIT
    if not _FREEZE_AT_EXIT:
        import atexit
        import gc

        atexit.register(gc.freeze)
        _FREEZE_AT_EXIT = True


_FREEZE_AT_EXIT = False

RANK_0_GRACE_SECONDS = 60
OTHER_NODE_GRACE_SECONDS = 5


def _wait_for_the_launchers_stop(code: ExitCode) -> None:
    """Wait (bounded) for the launcher to stop this rank once rank 0 has left, then leave with `code`.
    A rank on another node than rank 0 is never stopped by rank 0's launcher (each node runs its
    own): it only gives rank 0 a moment to say it first."""
    import signal
    import time

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, lambda *_: os._exit(code))
    grace = RANK_0_GRACE_SECONDS if _on_rank_0s_node() else OTHER_NODE_GRACE_SECONDS
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        time.sleep(0.5)


def _on_rank_0s_node() -> bool:
    """Every launcher here numbers ranks node by node (torchrun, accelerate, deepspeed, srun's
    block distribution), so the first `local world size` ranks share rank 0's node."""
    world = os.environ.get("WORLD_SIZE", "1")
    local_world = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world  # torchrun, deepspeed
    return int(os.environ.get("RANK", "0")) < int(local_world)


def check_data(task: Any, cfg: Any) -> None:
    """Read every sample of both splits once, in parallel, and list every problem in one report.
    Problems end in a DataError: bad data is a user error (exit code 2), found before training."""
    import logging

    from core.data import check_samples

    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    workers = max(cfg.data.num_workers, len(os.sched_getaffinity(0)))
    train_set, eval_set = task.build_datasets()
    problems, lines = [], []
    for split, dataset in (("train", train_set), ("eval", eval_set)):
        found, read = check_samples(dataset, split, workers)
        lines.append(f"{split}: {read} samples read, {len(found)} problems")
        problems += found
    print("\n".join(problems + lines))
    if problems:
        raise DataError(
            f"{len(problems)} problems in the data; fix them, or train with --data.bad_samples skip to leave them out"
        )
