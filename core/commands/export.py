"""Consolidated safetensors from any checkpoint, without the cluster that wrote it.

    shardvision export runs/x/checkpoints/1200 exported/               # DDP / single process
    shardvision export runs/x/checkpoints/1200 exported/ --allow-pickle  # DeepSpeed ZeRO-1/2/3, FSDP

DDP checkpoints already hold `model.safetensors`. ZeRO shards are merged into fp32 weights with
DeepSpeed's own `zero_to_fp32` (the same code as the `zero_to_fp32.py` DeepSpeed leaves in every
checkpoint), FSDP shards with accelerate's `merge_fsdp_weights`. Both read Python pickles, hence
the explicit opt-in. The run's config.yaml (which names the model and its arguments) is copied
next to the weights, so `--weights OUT/model.safetensors` with `--config OUT/config.yaml` loads
them into the same model. The EMA of the weights, when the run kept one, is written beside them as
`model_ema.safetensors` (reassembled from its per-rank files under ZeRO-3).
"""

from __future__ import annotations

import argparse

from core.checkpoint.export import export_checkpoint
from core.entry import known_failures_exit


def export_main(argv: list[str]) -> None:
    """`shardvision export CHECKPOINT OUT [--allow-pickle]`."""
    parser = argparse.ArgumentParser(
        prog="shardvision export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoints/<step> folder")
    parser.add_argument("out", metavar="OUT", help="output folder (model.safetensors, config.yaml, export.json)")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="allow reading DeepSpeed/FSDP shards, which are Python pickles"
    )
    args = parser.parse_args(argv)
    with known_failures_exit():
        print(export_checkpoint(args.checkpoint, args.out, args.allow_pickle))
