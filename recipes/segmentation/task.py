"""The semantic segmentation task: what one training and one evaluation step compute."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.config import TrainConfig, option, section
from core.errors import ConfigError
from core.shards import SHARD_SUFFIX
from core.task import Task
from recipes.segmentation.data import SHAPES_CLASSES, SegmentationDataConfig, build_datasets, collate, shard_samples
from recipes.segmentation.metrics import SegmentationMetrics, confusion_matrix
from recipes.segmentation.models import SegmentationModelConfig, build_model, logits_of, write_model_folder


@dataclass
class SegmentationConfig(TrainConfig):
    model: SegmentationModelConfig = section(SegmentationModelConfig, "Model.")
    data: SegmentationDataConfig = section(SegmentationDataConfig, "Data.")
    class_names: list[str] = option([], "Names for the per-class table (default: the shapes names, or class_<i>).")


def slide_logits(
    model: torch.nn.Module, image: torch.Tensor, window: int, stride: int, num_classes: int
) -> torch.Tensor:
    """Average the logits of overlapping window x window crops of one [1, 3, H, W] image."""
    _, _, h, w = image.shape
    pad_h, pad_w = max(window - h, 0), max(window - w, 0)
    padded = F.pad(image, (0, pad_w, 0, pad_h))
    H, W = padded.shape[-2:]
    logits = torch.zeros(1, num_classes, H, W, device=image.device)
    counts = torch.zeros(1, 1, H, W, device=image.device)
    tops = list(range(0, max(H - window, 0) + 1, stride)) or [0]
    lefts = list(range(0, max(W - window, 0) + 1, stride)) or [0]
    tops += [H - window] if tops[-1] != H - window else []
    lefts += [W - window] if lefts[-1] != W - window else []
    for top in tops:
        for left in lefts:
            crop = padded[..., top : top + window, left : left + window]
            logits[..., top : top + window, left : left + window] += logits_of(model, crop)[0].float()
            counts[..., top : top + window, left : left + window] += 1
    return (logits / counts)[..., :h, :w]


class MainLogits(torch.nn.Module):
    """The main head's logits at the input's size, whichever library built the model: what ONNX exports."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model, pixel_values)[0]


class SegmentationTask(Task):
    primary_metric = "mIoU"
    higher_is_better = True

    def __init__(self, cfg: SegmentationConfig):
        super().__init__(cfg)
        n = cfg.model.num_classes
        default = SHAPES_CLASSES if cfg.data.source == "shapes" else [f"class_{i}" for i in range(n)]
        self.class_names = (cfg.class_names or default)[:n]

    def build_model(self) -> torch.nn.Module:
        return build_model(self.cfg.model)

    def build_datasets(self):
        train, val = build_datasets(self.cfg.data, self.cfg.model.num_classes, self.cfg.seed)
        if self.cfg.data.source in SHARD_SUFFIX:
            self.train_shards = train.base.index
            named, n = self.train_shards.classes, self.cfg.model.num_classes
            if len(named) > n:
                raise ConfigError(f"the shards name {len(named)} classes but model.num_classes is {n}")
            if not self.cfg.class_names and named:  # the shards' classes.txt or index
                self.class_names = [*named, *(f"class_{i}" for i in range(len(named), n))]
        return train, val

    def onnx_module(self, model: torch.nn.Module) -> torch.nn.Module:
        return MainLogits(model)

    def write_model_folder(self, model: torch.nn.Module, folder: str) -> None:
        write_model_folder(model, self.cfg.model, self.cfg.data, self.class_names, folder)

    def shard_samples(self, problems: list[str]):
        return {"classes": self.class_names}, shard_samples(self.cfg.data, self.cfg.model.num_classes, problems)

    def collate(self, samples: list[dict]) -> dict:
        return collate(samples)

    def training_step(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        main, aux = logits_of(model, batch["image"])
        ignore = self.cfg.data.ignore_index
        loss = F.cross_entropy(main.float(), batch["mask"], ignore_index=ignore)
        if aux is not None:
            loss = loss + self.cfg.model.aux_weight * F.cross_entropy(aux.float(), batch["mask"], ignore_index=ignore)
        return loss

    def evaluation_step(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Per image: logits cropped to the image's own extent (eval batches are padded),
        upsampled to the mask's original size, then a confusion matrix and the mean loss."""
        d, n = self.cfg.data, self.cfg.model.num_classes
        images = batch["image"]
        whole = None if d.eval_mode == "slide" else logits_of(model, images)[0].float()
        confusions, losses = [], []
        for i, (h, w) in enumerate(batch["extent"].tolist()):
            image = images[i : i + 1, :, :h, :w]
            logits = (
                slide_logits(model, image, d.image_size, d.slide_stride, n)
                if whole is None
                else whole[i : i + 1, :, :h, :w]
            )
            mask = batch["mask"][i].to(logits.device)
            logits = F.interpolate(logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)
            valid = (mask != d.ignore_index).sum().clamp(min=1)
            losses.append(
                F.cross_entropy(logits, mask[None].long(), ignore_index=d.ignore_index, reduction="sum") / valid
            )
            confusions.append(confusion_matrix(logits.argmax(1)[0], mask, n, d.ignore_index))
        return {"confusion": torch.stack(confusions), "loss": torch.stack(losses)}

    def build_metrics(self) -> SegmentationMetrics:
        return SegmentationMetrics(self.class_names)
