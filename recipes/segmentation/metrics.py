"""mIoU, per-class IoU, pixel accuracy and mean accuracy from one confusion matrix.

Each image contributes its own confusion matrix (rows: target, columns: prediction), computed
at the mask's original resolution; these are gathered across ranks with each image once and
summed. A class absent from both targets and predictions has no IoU (NaN) and is left out of the
mean, as is a class absent from the targets from mean accuracy."""

from __future__ import annotations

import torch

from core.task import Metrics


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    keep = target != ignore_index
    index = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


class SegmentationMetrics(Metrics):
    def __init__(self, class_names: list[str]):
        self.class_names = class_names
        n = len(class_names)
        self.confusion = torch.zeros(n, n, dtype=torch.float64)
        self.loss_sum, self.images = 0.0, 0

    def update(self, outputs: dict[str, torch.Tensor]) -> None:
        self.confusion += outputs["confusion"].double().sum(0).cpu()
        self.loss_sum += float(outputs["loss"].double().sum())
        self.images += len(outputs["loss"])

    def per_class_iou(self) -> torch.Tensor:
        tp = self.confusion.diag()
        union = self.confusion.sum(0) + self.confusion.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def compute(self) -> dict[str, float]:
        c = self.confusion
        tp, per_target = c.diag(), c.sum(1)
        iou = self.per_class_iou()
        accuracy = torch.where(per_target > 0, tp / per_target.clamp(min=1), torch.full_like(tp, float("nan")))
        out = {
            "loss": self.loss_sum / max(self.images, 1),
            "mIoU": 100.0 * float(iou.nanmean()),
            "pixel_acc": 100.0 * float(tp.sum() / c.sum().clamp(min=1)),
            "mean_acc": 100.0 * float(accuracy.nanmean()),
            "images": float(self.images),
        }
        out.update({f"IoU/{name}": 100.0 * float(v) for name, v in zip(self.class_names, iou, strict=True)})
        return out

    def table(self) -> str:
        iou = self.per_class_iou()
        rows = [f"{'class':<24} {'IoU':>7} {'pixels':>12}"]
        for name, value, pixels in zip(self.class_names, iou.tolist(), self.confusion.sum(1).tolist(), strict=True):
            rows.append(f"{name:<24} {100 * value:7.2f} {int(pixels):12d}")
        return "\n".join(rows)
