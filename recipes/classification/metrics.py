"""Top-1 / top-5 accuracy and mean loss, from per-sample outputs gathered across ranks."""

from __future__ import annotations

import torch

from core.task import Metrics


class ClassificationMetrics(Metrics):
    def __init__(self) -> None:
        self.count = 0
        self.correct1 = 0
        self.correct5 = 0
        self.loss_sum = 0.0

    def update(self, outputs: dict[str, torch.Tensor]) -> None:
        target = outputs["target"].cpu()
        topk = outputs["topk"].cpu()  # [N, k] class indices, best first
        hits = topk == target[:, None]
        self.count += len(target)
        self.correct1 += int(hits[:, 0].sum())
        self.correct5 += int(hits[:, :5].any(dim=1).sum())
        self.loss_sum += float(outputs["loss"].double().sum())

    def compute(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {
            "loss": self.loss_sum / n,
            "top1": 100.0 * self.correct1 / n,
            "top5": 100.0 * self.correct5 / n,
            "samples": float(self.count),
        }
