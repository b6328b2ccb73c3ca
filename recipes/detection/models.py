"""Detection models: torchvision's Faster R-CNN, RetinaNet and FCOS, and Mask R-CNN for instance
segmentation, with frozen BatchNorm and frozen early backbone stages for fine-tuning; or a
`transformers` object detector (DETR, Conditional/Deformable DETR, RT-DETR, ...) built from a
local config, trained on its own loss and post-processed by its own image processor. Random init
or local weights (loaded by the engine); nothing comes from the hub."""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torchvision.ops import clip_boxes_to_image

from core.config import ModelConfig, option
from core.errors import ConfigError
from core.model_folder import save_labelled_config

DETECTORS = (
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn_v2",
    "retinanet_resnet50_fpn",
    "fcos_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_mobilenet_v3_large_fpn",
)
# Not in torchvision's registry: torchvision's Mask R-CNN on the MobileNetV3-FPN backbone and
# anchors of its fasterrcnn_mobilenet_v3_large_fpn, a Mask R-CNN small enough to train on CPU.
MOBILE_MASKRCNN = "maskrcnn_mobilenet_v3_large_fpn"


def predicts_masks(cfg: DetectionModelConfig) -> bool:
    return cfg.source == "torchvision" and cfg.name.startswith("maskrcnn")


RESNET_STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")  # last first, as torchvision counts


@dataclass
class DetectionModelConfig(ModelConfig):
    source: Literal["torchvision", "transformers"] = option(
        "torchvision",
        "torchvision: `name` is one of its detectors; transformers: `name` is a local config.json or a folder "
        "holding one (and optionally preprocessor_config.json).",
    )
    name: str = option(
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        f"A torchvision detector ({', '.join(DETECTORS)}) or a local transformers config.",
    )
    num_classes: int = option(80, "Object classes, background excluded (labels 1..num_classes; 0 is background).")
    frozen_bn: bool = option(
        False, "Replace the backbone's BatchNorm by FrozenBatchNorm2d (fine-tuning with small batches)."
    )
    trainable_backbone_layers: int | None = option(
        None, "ResNet backbones: train only the last N of layer4..layer1, conv1 (0-5); None trains all."
    )

    def validate(self) -> None:
        super().validate()
        if self.source == "transformers":
            if not os.path.exists(self.name):
                raise ConfigError(
                    f"model.name: {self.name!r} must be a local config.json or a folder holding one "
                    "(source=transformers)"
                )
            if self.frozen_bn or self.trainable_backbone_layers is not None:
                raise ConfigError(
                    "model.frozen_bn and model.trainable_backbone_layers apply to torchvision detectors; for a "
                    "transformers detector set its config's freeze options (e.g. freeze_backbone_batch_norms)"
                )
            return
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
    if cfg.source == "transformers":
        from transformers import AutoModelForObjectDetection

        return AutoModelForObjectDetection.from_config(transformers_config(cfg))
    from torchvision.models import get_model
    from torchvision.ops.misc import FrozenBatchNorm2d

    # weights/weights_backbone None: nothing is downloaded. num_classes + 1: torchvision counts background.
    sizes = dict(min_size=min_size, max_size=max_size, **cfg.kwargs)
    if cfg.name == MOBILE_MASKRCNN:
        model = _mobile_maskrcnn(cfg.num_classes + 1, **sizes)
    else:
        model = get_model(cfg.name, weights=None, weights_backbone=None, num_classes=cfg.num_classes + 1, **sizes)
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


def _mobile_maskrcnn(num_classes: int, **kwargs) -> torch.nn.Module:
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v3_large", weights=None, fpn=True, norm_layer=torch.nn.BatchNorm2d, trainable_layers=6
    )
    anchor_sizes = ((32, 64, 128, 256, 512),) * 3
    anchors = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    return MaskRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **kwargs)


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


# --- transformers detectors --------------------------------------------------------------------


def transformers_config(cfg: DetectionModelConfig) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.name, local_files_only=True, num_labels=cfg.num_classes, **cfg.kwargs)
    if getattr(config, "use_pretrained_backbone", False):  # a timm/HF backbone would be downloaded
        config.use_pretrained_backbone = False
    return config


class HFDetectorIO:
    """What a transformers detector takes and gives, from and to the recipe's torchvision-style
    batch: images normalised as its image processor says, padded into one tensor with a pixel
    mask; targets as 0-based `class_labels` and normalised (cx, cy, w, h) boxes; predictions
    post-processed by its image processor to boxes in each image's original size, labels 1..K."""

    def __init__(self, cfg: DetectionModelConfig, min_size: int, max_size: int):
        self.model_type = transformers_config(cfg).model_type
        self.processor = image_processor(cfg)
        self.min_size, self.max_size = min_size, max_size
        normalise = getattr(self.processor, "do_normalize", False)
        self.mean = torch.tensor(self.processor.image_mean if normalise else [0.0, 0.0, 0.0]).view(3, 1, 1)
        self.std = torch.tensor(self.processor.image_std if normalise else [1.0, 1.0, 1.0]).view(3, 1, 1)

    def inputs(self, images: list[torch.Tensor], resize: bool) -> dict[str, torch.Tensor]:
        """Training images come resized by the data pipeline; evaluation images are resized here
        (the shorter side to min_size, the longer capped at max_size), as torchvision's do."""
        from torchvision.transforms.v2 import functional as TF

        if resize:
            images = [self._resized(image, TF) for image in images]
        height, width = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
        first = images[0]
        pixels = first.new_zeros((len(images), 3, height, width))
        mask = torch.zeros((len(images), height, width), dtype=torch.long, device=first.device)
        for k, image in enumerate(images):
            h, w = image.shape[-2:]
            pixels[k, :, :h, :w] = (image - self.mean.to(image)) / self.std.to(image)
            mask[k, :h, :w] = 1
        return {"pixel_values": pixels, "pixel_mask": mask}

    def _resized(self, image: torch.Tensor, TF: Any) -> torch.Tensor:
        h, w = image.shape[-2:]
        scale = min(self.min_size / min(h, w), self.max_size / max(h, w))
        return TF.resize(image, [round(h * scale), round(w * scale)], antialias=True)

    @staticmethod
    def labels(images: list[torch.Tensor], targets: list[dict]) -> list[dict]:
        out = []
        for image, target in zip(images, targets, strict=True):
            h, w = image.shape[-2:]
            x0, y0, x1, y1 = target["boxes"].float().unbind(-1)
            boxes = torch.stack([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], dim=-1)
            out.append({"class_labels": target["labels"] - 1, "boxes": boxes})
        return out

    def detections(self, outputs: Any, original_sizes: torch.Tensor) -> list[dict]:
        # Post-processing in fp32 whatever the model computed in.
        for name in ("logits", "pred_boxes"):
            setattr(outputs, name, getattr(outputs, name).float())
        results = self.processor.post_process_object_detection(
            outputs, threshold=0.0, target_sizes=original_sizes.tolist()
        )
        # Clipped to the image as torchvision's detectors clip theirs: the DETR family's
        # post-processing leaves a box reaching past the border as it is (an untrained RT-DETR's
        # anchors sit just outside the corners).
        return [
            {"boxes": clip_boxes_to_image(r["boxes"], (h, w)), "scores": r["scores"], "labels": r["labels"] + 1}
            for r, (h, w) in zip(results, original_sizes.tolist(), strict=True)
        ]


def write_detector_folder(
    model: torch.nn.Module, hf_io: HFDetectorIO, class_names: list[str], num_classes: int, folder: str
) -> None:
    """A transformers detector's model folder beside its weights: config.json with the data's
    category names as id2label (label k is the k-th category), and the run's own image processor
    (`hf_io.processor`) resizing as the run evaluated (the shorter side to min_size, the longer at
    most max_size), for `AutoModelForObjectDetection.from_pretrained(FOLDER)` and
    `AutoImageProcessor`. Reads no parameter."""
    names = [*class_names, *(f"class_{k}" for k in range(len(class_names), num_classes))]
    save_labelled_config(model, names, folder)
    processor = copy.deepcopy(hf_io.processor)
    processor.size = {"shortest_edge": hf_io.min_size, "longest_edge": hf_io.max_size}
    processor.save_pretrained(folder)


def image_processor(cfg: DetectionModelConfig) -> Any:
    """The model's own image processor: the folder's preprocessor_config.json, else the default
    one transformers pairs with the config's model type."""
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    folder = cfg.name if os.path.isdir(cfg.name) else os.path.dirname(cfg.name)
    if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        return transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    model_type = transformers_config(cfg).model_type
    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) or IMAGE_PROCESSOR_MAPPING_NAMES.get(
        model_type.removesuffix("_v2")
    )
    if not names:
        raise ConfigError(
            f"model.name: transformers pairs no image processor with model type {model_type!r}; put its "
            f"preprocessor_config.json beside {cfg.name}"
        )
    name = names.get("torchvision") if isinstance(names, dict) else names
    return getattr(transformers, str(name))()
