"""A model folder from any checkpoint, without the cluster that wrote it.

    shardvision export runs/x/checkpoints/1200 exported/               # DDP / single process
    shardvision export runs/x/checkpoints/1200 exported/ --allow-pickle  # DeepSpeed ZeRO-1/2/3, FSDP

DDP checkpoints already hold `model.safetensors`. ZeRO shards are merged into fp32 weights with
DeepSpeed's own `zero_to_fp32` (the same code as the `zero_to_fp32.py` DeepSpeed leaves in every
checkpoint), FSDP shards with accelerate's `merge_fsdp_weights`. Both read Python pickles, hence
the explicit opt-in. The run's config.yaml (which names the model and its arguments) is copied
next to the weights, so `--weights OUT/model.safetensors` with `--config OUT/config.yaml` loads
them into the same model. The EMA of the weights, when the run kept one, is written beside them as
`model_ema.safetensors` (reassembled from its per-rank files under ZeRO-3).

OUT is then the model folder a run's final/ is: the files the model's own library loads it from
(timm's config.json, transformers' config and image processor; the recipe's Task.write_model_folder),
with the data's class names. The recipe is the one whose config reads the run's config.yaml; the
class names are read from the run's data, so export where the data is (else OUT holds the weights
and config.yaml only, and says why).

    shardvision export runs/x/checkpoints/1200 exported/ --onnx

also writes OUT/model.onnx (torch's exporter, batch size free), then runs it with onnxruntime on
the first validation images and compares its outputs with the model's: classification (logits)
and segmentation (logits at the input's size); detection models do not export (their outputs are
lists of boxes of data-dependent length).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from core.checkpoint.export import export_checkpoint, save_whole_weights
from core.checkpoint.state import pickled_format, read_trainer_state
from core.config_parsing import load_config
from core.entry import TASKS, known_failures_exit, recipe
from core.errors import ConfigError, KnownFailure
from core.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, checked_base, export_lora, lora_enabled


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
    parser.add_argument(
        "--onnx", action="store_true", help="also OUT/model.onnx, checked with onnxruntime on validation images"
    )
    args = parser.parse_args(argv)
    with known_failures_exit():
        print(export_checkpoint(args.checkpoint, args.out, args.allow_pickle))
        task, evaluation, said = write_model_folder(args.checkpoint, args.out)
        print(said)
        if args.onnx:
            if task is None:
                raise ConfigError(f"--onnx needs the run's config and validation data: {said}")
            print(write_onnx(task, evaluation, args.out))


def write_model_folder(checkpoint: str, out: str) -> tuple[Any, Any, str]:
    """Beside OUT/model.safetensors, what the model's library loads it with (the recipe's
    Task.write_model_folder, as the run's final/ has it). Returns the run's task and validation
    set (None, None where they cannot be had) and a line saying what was written."""
    import torch
    from safetensors.torch import load_file

    lora_base = read_trainer_state(checkpoint).get("lora_base")
    config = os.path.join(out, "config.yaml")
    found = []
    for name in TASKS if os.path.isfile(config) else []:
        try:
            found.append((name, load_config(recipe(name).CONFIG, config, validate=False)))
        except ConfigError:  # another recipe's keys
            continue
    if len(found) != 1:
        why = (
            f"read by {len(found)} recipes' configs, not one"
            if os.path.isfile(config)
            else "no config.yaml (the checkpoint is not in a run folder)"
        )
        if lora_base:  # OUT/model.safetensors would be adapters and head under peft's names: no model
            raise ConfigError(f"{checkpoint} is a LoRA checkpoint, merged with its run's config.yaml: {out}: {why}")
        return None, None, f"{out}: {why}: weights only"
    name, cfg = found[0]
    task = recipe(name).TASK(cfg)
    if lora_enabled(cfg.model):  # the checkpoint holds the adapters apart: the merged model, the adapter beside
        weights = os.path.join(out, "model.safetensors")
        # FSDP2's checkpoints hold every weight; the others are completed from the base file.
        base = None if pickled_format(checkpoint) == "FSDP" else checked_base(lora_base, checkpoint)
        export_lora(load_file(weights), task.build_model, cfg.model, out, save_whole_weights, base)
    try:
        _, evaluation = task.build_datasets()  # the class names are the data's
    except KnownFailure as e:
        return None, None, f"{out}: weights only: the run's data, which names its classes, is not readable ({e})"
    with torch.device("meta"):  # its structure and config only; no parameter is read
        model = task.build_model()
    task.write_model_folder(model, out)
    written = sorted(
        set(os.listdir(out))
        - {"model.safetensors", "model_ema.safetensors", "config.yaml", "export.json", ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    )
    library = ", ".join(written) or "the weights: this model has no library of its own"
    return task, evaluation, f"{out}: a {name} model folder ({library})"


def write_onnx(task: Any, evaluation: Any, out: str, images: int = 8) -> str:
    """OUT/model.onnx of the exported weights (the task's onnx_module: pixels in, one tensor out),
    written beside its place and renamed when whole, then checked: onnxruntime's outputs on the
    first `images` validation images against the model's own."""
    import numpy as np
    import onnxruntime
    import torch
    from safetensors.torch import load_file

    model = task.build_model().eval()
    model.load_state_dict(load_file(os.path.join(out, "model.safetensors")))
    module = task.onnx_module(model).eval()
    batch = task.on_device(task.collate([evaluation[i] for i in range(min(images, len(evaluation)))]))
    pixels = batch[task.input_keys[0]]
    path = os.path.join(out, "model.onnx")
    batch_size = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        try:
            torch.onnx.export(
                module,
                (pixels,),
                path + ".partial",
                input_names=["pixel_values"],
                output_names=["logits"],
                dynamic_shapes={"pixel_values": {0: batch_size}},
                dynamo=True,
                verbose=False,
            )
        except Exception:  # a model the exporter cannot trace leaves no half-written file
            if os.path.exists(path + ".partial"):
                os.remove(path + ".partial")
            raise
        os.replace(path + ".partial", path)
        expected = module(pixels).numpy()
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixel_values": pixels.numpy()})[0]
    difference = float(np.abs(got - expected).max())
    if not np.allclose(got, expected, rtol=1e-3, atol=1e-4):
        raise ConfigError(f"{path}: onnxruntime's outputs differ from the model's by up to {difference:.3g}")
    return f"{path}: onnxruntime on {len(pixels)} validation images, largest difference from torch {difference:.2g}"
