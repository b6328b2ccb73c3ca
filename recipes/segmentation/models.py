"""Segmentation models: torchvision's DeepLabV3 / FCN / LR-ASPP (auxiliary head optional), or a
`transformers` SegFormer / UperNet built from a local config. Random init; local weights are
loaded by the engine (model.weights). Nothing comes from the hub."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from core.config import ModelConfig, option
from core.errors import ConfigError

TORCHVISION_MODELS = (
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "fcn_resnet50",
    "fcn_resnet101",
    "lraspp_mobilenet_v3_large",
)


@dataclass
class SegmentationModelConfig(ModelConfig):
    source: Literal["torchvision", "transformers"] = option(
        "torchvision",
        "torchvision: `name` is one of its segmentation models; transformers: `name` is a local config.json or folder.",
    )
    name: str = option("deeplabv3_mobilenet_v3_large", "Model name (torchvision) or local config path (transformers).")
    num_classes: int = option(21, "Number of classes (ignore_index is not one of them).")
    aux_loss: bool = option(True, "torchvision DeepLabV3/FCN: train the auxiliary head too.")
    aux_weight: float = option(0.4, "Weight of the auxiliary loss.")

    def validate(self) -> None:
        super().validate()
        if self.source == "torchvision" and self.name not in TORCHVISION_MODELS:
            import difflib

            close = difflib.get_close_matches(self.name, TORCHVISION_MODELS, n=2)
            raise ConfigError(
                f"model.name: {self.name!r} is not a torchvision segmentation model"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + f" Valid: {', '.join(TORCHVISION_MODELS)}"
            )
        if self.source == "transformers" and not os.path.exists(self.name):
            raise ConfigError(
                f"model.name: {self.name!r} must be a local config.json or a folder holding one (source=transformers)"
            )


def build_model(cfg: SegmentationModelConfig) -> torch.nn.Module:
    if cfg.source == "torchvision":
        from torchvision.models import get_model

        aux = cfg.aux_loss and not cfg.name.startswith("lraspp")  # LR-ASPP has no auxiliary head
        # weights/weights_backbone None: never download; start from model.weights if given.
        return get_model(
            cfg.name, weights=None, weights_backbone=None, num_classes=cfg.num_classes, aux_loss=aux, **cfg.kwargs
        )

    from transformers import AutoConfig, AutoModelForSemanticSegmentation

    config = AutoConfig.from_pretrained(cfg.name, local_files_only=True, num_labels=cfg.num_classes, **cfg.kwargs)
    return AutoModelForSemanticSegmentation.from_config(config)


def logits_of(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main, auxiliary) logits at the input resolution, whichever library built the model."""
    out = model(images)
    if hasattr(out, "logits"):  # transformers: 1/4 of the input size
        return F.interpolate(out.logits, size=images.shape[-2:], mode="bilinear", align_corners=False), None
    return out["out"], out.get("aux")  # torchvision: already at the input size
