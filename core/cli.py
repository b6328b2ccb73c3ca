"""Entry points: `run()` behind every recipe's train.py, and the `shardvision` console script.

    shardvision train classification --config recipes/classification/configs/digits.yaml
    shardvision eval classification --config ... --weights runs/digits/final/model.safetensors
    shardvision train classification --help  # every config key with its type, default and help
    shardvision export CHECKPOINT OUT [--allow-pickle]   # consolidated safetensors (core/export.py)
    shardvision check-data segmentation --config ...   # read every sample once, list every problem
    shardvision submit classification --config ... --nodes 2 --tasks-per-node 8   # SLURM via submitit (core/submit.py)
    shardvision plan classification --config ... --nodes 2 --gpu-memory 80GiB   # memory per rank (core/plan.py)
    shardvision report runs/a [runs/b ...]   # one HTML page: curves, per-class table, config diff (core/report.py)

Exit codes: core/exit_codes.py (and docs/failures.md).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

# Models and data are local by contract; make the HF libraries fail fast instead of reaching out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from core.agreement import NonFiniteLossError, Preempted  # noqa: E402
from core.checkpoint import CheckpointError  # noqa: E402
from core.config import ConfigError, parse_args  # noqa: E402
from core.data import DataError  # noqa: E402
from core.exit_codes import ExitCode  # noqa: E402
from core.weights import WeightsError  # noqa: E402

TASKS = ("classification", "detection", "segmentation")
COMMANDS = {"train": [], "eval": ["--eval-only"], "check-data": ["--check-data"]}  # each one's flag to the recipe


def run(config_cls: type, task_cls: type, argv: list[str] | None = None) -> dict[str, float]:
    """Parse the command line, build the task, then train, evaluate (--eval-only) or read every
    sample once (--check-data). A known failure exits with its ExitCode and one line instead of a
    traceback; every rank meets it together, so rank 0 alone prints it."""
    with known_failures_exit():
        metrics = train(config_cls, task_cls, argv)
    if one_of_several_ranks():
        leave(ExitCode.SUCCESS)
    return metrics


def train(config_cls: type, task_cls: type, argv: list[str] | None = None) -> dict[str, float]:
    """What `run` does, with failures raised rather than turned into exit codes."""
    from core.trainer import Trainer

    argv = list(sys.argv[1:] if argv is None else argv)
    check_only = "--check-data" in argv
    cfg = parse_args(config_cls, [a for a in argv if a != "--check-data"])
    if check_only:
        sys.exit(check_data(task_cls(cfg), cfg))
    return Trainer(cfg, task_cls(cfg)).fit()


@contextlib.contextmanager
def known_failures_exit() -> Iterator[None]:
    """A known failure inside the block leaves the process with its ExitCode and its message."""
    try:
        yield
    except (ConfigError, CheckpointError, WeightsError, DataError) as e:
        leave(ExitCode.USER_ERROR, f"error: {e}")
    except NonFiniteLossError as e:
        leave(ExitCode.NONFINITE_LOSS, f"error: {e}")
    except Preempted as e:
        leave(ExitCode.PREEMPTED, str(e))


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


def check_data(task: Any, cfg: Any) -> int:
    """Read every sample of both splits once, in parallel, and list every problem in one report.
    Exit code 0 when the data is clean, 1 when it is not."""
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
        print(
            f"shardvision: {len(problems)} problems in the data; fix them, or train with "
            "--data.bad_samples skip to leave them out"
        )
    return 1 if problems else 0


def export_main(argv: list[str]) -> None:
    import argparse

    from core.export import export_checkpoint

    parser = argparse.ArgumentParser(
        prog="shardvision export", description="Write consolidated safetensors from any checkpoint."
    )
    parser.add_argument("checkpoint", help="a checkpoints/<step> folder")
    parser.add_argument("out", help="output folder (model.safetensors, config.yaml, export.json)")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="allow reading DeepSpeed/FSDP shards, which are Python pickles"
    )
    args = parser.parse_args(argv)
    try:
        print(export_checkpoint(args.checkpoint, args.out, args.allow_pickle))
    except CheckpointError as e:
        leave(ExitCode.USER_ERROR, f"error: {e}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    if argv[:1] == ["submit"]:
        from core.submit import submit_main

        return submit_main(argv[1:])
    if argv[:1] == ["plan"]:
        from core.plan import plan_main

        return plan_main(argv[1:])
    if argv[:1] == ["report"]:
        from core.report import report_main

        return report_main(argv[1:])
    usage = (
        f"usage: shardvision {{train,eval,check-data,submit,plan}} {{{','.join(TASKS)}}} [options] | shardvision "
        "export CHECKPOINT OUT | shardvision report RUN_DIR [RUN_DIR ...]"
    )
    if len(argv) < 2 or argv[0] not in COMMANDS or argv[1] not in TASKS:
        print(usage, file=sys.stderr)
        sys.exit(ExitCode.USER_ERROR)
    command, task, rest = argv[0], argv[1], argv[2:]
    try:
        recipe = importlib.import_module(f"recipes.{task}.train")
    except ModuleNotFoundError as e:
        print(f"shardvision: the {task} recipe is not available yet ({e})", file=sys.stderr)
        sys.exit(ExitCode.USER_ERROR)
    recipe.main(rest + COMMANDS[command])
