"""Consolidated safetensors from a checkpoint of any strategy, without the cluster that wrote it:
`export_checkpoint`, behind `shardvision export` (core/commands/export.py, whose --help says what is
written and why DeepSpeed and FSDP shards need --allow-pickle)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from core.checkpoint.files import verify
from core.checkpoint.state import TRAINER_STATE, pickled_format
from core.ema import EXPORT_FILE as EMA_EXPORT
from core.ema import saved_average
from core.errors import CheckpointError


def save_whole_weights(state_dict: dict[str, torch.Tensor], path: str) -> None:
    """Every entry of `state_dict` under its own name, tied weights included (a loader may ask for
    any of their names). safetensors writes each storage once, so an entry whose storage another
    already holds is copied: a tie, or, under ZeRO-3 on one CPU rank, the gathered parameters,
    which are views of one flat buffer (accelerate's save_model kept one of them and dropped the
    rest as "shared tensors": an export holding only cls_token)."""
    taken: set[int] = set()
    tensors = {}
    for name, value in state_dict.items():
        tensor = value.detach().to("cpu").contiguous()
        if tensor.untyped_storage().data_ptr() in taken:
            tensor = tensor.clone()
        taken.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    save_file(tensors, path, metadata={"format": "pt"})


def export_checkpoint(checkpoint: str, out_dir: str, allow_pickle: bool = False) -> str:
    """Write `out_dir/model.safetensors` (and the EMA's, config.yaml, export.json) from `checkpoint`;
    return the weights' path."""
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

        save_whole_weights(get_fp32_state_dict_from_zero_checkpoint(checkpoint), target)
    elif fmt == "FSDP":
        from accelerate.utils import merge_fsdp_weights

        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            merge_fsdp_weights(os.path.join(checkpoint, "pytorch_model_fsdp_0"), tmp, safe_serialization=True)
            save_whole_weights(load_file(os.path.join(tmp, "model.safetensors")), target)
    else:
        source = os.path.join(checkpoint, "model.safetensors")
        if not os.path.isfile(source):
            raise CheckpointError(f"{checkpoint}: no model.safetensors, DeepSpeed or FSDP shards to export")
        shutil.copyfile(source, target)

    average = saved_average(checkpoint)
    if average is not None:
        save_whole_weights(average, os.path.join(out_dir, EMA_EXPORT))

    run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), "config.yaml")
    if os.path.isfile(run_config):
        shutil.copyfile(run_config, os.path.join(out_dir, "config.yaml"))
    with open(os.path.join(checkpoint, TRAINER_STATE)) as f:
        step = json.load(f)["global_step"]
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(checkpoint), "step": step, "format": fmt or "accelerate"}, f, indent=2)
    return target
