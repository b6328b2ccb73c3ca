"""The `shardvision` console script: one subcommand per job, each with its own --help.

    shardvision --help   # the commands; `shardvision COMMAND --help`: what one does, an example, its options
    shardvision train classification --config recipes/classification/configs/digits.yaml
    shardvision eval classification --config ... --weights runs/digits/final/model.safetensors
    shardvision train classification --help  # every config key with its type, default and help
    shardvision check-data segmentation --config ...   # read every sample once, list every problem
    shardvision export CHECKPOINT OUT [--allow-pickle]   # consolidated safetensors (export.py)
    shardvision shard classification OUT --config ...   # tar shards and their index (shard.py)
    shardvision submit classification --config ... --nodes 2 --tasks-per-node 8   # SLURM via submitit (submit.py)
    shardvision plan classification --config ... --nodes 2 --gpu-memory 80GiB   # memory per rank (plan.py)
    shardvision report runs/a [runs/b ...]   # one HTML page: curves, per-class table, config diff (report.py)
    python -m core.commands.cli train classification ...   # the same commands, without the console script

Exit codes: core/exit_codes.py (and docs/failures.md).
"""

from __future__ import annotations

import argparse
import importlib

from core.entry import TASKS, recipe, run
from core.exit_codes import ExitCode

# Each command's line in `shardvision --help`; `shardvision COMMAND --help` tells the rest.
COMMANDS = {
    "train": f"train a model of TASK ({', '.join(TASKS)})",
    "eval": "evaluate weights or a checkpoint on TASK's eval split",
    "check-data": "read every sample of TASK's data once and list every problem",
    "export": "write consolidated safetensors from any checkpoint",
    "shard": "write TASK's data as tar shards (WebDataset layout) with their index",
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


def main(argv: list[str] | None = None) -> None:
    """The `shardvision` console script (setup.py), also `python -m core.commands.cli`."""
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
    else:  # export, shard, submit, plan, report: core/commands/<command>.py
        getattr(importlib.import_module(f"core.commands.{args.command}"), f"{args.command}_main")(rest)


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
    chosen = recipe(task)
    return run(
        chosen.CONFIG, chosen.TASK, argv[1:] + flags, f"shardvision {command} {task}", _with_example(about, task)
    )


def _with_example(about: str, task: str) -> str:
    return about.format(task=task, config=f"recipes/{task}/configs/{TASKS[task]}")


if __name__ == "__main__":
    main()
