"""Segmentation recipe: metrics against independent references, data checks, transforms, models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import ConfigError, DataError
from recipes.segmentation.data import SegmentationDataConfig, build_datasets, collate
from recipes.segmentation.metrics import SegmentationMetrics, confusion_matrix
from recipes.segmentation.models import SegmentationModelConfig, build_model, logits_of
from tests.helpers import REPO

IGNORE = 255


def numpy_reference(preds, targets, num_classes):
    """IoU per class by boolean masks over all images; NaN where a class is in neither."""
    p = np.concatenate([x.ravel() for x in preds])
    t = np.concatenate([x.ravel() for x in targets])
    keep = t != IGNORE
    p, t = p[keep], t[keep]
    iou = []
    for c in range(num_classes):
        inter, union = np.sum((p == c) & (t == c)), np.sum((p == c) | (t == c))
        iou.append(inter / union if union else np.nan)
    acc = [np.sum((p == c) & (t == c)) / np.sum(t == c) if np.sum(t == c) else np.nan for c in range(num_classes)]
    return np.array(iou), np.mean(p == t), np.nanmean(acc)


def feed(preds, targets, num_classes, names=None):
    metrics = SegmentationMetrics(names or [f"c{i}" for i in range(num_classes)])
    for pred, target in zip(preds, targets, strict=True):  # one image per update, as gathered batches arrive
        conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), num_classes, IGNORE)
        metrics.update({"confusion": conf[None], "loss": torch.zeros(1)})
    return metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_match_numpy_and_torchmetrics(seed):
    from torchmetrics.functional.classification import multiclass_jaccard_index

    rng = np.random.default_rng(seed)
    n = 6
    preds, targets = [], []
    for _ in range(5):
        h, w = rng.integers(5, 30, 2)
        t = rng.integers(0, n - 1, (h, w))  # class n-1 never in the targets ...
        t[rng.random((h, w)) < 0.2] = IGNORE  # ... and a fifth of the pixels ignored
        p = rng.integers(0, n - 2, (h, w))  # classes n-2, n-1 never predicted: n-1 absent from both
        preds.append(p)
        targets.append(t)
    got = feed(preds, targets, n).compute()
    iou, pixel_acc, mean_acc = numpy_reference(preds, targets, n)
    assert np.isnan(iou[n - 1]) and np.isnan(got[f"IoU/c{n - 1}"])
    for c in range(n - 1):
        assert got[f"IoU/c{c}"] == pytest.approx(100 * iou[c])
    assert got["mIoU"] == pytest.approx(100 * np.nanmean(iou))
    assert got["pixel_acc"] == pytest.approx(100 * pixel_acc)
    assert got["mean_acc"] == pytest.approx(100 * mean_acc)

    tm = multiclass_jaccard_index(
        torch.from_numpy(np.concatenate([p.ravel() for p in preds])),
        torch.from_numpy(np.concatenate([t.ravel() for t in targets])),
        num_classes=n,
        average="none",
        ignore_index=IGNORE,
    )
    for c in range(n - 1):  # torchmetrics has no NaN for the absent class
        assert got[f"IoU/c{c}"] == pytest.approx(100 * float(tm[c]), abs=1e-4)


def test_known_case():
    target = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [IGNORE, IGNORE, 2, 2]])
    pred = np.array([[0, 0, 1, 0], [0, 0, 1, 1], [1, 1, 2, 1]])
    got = feed([pred], [target], 4).compute()
    # class 0: tp 4, fp 1 -> 4/5; class 1: tp 3, fn 1, fp 1 -> 3/5; class 2: tp 1, fn 1 -> 1/2; class 3 absent.
    assert (
        got["IoU/c0"] == pytest.approx(80) and got["IoU/c1"] == pytest.approx(60) and got["IoU/c2"] == pytest.approx(50)
    )
    assert got["mIoU"] == pytest.approx(100 * (0.8 + 0.6 + 0.5) / 3)
    assert got["pixel_acc"] == pytest.approx(100 * 8 / 10)
    assert "c3" in feed([pred], [target], 4).table()


def write_voc(root, masks, sizes=None):
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for i, mask in enumerate(masks):
        h, w = sizes[i] if sizes else mask.shape
        Image.new("RGB", (w, h), (100, 50, 0)).save(root / "JPEGImages" / f"{i}.jpg")
        Image.fromarray(mask.astype(np.uint8), mode="L").save(root / "SegmentationClass" / f"{i}.png")
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(str(i) for i in range(len(masks))))


def test_voc_loader_transforms_and_errors(tmp_path):
    good = np.zeros((20, 30), dtype=np.uint8)
    good[5:10, 5:10] = 2
    good[0] = IGNORE
    write_voc(tmp_path / "voc", [good, good])
    cfg = SegmentationDataConfig(source="voc", root=str(tmp_path / "voc"), image_size=16, micro_batch_size=2)
    train, val = build_datasets(cfg, num_classes=3, seed=0)
    sample = train[0]
    assert (
        sample["image"].shape == (3, 16, 16)
        and sample["mask"].shape == (16, 16)
        and sample["mask"].dtype == torch.int64
    )
    assert set(sample["mask"].unique().tolist()) <= {0, 2, IGNORE}  # nearest: no blended labels
    batch = collate([val[0], val[1]])
    assert batch["image"].shape == (2, 3, 16, 24) and batch["mask"].shape == (2, 20, 30)  # eval masks keep their size

    bad = good.copy()
    bad[0, 0] = 7
    write_voc(tmp_path / "bad", [bad])
    with pytest.raises(DataError, match=r"0\.png: mask values \[7\] are outside 0\.\.2 and not ignore_index \(255\)"):
        build_datasets(SegmentationDataConfig(source="voc", root=str(tmp_path / "bad")), 3, 0)[1][0]
    write_voc(tmp_path / "size", [good], sizes=[(21, 30)])
    with pytest.raises(DataError, match=r"0\.png: mask is 30x20 but .*0\.jpg is 30x21"):
        build_datasets(SegmentationDataConfig(source="voc", root=str(tmp_path / "size")), 3, 0)[1][0]
    (tmp_path / "size" / "JPEGImages" / "0.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"0\.jpg: cannot read image"):
        build_datasets(SegmentationDataConfig(source="voc", root=str(tmp_path / "size")), 3, 0)[1][0]
    with pytest.raises(ConfigError, match=r"ImageSets/Segmentation/train\.txt is missing"):
        build_datasets(SegmentationDataConfig(source="voc", root=str(tmp_path)), 3, 0)


def test_ade20k_layout_with_reduced_zero_label(tmp_path):
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        Image.new("RGB", (8, 6)).save(tmp_path / "images" / split / "a.jpg")
        mask = np.array([[0, 1, 2, 3] * 2] * 6, dtype=np.uint8)
        Image.fromarray(mask, mode="L").save(tmp_path / "annotations" / split / "a.png")
    cfg = SegmentationDataConfig(
        source="ade20k",
        root=str(tmp_path),
        train_split="training",
        eval_split="validation",
        reduce_zero_label=True,
        image_size=6,
    )
    _, val = build_datasets(cfg, num_classes=3, seed=0)
    assert val[0]["mask"][0].tolist() == [IGNORE, 0, 1, 2] * 2


def test_datasets_on_disk(tmp_path):
    import datasets

    images = [Image.new("RGB", (10, 8)) for _ in range(2)]
    masks = [Image.fromarray(np.full((8, 10), i, dtype=np.uint8), mode="L") for i in range(2)]
    split = datasets.Dataset.from_dict(
        {"image": images, "mask": masks},
        features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image()}),
    )
    datasets.DatasetDict({"train": split, "val": split}).save_to_disk(str(tmp_path / "ds"))
    _, val = build_datasets(SegmentationDataConfig(source="hf_disk", root=str(tmp_path / "ds"), image_size=8), 2, 0)
    assert val[1]["mask"].unique().tolist() == [1]


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50"])
def test_torchvision_models(name):
    model = build_model(SegmentationModelConfig(name=name, num_classes=5)).eval()
    main, aux = logits_of(model, torch.randn(1, 3, 64, 64))
    assert main.shape == (1, 5, 64, 64) and (aux is None) == name.startswith("lraspp")


def test_transformers_segformer_from_local_config():
    cfg = SegmentationModelConfig(
        source="transformers", name=str(REPO / "recipes/segmentation/configs/segformer_tiny"), num_classes=4
    )
    model = build_model(cfg).eval()
    assert type(model).__name__ == "SegformerForSemanticSegmentation"
    main, aux = logits_of(model, torch.randn(2, 3, 64, 64))
    assert main.shape == (2, 4, 64, 64) and aux is None


def test_transformers_upernet_from_local_config(tmp_path):
    from transformers import ConvNextConfig, UperNetConfig

    backbone = ConvNextConfig(
        hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    UperNetConfig(backbone_config=backbone, hidden_size=64, auxiliary_in_channels=64).save_pretrained(tmp_path)
    model = build_model(SegmentationModelConfig(source="transformers", name=str(tmp_path), num_classes=4))
    assert type(model).__name__ == "UperNetForSemanticSegmentation"
    main, _ = logits_of(model, torch.randn(2, 3, 64, 64))
    assert main.shape == (2, 4, 64, 64)


class PixelModel(torch.nn.Module):
    """Per-pixel logits (a 1x1 conv): windowed inference must reproduce whole-image inference."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def test_sliding_window_inference():
    from recipes.segmentation.task import slide_logits

    model = PixelModel().eval()
    with torch.no_grad():
        for h, w in ((50, 70), (20, 30)):  # larger than the window, and smaller (padded)
            image = torch.randn(1, 3, h, w)
            whole = model(image)["out"]
            slid = slide_logits(model, image, window=32, stride=21, num_classes=4)
            assert slid.shape == whole.shape
            assert torch.allclose(slid, whole, atol=1e-5)


def test_shapes_are_generated_once_deterministically(tmp_path):
    cfg = SegmentationDataConfig(source="shapes", root=str(tmp_path / "a"), shapes_count=[3, 2], image_size=32)
    train, val = build_datasets(cfg, num_classes=4, seed=0)
    assert (len(train), len(val)) == (3, 2)
    build_datasets(SegmentationDataConfig(source="shapes", root=str(tmp_path / "b"), shapes_count=[3, 2]), 4, 0)
    written = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(written) == 5
    for rel in written:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["shapes-seg-v1-3-2"]  # no partial folder left
