"""Detection recipe: COCO mAP against pycocotools on known answers, the COCO loader's checks,
box-aware transforms and the model options."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from recipes.detection.data import DataError, DetectionDataConfig, build_datasets, collate
from recipes.detection.metrics import CocoMetrics
from recipes.detection.models import DetectionModelConfig, build_model
from tests.builders import load_gt, pycocotools_direct


def write_coco(root, boxes_per_image, size=(64, 48), categories=(1, 2), extra_annotations=(), missing_image=None):
    """Images of `size` (w, h) and one annotation per (category, box) listed for each image."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, ann_id = [], [], 1
    for image_id, boxes in enumerate(boxes_per_image, start=1):
        name = f"{image_id}.jpg"
        if image_id != missing_image:
            Image.new("RGB", size, (90, 90, 90)).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name, "width": size[0], "height": size[1]})
        for category, box in boxes:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": list(box),
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    annotations += list(extra_annotations)
    path = root / "instances.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": c, "name": f"c{c}"} for c in categories],
            }
        )
    )
    return path


GT = [[(1, (4, 4, 20, 16)), (2, (30, 10, 24, 30))], [(2, (10, 8, 30, 20))], []]  # the third image has no object


def predictions_from(boxes_per_image, shift=0.0, score=0.9):
    """Per-image predictions as the detector returns them (xyxy, labels 1..K), boxes shifted right."""
    out = []
    for image_id, boxes in enumerate(boxes_per_image, start=1):
        xyxy = [[x + shift, y, x + w + shift, y + h] for _, (x, y, w, h) in boxes]
        out.append(
            {
                "image_id": image_id,
                "boxes": torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.full((len(boxes),), score),
                "labels": torch.tensor([c for c, _ in boxes], dtype=torch.int64),
            }
        )
    return out


def evaluate(tmp_path, predictions):
    gt_path = write_coco(tmp_path, GT)
    metrics = CocoMetrics(load_gt(gt_path), [1, 2])
    for prediction in predictions:  # one image per update, as gathered batches arrive
        metrics.update([prediction])
    values = metrics.compute()
    metrics.write(str(tmp_path / "eval"), values)
    direct = (
        pycocotools_direct(gt_path, tmp_path / "eval" / "predictions.json") if metrics.results else None
    )  # pycocotools cannot load []
    return values, direct


def test_perfect_predictions_score_one(tmp_path):
    values, direct = evaluate(tmp_path, predictions_from(GT))
    assert values["AP"] == values["AP50"] == values["AP75"] == 1.0
    assert values["images"] == 3
    assert values["AP"] == direct[0]
    assert json.load(open(tmp_path / "eval" / "metrics.json"))["AP"] == 1.0


def test_known_shift_gives_the_known_value(tmp_path):
    """Every box shifted right by 3 px. Category 1's box (20x16) keeps IoU 272/368 = 0.74,
    category 2's boxes 630/810 = 0.78 and 540/660 = 0.82. So at IoU 0.5 everything matches
    (AP50 = 1), at 0.75 category 1 misses and category 2 matches both (AP75 = (0 + 1) / 2)."""
    values, direct = evaluate(tmp_path, predictions_from(GT, shift=3.0))
    assert values["AP50"] == pytest.approx(1.0)
    assert values["AP75"] == pytest.approx(0.5)
    assert [values[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == pytest.approx(list(direct[:6]))


def test_no_predictions_and_all_wrong_labels(tmp_path):
    values, _ = evaluate(
        tmp_path,
        [
            {
                "image_id": 1,
                "boxes": torch.zeros(0, 4),
                "scores": torch.zeros(0),
                "labels": torch.zeros(0, dtype=torch.int64),
            }
        ],
    )
    assert values["AP"] == 0.0
    swapped = [dict(p, labels=3 - p["labels"]) for p in predictions_from(GT)]
    values, direct = evaluate(tmp_path / "swapped", swapped)
    assert values["AP"] == 0.0 and direct[0] == 0.0


def test_coco_loader_checks_and_policies(tmp_path):
    bad = [
        {"id": 90, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
        {"id": 91, "image_id": 2, "category_id": 1, "bbox": [1, 1, 0, 5], "area": 0, "iscrowd": 0},
        {"id": 92, "image_id": 2, "category_id": 1, "bbox": [50, 40, 30, 30], "area": 900, "iscrowd": 0},
    ]
    write_coco(tmp_path, GT, extra_annotations=bad)
    cfg = DetectionDataConfig(
        source="coco",
        root=str(tmp_path),
        train_images="images",
        train_annotations="instances.json",
        eval_images="images",
        eval_annotations="instances.json",
        min_size=48,
        max_size=64,
    )
    with pytest.raises(DataError, match=r"instances\.json: annotation 90 of image 1 \(1\.jpg\): unknown category_id 7"):
        build_datasets(cfg, 0)
    cfg.bad_samples = "skip"
    train, val = build_datasets(cfg, 0)
    assert len(val) == 3 and val.base.targets[2]["boxes"] == [[10, 8, 40, 28]]  # 91 and 92 dropped
    assert [p.split(": ", 1)[1] for p in val.problems] == [
        "annotation 90 of image 1 (1.jpg): unknown category_id 7",
        "annotation 91 of image 2 (2.jpg): zero-area box [1, 1, 0, 5]",
        "annotation 92 of image 2 (2.jpg): box [50, 40, 30, 30] outside the 64x48 image",
    ]
    sample = val[0]
    assert sample["image"].shape == (3, 48, 64) and sample["boxes"].tolist() == [[4, 4, 24, 20], [30, 10, 54, 40]]
    assert val[2]["boxes"].shape == (0, 4)  # an image without annotations is kept
    batch = collate([train[0], train[2]])
    assert len(batch["image"]) == 2 and batch["image_id"].tolist() == [1, 3]
    flipped = DetectionDataConfig(**{**cfg.__dict__, "hflip": 1.0})
    train, _ = build_datasets(flipped, 0)
    assert train[0]["boxes"].tolist() == [[40, 4, 60, 20], [10, 10, 34, 40]]  # mirrored with the image

    write_coco(tmp_path / "missing", GT, missing_image=2)
    cfg = DetectionDataConfig(
        source="coco",
        root=str(tmp_path / "missing"),
        train_images="images",
        train_annotations="instances.json",
        eval_images="images",
        eval_annotations="instances.json",
    )
    with pytest.raises(DataError, match=r"instances\.json: 1 images are missing, e\.g\. image 2: .*2\.jpg"):
        build_datasets(cfg, 0)
    cfg.bad_samples = "skip"
    assert len(build_datasets(cfg, 0)[1]) == 2
    (tmp_path / "missing" / "images" / "1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"images/1\.jpg: cannot read image \(cannot identify image file"):
        build_datasets(cfg, 0)[1][0]


def test_model_options():
    model = build_model(
        DetectionModelConfig(
            name="fasterrcnn_resnet50_fpn", num_classes=3, frozen_bn=True, trainable_backbone_layers=2
        ),
        64,
        64,
    )
    from torchvision.ops.misc import FrozenBatchNorm2d

    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 50, 70)])
    assert set(out[0]) == {"boxes", "scores", "labels"}


def test_shapes_are_generated_once_deterministically(tmp_path):
    for name in ("a", "b"):
        cfg = DetectionDataConfig(
            source="shapes", root=str(tmp_path / name), shapes_count=[4, 2], min_size=64, max_size=64
        )
        train, val = build_datasets(cfg, 0)
    assert (len(train), len(val)) == (4, 2)
    a = tmp_path / "a" / "shapes-det-v1-4-2" / "annotations" / "instances_train.json"
    assert (
        a.read_bytes() == (tmp_path / "b" / "shapes-det-v1-4-2" / "annotations" / "instances_train.json").read_bytes()
    )
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["shapes-det-v1-4-2"]
