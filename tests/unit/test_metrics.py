"""Classification metrics against scikit-learn, fed batch by batch as the evaluator does."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss, top_k_accuracy_score

from recipes.classification.metrics import ClassificationMetrics


def test_top1_top5_loss_match_sklearn():
    g = torch.Generator().manual_seed(0)
    n, classes = 1003, 12
    logits = torch.randn(n, classes, generator=g) * 2
    target = torch.randint(0, classes, (n,), generator=g)
    metrics = ClassificationMetrics()
    for lo in range(0, n, 64):  # uneven last batch on purpose
        chunk, y = logits[lo : lo + 64], target[lo : lo + 64]
        metrics.update(
            {"loss": F.cross_entropy(chunk, y, reduction="none"), "topk": chunk.topk(5, dim=1).indices, "target": y}
        )
    got = metrics.compute()
    labels = np.arange(classes)
    assert got["top1"] == 100 * top_k_accuracy_score(target.numpy(), logits.numpy(), k=1, labels=labels)
    assert got["top5"] == 100 * top_k_accuracy_score(target.numpy(), logits.numpy(), k=5, labels=labels)
    probs = torch.softmax(logits.double(), dim=1).numpy()
    assert np.isclose(got["loss"], log_loss(target.numpy(), probs, labels=labels), rtol=1e-6)
    assert got["samples"] == n
