"""Classification metrics against scikit-learn, fed batch by batch as the evaluator does."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import log_loss, top_k_accuracy_score

from core.commands.report import per_class_table, read_run, render
from recipes.classification.metrics import ClassificationMetrics
from tests.builders import QUICK_RUN, image_bytes, noise_image


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


def test_per_class_top1_counts_each_sample_once_by_its_class():
    """A hand-made case fed in uneven batches: per class, the samples whose best guess is their
    class over the samples of that class, counted here one by one; a class with no sample has none."""
    names = ["cat", "dog", "owl", "emu"]  # emu never a target
    target = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
    best = [0, 1, 0, 1, 1, 3, 2, 0, 0, 0]  # cat 3/4, dog 2/2, owl 1/4
    metrics = ClassificationMetrics(names)
    for lo, hi in ((0, 3), (3, 4), (4, 10)):
        y = torch.tensor(target[lo:hi])
        top = torch.tensor(best[lo:hi])
        topk = torch.stack([top, (top + 1) % 4, (top + 2) % 4], dim=1)  # 4 classes: a top-3
        metrics.update({"loss": torch.zeros(hi - lo), "topk": topk, "target": y})
    got = metrics.compute()
    for c, name in enumerate(names):
        samples = sum(1 for t in target if t == c)
        right = sum(1 for t, b in zip(target, best, strict=True) if t == b == c)
        if samples:
            assert got[f"top1/{name}"] == 100 * right / samples
        else:
            assert np.isnan(got[f"top1/{name}"])
    assert [got["top1/cat"], got["top1/dog"], got["top1/owl"]] == [75.0, 100.0, 25.0]
    assert got["top1"] == 60.0 and got["samples"] == 10  # the overall values as before
    lines = metrics.table().splitlines()
    assert lines[0].split() == ["class", "top1", "samples"]
    assert [line.split() for line in lines[1:]] == [
        ["cat", "75.00", "4"],
        ["dog", "100.00", "2"],
        ["owl", "25.00", "4"],
        ["emu", "nan", "0"],
    ]
    assert ClassificationMetrics().table() == ""  # no names, no table (and only the overall keys)
    assert set(ClassificationMetrics().compute()) == {"loss", "top1", "top5", "samples"}


def test_class_names_come_from_the_data(tmp_path):
    """The digits' names, a ClassLabel column's names, class_<i> for plain integer labels."""
    import datasets

    from core.config_parsing import parse_args
    from recipes.classification.task import ClassificationConfig, ClassificationTask

    def task(*args):
        argv = ["--output-dir", str(tmp_path / "run"), "--model.name", "test_vit", "--data.image_size", "16", *args]
        task = ClassificationTask(parse_args(ClassificationConfig, argv))
        task.build_datasets()
        return task.class_names, task.build_metrics().class_names

    assert task("--model.num_classes", "10") == ([str(i) for i in range(10)],) * 2
    for label, root, expected in (
        (datasets.ClassLabel(names=["ant", "bee"]), tmp_path / "named", ["ant", "bee"]),
        (datasets.Value("int64"), tmp_path / "plain", ["class_0", "class_1", "class_2"]),
    ):
        features = datasets.Features({"image": datasets.Image(), "label": label})
        split = datasets.Dataset.from_dict(
            {"image": [{"bytes": image_bytes(i), "path": f"{i}.png"} for i in range(2)], "label": [0, 1]},
            features=features,
        )
        datasets.DatasetDict({"train": split, "val": split}).save_to_disk(str(root))
        names = task("--model.num_classes", "3", "--data.source", "hf_disk", "--data.root", str(root))
        assert names == (expected, expected)


def test_the_per_class_table_reaches_the_console_metrics_jsonl_and_the_report(tmp_path, capsys, fresh_accelerate_state):
    """A real (tiny, in-process) run on an ImageFolder tree: its folder names name the rows of
    the table logged after the evaluation, the `top1/<class>` values of metrics.jsonl's eval row
    and the report's per-class table, as segmentation's IoU/<class> do."""
    classes = ("cat", "dog", "owl")
    for split, n in (("train", 2), ("val", 2)):
        for c in classes:
            for i in range(n):
                noise_image(tmp_path / "data" / split / c / f"{i}.jpg")
    run_dir = tmp_path / "run"
    args = ["--model.name", "test_vit", "--model.kwargs", "{img_size: 16}", "--model.num_classes", "3"]
    args += ["--data.image_size", "16", "--data.micro_batch_size", "4", "--data.source", "imagefolder"]
    args += ["--data.root", str(tmp_path / "data"), "--output-dir", str(run_dir), *QUICK_RUN]
    values = importlib.import_module("recipes.classification.train").main(args)

    per_class = {name: values[f"top1/{name}"] for name in classes}
    assert all(v in (0.0, 50.0, 100.0) for v in per_class.values())  # 2 images per class
    assert sum(per_class.values()) / 3 == pytest.approx(values["top1"])  # equal classes: the mean is top1
    console = capsys.readouterr().err
    table = console.split("per-class results\n", 1)[1].splitlines()
    assert table[0].split() == ["class", "top1", "samples"]
    assert [row.split() for row in table[1:4]] == [[c, f"{per_class[c]:.2f}", "2"] for c in classes]

    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    evaluation = [row for row in rows if row["split"] == "eval"][-1]
    assert {k: v for k, v in evaluation.items() if "/" in k} == {f"top1/{c}": per_class[c] for c in classes}
    header, table_rows = per_class_table(read_run(str(run_dir)).last_eval)
    assert header == ["class", "top1"] and table_rows == [[c, f"{per_class[c]:.4g}"] for c in classes]
    page = render([read_run(str(run_dir))])
    assert "<th>class</th><th>top1</th>" in page and f"<tr><td>owl</td><td>{per_class['owl']:.4g}</td></tr>" in page
