"""Segmentation models: torchvision's DeepLabV3 / FCN / LR-ASPP (auxiliary head optional), or a
`transformers` SegFormer / UperNet built from a local config. Random init; local weights are
loaded by the engine (model.weights). Nothing comes from the hub."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from core.config import ModelConfig, option
from core.errors import ConfigError
from core.model_folder import save_labelled_config, write_torchvision_spec

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


def torchvision_kwargs(cfg: SegmentationModelConfig) -> dict[str, Any]:
    aux = cfg.aux_loss and not cfg.name.startswith("lraspp")  # LR-ASPP has no auxiliary head
    return dict(num_classes=cfg.num_classes, aux_loss=aux, **cfg.kwargs)


def build_model(cfg: SegmentationModelConfig) -> torch.nn.Module:
    if cfg.source == "torchvision":
        from torchvision.models import get_model

        # weights/weights_backbone None: never download; start from model.weights if given.
        return get_model(cfg.name, weights=None, weights_backbone=None, **torchvision_kwargs(cfg))

    from transformers import AutoConfig, AutoModelForSemanticSegmentation

    config = AutoConfig.from_pretrained(cfg.name, local_files_only=True, num_labels=cfg.num_classes, **cfg.kwargs)
    return AutoModelForSemanticSegmentation.from_config(config)


def logits_of(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main, auxiliary) logits at the input resolution, whichever library built the model."""
    out = model(images)
    if hasattr(out, "logits"):  # transformers: 1/4 of the input size
        return F.interpolate(out.logits, size=images.shape[-2:], mode="bilinear", align_corners=False), None
    return out["out"], out.get("aux")  # torchvision: already at the input size


def write_model_folder(
    model: torch.nn.Module, cfg: SegmentationModelConfig, data: Any, class_names: list[str], folder: str
) -> None:
    """Beside the weights in `folder`, what the model's own library needs to load the folder alone,
    with the class names and the run's evaluation preprocessing (the shorter side resized to
    data.image_size, then mean/std). transformers: config.json (id2label, label2id) and a
    SegformerImageProcessor's preprocessor_config.json (it resizes to image_size x image_size,
    which is the run's resize for square images only); torchvision: core/model_folder.py's spec.
    Reads no parameter."""
    preprocessing = {"resize_shorter_side": data.image_size, "mean": list(data.mean), "std": list(data.std)}
    if cfg.source == "torchvision":
        write_torchvision_spec(folder, cfg.name, torchvision_kwargs(cfg), class_names, preprocessing)
        return
    from transformers import SegformerImageProcessor

    save_labelled_config(model, class_names, folder)
    SegformerImageProcessor(
        size={"height": data.image_size, "width": data.image_size},
        image_mean=list(data.mean),
        image_std=list(data.std),
        do_reduce_labels=False,
    ).save_pretrained(folder)
