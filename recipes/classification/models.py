"""Classification models: any timm architecture, or a `transformers` image classifier built from
a local config. Always random init here; local weights are loaded by the engine (model.weights)."""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from core.config import ModelConfig, option
from core.errors import ConfigError
from core.model_folder import save_labelled_config


@dataclass
class ClassificationModelConfig(ModelConfig):
    source: Literal["timm", "transformers"] = option(
        "timm", "timm: `name` is a timm model name; transformers: `name` is a local config.json or model folder."
    )


def build_model(cfg: ClassificationModelConfig) -> torch.nn.Module:
    if cfg.source == "timm":
        import timm

        if not timm.is_model(cfg.name):
            close = difflib.get_close_matches(cfg.name, timm.list_models(), n=3)
            raise ConfigError(
                f"model.name: {cfg.name!r} is not a timm model"
                + (f"; did you mean {', '.join(close)}?" if close else "")
            )
        # pretrained=False: weights never come from the hub, only from model.weights.
        return timm.create_model(cfg.name, pretrained=False, num_classes=cfg.num_classes, **cfg.kwargs)

    from transformers import AutoConfig, AutoModelForImageClassification

    if not os.path.exists(cfg.name):
        raise ConfigError(
            f"model.name: {cfg.name!r} must be a local config.json or a folder holding one (source=transformers)"
        )
    config = AutoConfig.from_pretrained(cfg.name, local_files_only=True, num_labels=cfg.num_classes, **cfg.kwargs)
    return AutoModelForImageClassification.from_config(config)


def write_model_folder(
    model: torch.nn.Module, cfg: ClassificationModelConfig, data: Any, class_names: list[str], folder: str
) -> None:
    """Beside the weights in `folder`, what the model's own library needs to load the folder
    alone, with the class names and the run's evaluation preprocessing (`data`: image_size,
    crop_pct, interpolation, mean, std). timm: its config.json, for
    `timm.create_model("local-dir:FOLDER", pretrained=True)` and `timm.data.resolve_data_config`.
    transformers: config.json (id2label, label2id) and preprocessor_config.json, for
    `AutoModelForImageClassification.from_pretrained(FOLDER)` and `AutoImageProcessor`. Reads
    no parameter, so a ZeRO-3 or FSDP2 model's shards are never gathered for it."""
    size = data.image_size
    if cfg.source == "timm":
        from timm.models._hub import save_config_for_hf  # save_for_hf's config half (the weights are ours)

        preprocessing = dict(input_size=(3, size, size), interpolation=data.interpolation, crop_pct=data.crop_pct)
        preprocessing |= dict(crop_mode="center", mean=tuple(data.mean), std=tuple(data.std))
        save_config_for_hf(
            model,
            os.path.join(folder, "config.json"),
            model_config={"label_names": class_names},
            data_config=preprocessing,
        )
        return
    from transformers import BitImageProcessor

    save_labelled_config(model, class_names, folder)
    # timm's evaluation transform: the shorter side to image_size / crop_pct, a centred square crop
    # of image_size, then mean/std; BitImageProcessor does the same steps.
    BitImageProcessor(
        size={"shortest_edge": math.floor(size / data.crop_pct)},
        resample=PIL_RESAMPLE[data.interpolation],
        crop_size={"height": size, "width": size},
        image_mean=list(data.mean),
        image_std=list(data.std),
    ).save_pretrained(folder)


# timm's interpolation names and PIL's resampling filters
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def logits_of(output: torch.Tensor | object) -> torch.Tensor:
    """timm returns logits; transformers returns an output object carrying them."""
    return output if isinstance(output, torch.Tensor) else output.logits
