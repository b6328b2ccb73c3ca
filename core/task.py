"""The contract between a recipe and the engine.

A recipe subclasses `Task` and fills in the model, the datasets and what one training and one
evaluation step compute. The engine (core/trainer.py) owns everything else: devices, precision,
distribution, accumulation, clipping, schedules, EMA, checkpoints and logging. A task never
calls `backward`, never moves tensors between devices and never talks to other ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import default_collate

from core.data import MapDataset
from core.errors import ConfigError


class Metrics:
    """Accumulates the per-sample outputs of `Task.evaluation_step`, already gathered from every
    rank with each sample counted once, and turns them into named numbers."""

    def update(self, outputs: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def table(self) -> str:
        """An optional human-readable breakdown (e.g. per-class IoU) logged after each evaluation."""
        return ""

    def write(self, folder: str, values: dict[str, float]) -> None:
        """Optional files (e.g. predictions) the main process writes after each evaluation."""


class Task:
    primary_metric: str = "loss"  # the metric "best" refers to
    higher_is_better: bool = False
    input_keys: tuple[str, ...] = ("image",)  # batch entries cast to the model dtype under DeepSpeed half precision
    # DeepSpeed holds bf16/fp16 weights and does not autocast. A model with ops that have no 16-bit
    # kernel (torchvision's NMS, cdist in DETR's matcher) or that mixes in fp32 tensors of its own
    # (anchors) sets this: its steps then run under autocast there too, which runs those in fp32.
    autocast_half_weights: bool = False
    # The training split's tar shards (core/shards.py ShardIndex), set by build_datasets when the
    # data is sharded: the engine then reads each epoch in core/shards.py's PartitionOrder.
    train_shards: Any = None

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def check_strategy(self, strategy: str, precision: str, device: torch.device) -> None:
        """Raise ConfigError, before anything is built, when the model cannot run under this
        strategy and precision on this device: say why and what to use instead."""

    def build_datasets(self) -> tuple[MapDataset, MapDataset]:
        """(train, eval) map-style datasets that return transformed samples."""
        raise NotImplementedError

    def write_model_folder(self, model: torch.nn.Module, folder: str) -> None:
        """Beside `folder/model.safetensors` (the run's exported weights), the files the model's own
        library needs to load the folder alone (its config, class names, preprocessing); called on
        the main process only, and must read no parameter (a sharded model's are not gathered)."""

    def shard_samples(self, problems: list[str]) -> tuple[dict, dict[str, Iterator[tuple[str, dict[str, bytes]]]]]:
        """For `shardvision shard` (core/commands/shard.py): what the index records of the labels
        ({"classes": names}, and for detection {"categories": COCO's table}), and for the train and
        eval split each its raw samples as (key, {extension: bytes}), the WebDataset layout; what
        cannot be read is left out and described in `problems`."""
        raise ConfigError(f"shardvision shard: {type(self).__name__} cannot write shards yet")

    def collate(self, samples: list) -> Any:
        return default_collate(samples)

    def onnx_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` as `shardvision export --onnx` exports it: one batch of pixels in, one tensor out."""
        raise ConfigError(f"shardvision export --onnx: {type(self).__name__}'s models do not export to ONNX")

    def on_device(self, batch: Any) -> Any:
        """The batch once on the model's device, before the steps see it: work that costs less
        there than in a loader worker (classification's data.fast_decode normalises uint8 images
        here, as timm's PrefetchLoader does)."""
        return batch

    def training_step(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The mean loss of one micro-batch."""
        raise NotImplementedError

    def evaluation_step(self, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor] | list:
        """Per-sample outputs for `Metrics.update`: tensors whose first dimension is the batch, or
        a list with one entry per sample (gathered as Python objects)."""
        raise NotImplementedError

    def build_metrics(self) -> Metrics:
        raise NotImplementedError

    def batch_size(self, batch: Any) -> int:
        return len(batch[self.input_keys[0]])
