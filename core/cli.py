"""Entry points: `run()` behind every recipe's train.py, and the `shardvision` console script.

    shardvision --help   # the commands; `shardvision COMMAND --help`: what one does, an example, its options
    shardvision train classification --config recipes/classification/configs/digits.yaml
    shardvision eval classification --config ... --weights runs/digits/final/model.safetensors
    shardvision train classification --help  # every config key with its type, default and help
    shardvision export CHECKPOINT OUT [--allow-pickle]   # consolidated safetensors (core/export.py)
    shardvision check-data segmentation --config ...   # read every sample once, list every problem
    shardvision submit classification --config ... --nodes 2 --tasks-per-node 8   # SLURM via submitit (core/submit.py)
    shardvision plan classification --config ... --nodes 2 --gpu-memory 80GiB   # memory per rank (core/plan.py)
    shardvision report runs/a [runs/b ...]   # one HTML page: curves, per-class table, config diff (core/report.py)
    python -m core.cli train classification ...   # the same commands, without the console script

Exit codes: core/exit_codes.py (and docs/failures.md).
"""

from __future__ import annotations

import argparse
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

# Each task (recipes/<task>/train.py) and the demo config its help's examples name.
TASKS = {"classification": "digits.yaml", "detection": "shapes.yaml", "segmentation": "shapes.yaml"}

# Each command's line in `shardvision --help`; `shardvision COMMAND --help` tells the rest.
COMMANDS = {
    "train": f"train a model of TASK ({', '.join(TASKS)})",
    "eval": "evaluate weights or a checkpoint on TASK's eval split",
    "check-data": "read every sample of TASK's data once and list every problem",
    "export": "write consolidated safetensors from any checkpoint",
    "submit": "submit a training run as a SLURM (or local) job that requeues itself",
    "plan": "memory per rank under each strategy, and the largest micro-batch that fits",
    "report": "one HTML page of one or several runs: curves, per-class table, config diff",
}
# The commands that run a recipe: the flag each adds to the recipe's command line, and its help
# ({task} and {config}: a task and its demo config, for the example).
RECIPE_COMMANDS = {
    "train": (
        [],
        """Train a model of one task. Its config is the recipe's dataclass defaults, then the --config
YAML file, then each --key VALUE given here; the resolved copy is saved as <output_dir>/config.yaml.

example:
  shardvision train {task} --config {config} --optim.lr 3e-4 --output-dir runs/try1""",
    ),
    "eval": (
        ["--eval-only"],
        """Evaluate weights (--weights FILE) or a checkpoint (--resume auto|PATH) on the eval split of
one task, then exit. Same options as `shardvision train`.

example:
  shardvision eval {task} --config {config} --weights runs/try1/final/model.safetensors""",
    ),
    "check-data": (
        ["--check-data"],
        """Read every sample of both splits once, through the same readers and transforms as training,
and list every problem in one report. Exit code 0 when the data is clean, 2 (a user error) when it
is not. Same options as `shardvision train`.

example:
  shardvision check-data {task} --config {config}""",
    ),
}


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
    title its --help (core.config.parse_args)."""
    with known_failures_exit():
        metrics = train(config_cls, task_cls, argv, prog, description)
    if one_of_several_ranks():
        leave(ExitCode.SUCCESS)
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


def main(argv: list[str] | None = None) -> None:
    """The `shardvision` console script (setup.py), also `python -m core.cli`."""
    parser = argparse.ArgumentParser(
        prog="shardvision",
        description="Train and fine-tune vision models at scale on accelerate and DeepSpeed.\n\nexample:\n"
        f"  shardvision train classification --config recipes/classification/configs/{TASKS['classification']}",
        epilog="`shardvision COMMAND --help`: what a command does, an example, and its options.\nexit codes: "
        + ", ".join(f"{code.value} {code.name.lower().replace('_', ' ')}" for code in ExitCode)
        + " (docs/failures.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    for name, summary in COMMANDS.items():
        # Each command reads, and explains with --help, the rest of the line itself: its options live
        # beside its code, and those of train, eval and check-data depend on the task.
        commands.add_parser(name, help=summary, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command in RECIPE_COMMANDS:
        recipe_main(args.command, rest)
    else:  # export, submit, plan, report: core/<command>.py, which imports this module
        getattr(importlib.import_module(f"core.{args.command}"), f"{args.command}_main")(rest)


def recipe_main(command: str, argv: list[str]) -> dict[str, float]:
    """`shardvision train|eval|check-data TASK ...`: what the task's train.py runs (its CONFIG and
    TASK through `run`), with this command's flag, and its --help titled for this command."""
    flags, about = RECIPE_COMMANDS[command]
    parser = argparse.ArgumentParser(
        prog=f"shardvision {command}",
        usage="%(prog)s [-h] TASK [options]",
        description=_with_example(about, "classification"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "task",
        choices=TASKS,
        metavar="TASK",
        help=f"{', '.join(TASKS)}; `shardvision {command} TASK --help` lists its options: every config key",
    )
    # Only the first word is read here: the task, or --help for the help above. What follows the
    # task, --help included, is the recipe's: only it knows its config keys.
    task = parser.parse_args(argv[:1]).task
    recipe = importlib.import_module(f"recipes.{task}.train")
    return run(
        recipe.CONFIG, recipe.TASK, argv[1:] + flags, f"shardvision {command} {task}", _with_example(about, task)
    )


def _with_example(about: str, task: str) -> str:
    return about.format(task=task, config=f"recipes/{task}/configs/{TASKS[task]}")


if __name__ == "__main__":
    main()
