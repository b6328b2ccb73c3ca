"""Top-1 / top-5 accuracy, mean loss and per-class top-1 accuracy, from per-sample outputs
gathered across ranks.

The evaluator gathers every rank's outputs with the padding of the last batch dropped, so each
sample arrives here once and is counted once, by its target class. Per class: top-1 accuracy over
that class's samples (`top1/<class>` in metrics.jsonl, percent like `top1`); a class with no
sample in the evaluation set has none (NaN)."""

from __future__ import annotations

import torch

from core.task import Metrics


class ClassificationMetrics(Metrics):
    def __init__(self, class_names: list[str] | None = None) -> None:
        """`class_names`: one per label 0..len-1, for the per-class table; None: no table."""
        self.class_names = list(class_names or [])
        n = len(self.class_names)
        self.count = 0
        self.correct1 = 0
        self.correct5 = 0
        self.loss_sum = 0.0
        self.samples_per_class = torch.zeros(n, dtype=torch.int64)
        self.correct1_per_class = torch.zeros(n, dtype=torch.int64)

    def update(self, outputs: dict[str, torch.Tensor]) -> None:
        target = outputs["target"].cpu()
        topk = outputs["topk"].cpu()  # [N, k] class indices, best first
        hits = topk == target[:, None]
        self.count += len(target)
        self.correct1 += int(hits[:, 0].sum())
        self.correct5 += int(hits[:, :5].any(dim=1).sum())
        self.loss_sum += float(outputs["loss"].double().sum())
        if self.class_names:
            self.samples_per_class += self._by_class(target)
            self.correct1_per_class += self._by_class(target[hits[:, 0]])

    def _by_class(self, labels: torch.Tensor) -> torch.Tensor:
        n = len(self.class_names)
        counts = torch.bincount(labels.long(), minlength=n)
        if len(counts) > n:
            raise ValueError(f"label {int(labels.max())} has no class name: the table names {n} classes")
        return counts

    def per_class_top1(self) -> torch.Tensor:
        """Top-1 accuracy of each class in percent, NaN where the class has no sample."""
        samples = self.samples_per_class
        accuracy = 100.0 * self.correct1_per_class.double() / samples.clamp(min=1)
        return torch.where(samples > 0, accuracy, torch.full_like(accuracy, float("nan")))

    def compute(self) -> dict[str, float]:
        n = max(self.count, 1)
        out = {
            "loss": self.loss_sum / n,
            "top1": 100.0 * self.correct1 / n,
            "top5": 100.0 * self.correct5 / n,
            "samples": float(self.count),
        }
        top1 = self.per_class_top1().tolist()
        out.update({f"top1/{name}": value for name, value in zip(self.class_names, top1, strict=True)})
        return out

    def table(self) -> str:
        if not self.class_names:
            return ""
        rows = [f"{'class':<24} {'top1':>7} {'samples':>9}"]
        top1, samples = self.per_class_top1().tolist(), self.samples_per_class.tolist()
        for name, value, count in zip(self.class_names, top1, samples, strict=True):
            rows.append(f"{name:<24} {value:7.2f} {count:9d}")
        return "\n".join(rows)
