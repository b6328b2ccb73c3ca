"""Entry points: `run()` behind every recipe's train.py, and the `shardvision` console script.

    shardvision train classification --config recipes/classification/configs/digits.yaml
    shardvision eval classification --config ... --weights runs/digits/final/model.safetensors
    shardvision train classification --help  # every config key with its type, default and help
    shardvision export CHECKPOINT OUT [--allow-pickle]   # consolidated safetensors (core/export.py)
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

# Models and data are local by contract; make the HF libraries fail fast instead of reaching out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from core.checkpoint import CheckpointError  # noqa: E402
from core.config import ConfigError, parse_args  # noqa: E402
from core.weights import WeightsError  # noqa: E402

TASKS = ("classification", "detection", "segmentation")


def run(config_cls: type, task_cls: type, argv: Optional[list[str]] = None) -> dict[str, float]:
    """Parse the command line, build the task, train (or evaluate); user errors exit with code 2
    and a one-line message instead of a traceback."""
    from core.trainer import PREEMPTED_EXIT_CODE, Preempted, Trainer

    try:
        cfg = parse_args(config_cls, argv)
        return Trainer(cfg, task_cls(cfg)).fit()
    except (ConfigError, CheckpointError, WeightsError) as e:
        print(f"shardvision: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        print(f"shardvision: {e}; checkpoint saved, rerun with --resume auto", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)


def export_main(argv: list[str]) -> None:
    import argparse

    from core.export import export_checkpoint

    parser = argparse.ArgumentParser(prog="shardvision export", description="Write consolidated safetensors from any checkpoint.")
    parser.add_argument("checkpoint", help="a checkpoints/<step> folder")
    parser.add_argument("out", help="output folder (model.safetensors, config.yaml, export.json)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow reading DeepSpeed/FSDP shards, which are Python pickles")
    args = parser.parse_args(argv)
    try:
        print(export_checkpoint(args.checkpoint, args.out, args.allow_pickle))
    except CheckpointError as e:
        print(f"shardvision: error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    usage = f"usage: shardvision {{train,eval}} {{{','.join(TASKS)}}} [options] | shardvision export CHECKPOINT OUT"
    if len(argv) < 2 or argv[0] not in ("train", "eval") or argv[1] not in TASKS:
        print(usage, file=sys.stderr)
        sys.exit(2)
    command, task, rest = argv[0], argv[1], argv[2:]
    try:
        recipe = importlib.import_module(f"recipes.{task}.train")
    except ModuleNotFoundError as e:
        print(f"shardvision: the {task} recipe is not available yet ({e})", file=sys.stderr)
        sys.exit(2)
    recipe.main(rest + (["--eval-only"] if command == "eval" else []))
