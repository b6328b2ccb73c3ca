"""Detection models: torchvision's Faster R-CNN, RetinaNet and FCOS, random init or local weights
(loaded by the engine), with frozen BatchNorm and frozen early backbone stages for fine-tuning."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from core.config import ConfigError, ModelConfig, option

DETECTORS = (
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn_v2",
    "retinanet_resnet50_fpn",
    "fcos_resnet50_fpn",
)
RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")  # last first, as torchvision counts


@dataclass
class DetectionModelConfig(ModelConfig):
    name: str = option("fasterrcnn_mobilenet_v3_large_320_fpn", f"A torchvision detector: {', '.join(DETECTORS)}.")
    num_classes: int = option(80, "Object classes, background excluded (labels 1..num_classes; 0 is background).")
    frozen_bn: bool = option(
        False, "Replace the backbone's BatchNorm by FrozenBatchNorm2d (fine-tuning with small batches)."
    )
    trainable_backbone_layers: int | None = option(
        None, "ResNet backbones: train only the last N of layer4..layer1, conv1 (0-5); None trains all."
    )

    def validate(self) -> None:
        super().validate()
        if self.name not in DETECTORS:
            close = difflib.get_close_matches(self.name, DETECTORS, n=2)
            raise ConfigError(
                f"model.name: {self.name!r} is not a supported detector"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + f" Valid: {', '.join(DETECTORS)}"
            )
        if self.trainable_backbone_layers is not None:
            if not 0 <= self.trainable_backbone_layers <= 5:
                raise ConfigError(
                    f"model.trainable_backbone_layers must be in 0..5, got {self.trainable_backbone_layers}"
                )
            if "resnet" not in self.name:
                raise ConfigError("model.trainable_backbone_layers applies to ResNet backbones only")


def build_model(cfg: DetectionModelConfig, min_size: int, max_size: int) -> torch.nn.Module:
    from torchvision.models import get_model
    from torchvision.ops.misc import FrozenBatchNorm2d

    # weights/weights_backbone None: nothing is downloaded. num_classes + 1: torchvision counts background.
    model = get_model(
        cfg.name,
        weights=None,
        weights_backbone=None,
        num_classes=cfg.num_classes + 1,
        min_size=min_size,
        max_size=max_size,
        **cfg.kwargs,
    )
    # The data pipeline already applied the training scale jitter; do not resize twice.
    model.transform._skip_resize = True
    if cfg.frozen_bn:
        _freeze_batchnorm(model.backbone, FrozenBatchNorm2d)
    if cfg.trainable_backbone_layers is not None:
        trainable = RESNET_STAGES[: cfg.trainable_backbone_layers]
        for name, param in model.backbone.body.named_parameters():
            if not name.startswith(trainable):
                param.requires_grad_(False)
    return model


def _freeze_batchnorm(module: torch.nn.Module, frozen_cls: type) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = frozen_cls(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child, frozen_cls)
