"""The classification task: what one training and one evaluation step compute."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from core.config import TrainConfig, section
from core.shards import SHARD_SUFFIX
from core.task import Task
from recipes.classification.data import ClassificationDataConfig, build_datasets, normalized, shard_samples
from recipes.classification.metrics import ClassificationMetrics
from recipes.classification.models import ClassificationModelConfig, build_model, logits_of, write_model_folder


class Logits(torch.nn.Module):
    """The model's logits alone, whichever library built it: what ONNX exports."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(pixel_values))


@dataclass
class ClassificationConfig(TrainConfig):
    model: ClassificationModelConfig = section(ClassificationModelConfig, "Model.")
    data: ClassificationDataConfig = section(ClassificationDataConfig, "Data.")


class ClassificationTask(Task):
    primary_metric = "top1"
    higher_is_better = True

    def __init__(self, cfg: ClassificationConfig):
        super().__init__(cfg)
        d = cfg.data
        self.mixup = None
        if d.mixup_alpha > 0 or d.cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=d.mixup_alpha,
                cutmix_alpha=d.cutmix_alpha,
                prob=d.mixup_prob,
                label_smoothing=d.label_smoothing,
                num_classes=cfg.model.num_classes,
            )
        # The per-class table's names: the data's own (build_datasets), else class_<i>.
        self.class_names = [f"class_{i}" for i in range(cfg.model.num_classes)]

    def build_model(self) -> torch.nn.Module:
        return build_model(self.cfg.model)

    def onnx_module(self, model: torch.nn.Module) -> torch.nn.Module:
        return Logits(model)

    def on_device(self, batch: dict) -> dict:
        if self.cfg.data.fast_decode:  # uint8 images from the loader
            return {**batch, "image": normalized(batch["image"], self.cfg.data.mean, self.cfg.data.std)}
        return batch

    def build_datasets(self):
        train, val = build_datasets(self.cfg.data, self.cfg.model.num_classes, self.cfg.seed)
        # The training split's names are the model's labels (ImageFolder folders, a ClassLabel
        # column's names, the digits), else the evaluation split's; unnamed sets keep class_<i>.
        named = [getattr(getattr(split, "base", split), "classes", None) for split in (train, val)]
        names = next((n for n in named if n), None)
        if names:
            self.class_names = [str(name) for name in names]
        if self.cfg.data.source in SHARD_SUFFIX:
            self.train_shards = train.base.index
        return train, val

    def write_model_folder(self, model: torch.nn.Module, folder: str) -> None:
        write_model_folder(model, self.cfg.model, self.cfg.data, self.class_names, folder)

    def shard_samples(self, problems: list[str]):
        return shard_samples(self.cfg.data, self.cfg.model.num_classes, problems)

    def training_step(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        if self.mixup is not None:  # soft targets, label smoothing folded in
            images, targets = self.mixup(images, labels)
            return SoftTargetCrossEntropy()(logits_of(model(images)).float(), targets)
        return F.cross_entropy(logits_of(model(images)).float(), labels, label_smoothing=self.cfg.data.label_smoothing)

    def evaluation_step(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        logits = logits_of(model(batch["image"])).float()
        k = min(5, logits.shape[1])
        return {
            "loss": F.cross_entropy(logits, batch["label"], reduction="none"),
            "topk": logits.topk(k, dim=1).indices,
            "target": batch["label"],
        }

    def build_metrics(self) -> ClassificationMetrics:
        return ClassificationMetrics(self.class_names)
