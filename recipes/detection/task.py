"""The detection task: what one training and one evaluation step compute."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.config import TrainConfig, section
from core.errors import ConfigError
from core.model_folder import write_torchvision_spec
from core.shards import SHARD_SUFFIX
from core.task import Task
from recipes.detection.data import DetectionDataConfig, build_datasets, collate, shard_samples
from recipes.detection.metrics import CocoMetrics, mask_rles
from recipes.detection.models import (
    MOBILE_MASKRCNN,
    DetectionModelConfig,
    HFDetectorIO,
    build_model,
    predicts_masks,
    write_detector_folder,
)


@dataclass
class DetectionConfig(TrainConfig):
    model: DetectionModelConfig = section(DetectionModelConfig, "Model.")
    data: DetectionDataConfig = section(DetectionDataConfig, "Data.")


# transformers detectors that add fp32 position embeddings to the activations ahead of a LayerNorm.
# With DeepSpeed's bf16 weights under CPU autocast that LayerNorm gets fp32 inputs and bf16
# weights, which the CPU kernel refuses (CUDA autocast runs LayerNorm in fp32: not tried).
FP32_EMBEDDINGS_BEFORE_LAYER_NORM = ("d_fine", "dab-detr")


class DetectionTask(Task):
    primary_metric = "AP"
    higher_is_better = True
    autocast_half_weights = True  # NMS and DETR's matcher have no bf16 CPU kernels; anchors are fp32

    def __init__(self, cfg: DetectionConfig):
        super().__init__(cfg)
        d = cfg.data
        self.hf = HFDetectorIO(cfg.model, d.min_size, d.max_size) if cfg.model.source == "transformers" else None

    def build_model(self) -> torch.nn.Module:
        return build_model(self.cfg.model, self.cfg.data.min_size, self.cfg.data.max_size)

    def check_strategy(self, strategy: str, precision: str, device: torch.device) -> None:
        if self.hf is None or strategy != "deepspeed" or precision == "no" or device.type != "cpu":
            return
        model_type = self.hf.model_type
        if model_type in FP32_EMBEDDINGS_BEFORE_LAYER_NORM:
            raise ConfigError(
                f"model type {model_type!r} cannot train on DeepSpeed's {precision} weights on CPU: it adds fp32 "
                "position embeddings ahead of a LayerNorm whose weights CPU autocast leaves in 16 bits, which the "
                "CPU kernel refuses. Use --loop.precision no, or DDP (accelerate_configs/multi_gpu_ddp.yaml), "
                f"whose {precision} autocasts over fp32 weights."
            )

    def build_datasets(self):
        train, val = build_datasets(self.cfg.data, self.cfg.seed, masks=predicts_masks(self.cfg.model))
        categories = len(train.base.category_ids)  # the run's one table, which the evaluation split follows
        if categories > self.cfg.model.num_classes:
            raise ConfigError(
                f"{train.base.annotations_file} has {categories} categories but model.num_classes is "
                f"{self.cfg.model.num_classes}"
            )
        self.eval_set = val.base
        if self.cfg.data.source in SHARD_SUFFIX:
            self.train_shards = train.base.shards
        return train, val

    def shard_samples(self, problems: list[str]):
        return shard_samples(self.cfg.data, self.cfg.seed, problems)

    def collate(self, samples: list[dict]) -> dict:
        return collate(samples)

    def training_step(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        if self.hf is not None:  # the model's own weighted sum of its losses
            images = batch["image"]
            return model(**self.hf.inputs(images, resize=False), labels=self.hf.labels(images, batch["targets"])).loss
        losses = model(batch["image"], batch["targets"])  # the detector's own dict of losses
        return sum(losses.values())

    def evaluation_step(self, model: torch.nn.Module, batch: dict) -> list[dict]:
        # Boxes (and Mask R-CNN's masks, pasted at full resolution) in each image's own size. Masks
        # travel between ranks as COCO RLE: a few hundred bytes instead of a float image each.
        if self.hf is not None:
            outputs = model(**self.hf.inputs(batch["image"], resize=True))
            detections = self.hf.detections(outputs, batch["original_size"])
        else:
            detections = model(batch["image"])
        return [
            {
                "image_id": int(image_id),
                "boxes": d["boxes"].cpu(),
                "scores": d["scores"].cpu(),
                "labels": d["labels"].cpu(),
                **({"rles": mask_rles(d["masks"])} if "masks" in d else {}),
            }
            for image_id, d in zip(batch["image_id"], detections, strict=True)
        ]

    def write_model_folder(self, model: torch.nn.Module, folder: str) -> None:
        # the evaluation split's category table is the training split's
        names, m, d = self.eval_set.category_names, self.cfg.model, self.cfg.data
        if self.hf is not None:
            write_detector_folder(model, self.hf, names, m.num_classes, folder)
        elif m.name != MOBILE_MASKRCNN:  # a torchvision registry model (the mobile Mask R-CNN is built here)
            labels = ["__background__", *names, *(f"class_{k}" for k in range(len(names), m.num_classes))]
            kwargs = dict(num_classes=m.num_classes + 1, min_size=d.min_size, max_size=d.max_size, **m.kwargs)
            preprocessing = {"input": "RGB float in [0, 1], any size: the model resizes and normalises itself"}
            write_torchvision_spec(folder, m.name, kwargs, labels, preprocessing)

    def build_metrics(self) -> CocoMetrics:
        data = self.eval_set  # its category table names the model's labels: the per-class table's rows
        return CocoMetrics(
            data.coco, data.category_ids, masks=predicts_masks(self.cfg.model), class_names=data.category_names
        )
