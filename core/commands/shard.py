"""Tar shards from any data a recipe reads, converted once.

    shardvision shard classification runs/digit_shards --config recipes/classification/configs/digits.yaml
    shardvision shard classification /data/shards --config my_imagefolder.yaml --samples-per-shard 5000

Writes OUT/<split>-000000.tar, ... for the config's train and eval splits, in the WebDataset layout
(core/shards.py): each sample the image file's own bytes (or a PNG where the source holds no file)
and its label: `cls` (classification), `seg.png` (segmentation's mask), `json` (detection's COCO
annotations and image size). Also OUT/_index.json, each shard's sample count and the class names
(detection: COCO's category table), so a run knows its epoch without reading a shard, and
OUT/classes.txt. Then train with
`--data.source webdataset --data.root OUT`. Samples that cannot be read are left out and listed.
Options after OUT are the recipe's, as for `shardvision train`.
"""

from __future__ import annotations

import argparse
import os

from core.config_parsing import parse_args
from core.entry import TASKS, known_failures_exit, recipe
from core.shards import write_index, write_shards


def shard_main(argv: list[str]) -> None:
    """`shardvision shard TASK OUT [--samples-per-shard N] --config ... [--key value ...]`."""
    parser = argparse.ArgumentParser(
        prog="shardvision shard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=TASKS, metavar="TASK", help=", ".join(TASKS))
    parser.add_argument("out", metavar="OUT", help="output folder for the shards and their index")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar (default 1000)")
    args, rest = parser.parse_known_args(argv)
    with known_failures_exit():
        chosen = recipe(args.task)
        task = chosen.TASK(parse_args(chosen.CONFIG, rest, prog=f"shardvision shard {args.task}"))
        problems: list[str] = []
        labels, splits = task.shard_samples(problems)
        shards: dict = {}
        for split, samples in splits.items():
            written = write_shards(args.out, split, samples, args.samples_per_shard)
            shards |= written
            print(f"{split}: {sum(s['samples'] for s in written.values())} samples in {len(written)} shards")
        write_index(args.out, shards, labels)
        if labels.get("classes"):
            with open(os.path.join(args.out, "classes.txt"), "w") as f:
                f.writelines(f"{name}\n" for name in labels["classes"])
        for problem in problems:
            print(f"left out: {problem}")
