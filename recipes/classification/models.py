"""Classification models: any timm architecture, or a `transformers` image classifier built from
a local config. Always random init here; local weights are loaded by the engine (model.weights)."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Literal

import torch

from core.config import ModelConfig, option
from core.errors import ConfigError


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


def logits_of(output: torch.Tensor | object) -> torch.Tensor:
    """timm returns logits; transformers returns an output object carrying them."""
    return output if isinstance(output, torch.Tensor) else output.logits
