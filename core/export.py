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
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

from core.checkpoint import TRAINER_STATE, CheckpointError, pickled_format, verify
from core.ema import EXPORT_FILE as EMA_EXPORT
from core.ema import saved_average
from core.exit_codes import ExitCode


def _save(state_dict: dict[str, torch.Tensor], path: str) -> None:
    # clone: tied weights share storage, which safetensors refuses to write twice
    save_file(
        {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}, path, metadata={"format": "pt"}
    )


def export_checkpoint(checkpoint: str, out_dir: str, allow_pickle: bool = False) -> str:
    verify(checkpoint)
    fmt = pickled_format(checkpoint)
    if fmt and not allow_pickle:
        raise CheckpointError(
            f"{checkpoint} is a {fmt} checkpoint: its shards are Python pickles and reading them runs code "
            "stored in them. If you trust it, pass --allow-pickle."
        )
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "model.safetensors")
    if fmt == "DeepSpeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        _save(get_fp32_state_dict_from_zero_checkpoint(checkpoint), target)
    elif fmt == "FSDP":
        from accelerate.utils import merge_fsdp_weights

        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            merge_fsdp_weights(os.path.join(checkpoint, "pytorch_model_fsdp_0"), tmp, safe_serialization=True)
            _save(load_file(os.path.join(tmp, "model.safetensors")), target)
    else:
        source = os.path.join(checkpoint, "model.safetensors")
        if not os.path.isfile(source):
            raise CheckpointError(f"{checkpoint}: no model.safetensors, DeepSpeed or FSDP shards to export")
        shutil.copyfile(source, target)

    average = saved_average(checkpoint)
    if average is not None:
        _save(average, os.path.join(out_dir, EMA_EXPORT))

    run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "config.yaml")
    if os.path.isfile(run_config):
        shutil.copyfile(run_config, os.path.join(out_dir, "config.yaml"))
    with open(os.path.join(checkpoint, TRAINER_STATE)) as f:
        step = json.load(f)["global_step"]
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(checkpoint), "step": step, "format": fmt or "accelerate"}, f, indent=2)
    return target


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
    try:
        print(export_checkpoint(args.checkpoint, args.out, args.allow_pickle))
    except CheckpointError as e:
        print(f"shardvision: error: {e}", file=sys.stderr)
        sys.exit(ExitCode.USER_ERROR)
