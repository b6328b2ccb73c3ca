"""Detection recipe: COCO mAP against pycocotools on known answers, the COCO loader's checks,
box-aware transforms and the model options."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from core.errors import ConfigError, DataError
from core.model_options import cast_inputs
from recipes.detection.data import DetectionDataConfig, build_datasets, collate
from recipes.detection.metrics import CocoMetrics
from recipes.detection.models import DetectionModelConfig, build_model
from tests.builders import load_gt, pycocotools_direct
from tests.helpers import REPO


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
    a = tmp_path / "a" / "shapes-det-v2-4-2" / "annotations" / "instances_train.json"
    assert (
        a.read_bytes() == (tmp_path / "b" / "shapes-det-v2-4-2" / "annotations" / "instances_train.json").read_bytes()
    )
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["shapes-det-v2-4-2"]


def hf_copy_of_shapes(shapes_root, out, box_format="xywh", with_meta=True):
    """The shapes set's COCO json rewritten as a `datasets` DatasetDict in transformers'
    object-detection layout (categories as ClassLabel names, 0-based), saved to disk."""
    import datasets

    splits = {}
    for split, hf_split in (("train", "train"), ("val", "validation")):
        coco = json.loads((shapes_root / "annotations" / f"instances_{split}.json").read_text())
        rows = []
        for image in coco["images"]:
            anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            boxes = [
                a["bbox"]
                if box_format == "xywh"
                else [*a["bbox"][:2], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in anns
            ]
            row = {
                "image": str(shapes_root / split / image["file_name"]),
                "objects": {
                    "bbox": boxes,
                    "category": [a["category_id"] - 1 for a in anns],
                    "id": [a["id"] for a in anns],
                },
            }
            if with_meta:
                row.update(image_id=image["id"], width=image["width"], height=image["height"])
            rows.append(row)
        features = {
            "image": datasets.Image(),
            "objects": datasets.Sequence(
                {
                    "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
                    "category": datasets.ClassLabel(names=[c["name"] for c in coco["categories"]]),
                    "id": datasets.Value("int64"),
                }
            ),
        }
        if with_meta:
            features.update(
                image_id=datasets.Value("int64"), width=datasets.Value("int32"), height=datasets.Value("int32")
            )
        splits[hf_split] = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    datasets.DatasetDict(splits).save_to_disk(str(out))
    return out


@pytest.mark.parametrize(("box_format", "with_meta"), [("xywh", True), ("xyxy", False)])
def test_hf_disk_gives_the_same_annotations_as_the_coco_json(tmp_path, box_format, with_meta):
    shapes = DetectionDataConfig(
        source="shapes", root=str(tmp_path / "shapes"), shapes_count=[12, 6], min_size=64, max_size=64
    )
    coco_train, coco_val = build_datasets(shapes, 0)
    shapes_root = next((tmp_path / "shapes").glob("shapes-det-*"))
    hf = hf_copy_of_shapes(shapes_root, tmp_path / "hf", box_format, with_meta)
    cfg = DetectionDataConfig(source="hf_disk", root=str(hf), box_format=box_format, min_size=64, max_size=64)
    hf_train, hf_val = build_datasets(cfg, 0)
    for coco_set, hf_set in ((coco_train, hf_train), (coco_val, hf_val)):
        assert hf_set.base.category_names == coco_set.base.category_names == ["square", "circle", "triangle"]
        assert len(hf_set) == len(coco_set)
        for coco_target, hf_target in zip(coco_set.base.targets.values(), hf_set.base.targets.values(), strict=True):
            assert hf_target["labels"] == coco_target["labels"]
            assert hf_target["size"] == coco_target["size"]
            assert torch.allclose(
                torch.tensor(hf_target["boxes"]).reshape(-1, 4),
                torch.tensor(coco_target["boxes"], dtype=torch.float32).reshape(-1, 4),
            )
    sample, expected = hf_val[1], coco_val[1]
    assert torch.equal(sample["image"], expected["image"]) and torch.allclose(sample["boxes"], expected["boxes"])
    # The same predictions score the same against either index.
    predictions = [
        {
            "image_id": t["image_id"],
            "boxes": t["boxes"],
            "labels": t["labels"],
            "scores": torch.full((len(t["labels"]),), 0.9),
        }
        for t in (coco_val[i] for i in range(len(coco_val)))
    ]
    scores = []
    for val in (coco_val, hf_val):
        metrics = CocoMetrics(val.base.coco, val.base.category_ids)
        metrics.update(predictions)
        scores.append(metrics.compute())
    assert scores[0] == scores[1] and scores[0]["AP50"] == pytest.approx(1.0)


def test_hf_disk_checks_name_the_split_and_row(tmp_path):
    import datasets

    shapes = DetectionDataConfig(source="shapes", root=str(tmp_path / "shapes"), shapes_count=[4, 2])
    build_datasets(shapes, 0)
    hf = hf_copy_of_shapes(next((tmp_path / "shapes").glob("shapes-det-*")), tmp_path / "hf")
    loaded = datasets.load_from_disk(str(hf))
    train = loaded["train"].map(
        lambda row, i: (
            {"objects": {**row["objects"], "bbox": [[120.0, 120.0, 30.0, 30.0]] * len(row["objects"]["bbox"])}}
            if i == 2
            else row
        ),
        with_indices=True,
    )
    datasets.DatasetDict({"train": train, "validation": loaded["validation"]}).save_to_disk(str(tmp_path / "bad"))
    cfg = DetectionDataConfig(source="hf_disk", root=str(tmp_path / "bad"))
    with pytest.raises(
        DataError, match=r"bad \[train\]: annotation \d+ of image 3 \(row 2\): box .* outside the 128x128 image"
    ):
        build_datasets(cfg, 0)
    with pytest.raises(ConfigError, match=r"no split 'val'; it has \['train', 'validation'\]"):
        build_datasets(DetectionDataConfig(source="hf_disk", root=str(tmp_path / "bad"), eval_split="val"), 0)
    with pytest.raises(ConfigError, match=r"no column 'boxes'"):
        build_datasets(DetectionDataConfig(source="hf_disk", root=str(tmp_path / "bad"), objects_column="boxes"), 0)


def test_instance_masks_follow_their_boxes_through_loading_and_flipping(tmp_path):
    """The shapes' polygons rasterise to the drawn shapes (area against the box: a square fills
    it, a circle pi/4 of it, a triangle half), and flip and sanitising keep each mask with its box."""
    cfg = DetectionDataConfig(source="shapes", root=str(tmp_path), shapes_count=[12, 4], min_size=128, max_size=128)
    _, val = build_datasets(cfg, 0, masks=True)
    expected_fill = {1: 1.0, 2: torch.pi / 4, 3: 0.5}
    for i in range(len(val)):
        sample = val[i]
        masks, boxes = sample["masks"], sample["boxes"]
        assert masks.shape == (len(boxes), 128, 128) and masks.dtype == torch.uint8
        for mask, box, label in zip(masks, boxes, sample["labels"], strict=True):
            x0, y0, x1, y1 = box.int().tolist()
            assert mask.sum() == mask[y0:y1, x0:x1].sum() > 0  # inside its box
            fill = mask.sum().item() / ((x1 - x0) * (y1 - y0))
            assert fill == pytest.approx(expected_fill[int(label)], abs=0.08)
    flipped_cfg = DetectionDataConfig(**{**cfg.__dict__, "hflip": 1.0, "scale_jitter": [1.0, 1.0]})
    flipped, _ = build_datasets(flipped_cfg, 0, masks=True)
    plain, _ = build_datasets(DetectionDataConfig(**{**flipped_cfg.__dict__, "hflip": 0.0}), 0, masks=True)
    a, b = flipped[0], plain[0]
    assert torch.equal(a["masks"], b["masks"].flip(-1)) and torch.equal(a["image"], b["image"].flip(-1))
    batch = collate([a, b])
    assert [t["masks"].shape[0] for t in batch["targets"]] == [len(a["boxes"]), len(b["boxes"])]


def test_mask_map_against_pycocotools_on_the_written_predictions(tmp_path):
    """Ground-truth masks as predictions score mask AP 1; the same masks eroded score less; each
    equals pycocotools run on predictions.json."""
    from pycocotools import mask as mask_utils

    from recipes.detection.metrics import mask_rles

    cfg = DetectionDataConfig(source="shapes", root=str(tmp_path), shapes_count=[4, 10], min_size=128, max_size=128)
    _, val = build_datasets(cfg, 0, masks=True)
    gt_path = next(tmp_path.glob("shapes-det-*")) / "annotations" / "instances_val.json"
    for erode, expected in ((0, 1.0), (6, None)):
        metrics = CocoMetrics(val.base.coco, val.base.category_ids, masks=True)
        for i in range(len(val)):
            sample = val[i]
            masks = sample["masks"].float()
            if erode:  # shrink each mask by `erode` pixels: a worse mask, the same box
                masks = -torch.nn.functional.max_pool2d(-masks[:, None], 2 * erode + 1, 1, erode)[:, 0]
            rles = mask_rles(masks[:, None])
            assert [mask_utils.decode({**r, "counts": r["counts"].encode()}).sum() for r in rles] == [
                int(m.sum()) for m in masks
            ]
            metrics.update(
                [
                    {
                        "image_id": sample["image_id"],
                        "boxes": sample["boxes"],
                        "labels": sample["labels"],
                        "scores": torch.full((len(sample["labels"]),), 0.9),
                        "rles": rles,
                    }
                ]
            )
        values = metrics.compute()
        metrics.write(str(tmp_path / f"eval{erode}"), values)
        direct = pycocotools_direct(gt_path, tmp_path / f"eval{erode}" / "predictions.json", "segm")
        assert values["mask_AP"] == pytest.approx(direct[0], abs=1e-12)
        assert values["mask_AP50"] == pytest.approx(direct[1], abs=1e-12)
        assert values["AP"] == pytest.approx(1.0)  # boxes untouched
        if expected is not None:
            assert values["mask_AP"] == pytest.approx(expected)
        else:
            assert values["mask_AP"] < 0.9


TRANSFORMERS_DETECTORS = ("detr", "conditional_detr", "deformable_detr", "dab_detr", "rt_detr", "rt_detr_v2", "d_fine")
TINY_HF = {name: f"recipes/detection/configs/{name}_tiny" for name in TRANSFORMERS_DETECTORS}


def shapes_task(tmp_path, config: str, *overrides: str):
    """A demo config's task on 8 + 4 shapes images of its own."""
    from core.config_parsing import parse_args
    from recipes.detection.task import DetectionConfig, DetectionTask

    argv = ["--config", str(REPO / "recipes/detection/configs" / config), "--output-dir", str(tmp_path)]
    argv += ["--data.root", str(tmp_path / "data"), "--data.shapes_count", "[8, 4]", *overrides]
    cfg = parse_args(DetectionConfig, argv)
    return cfg, DetectionTask(cfg)


def hf_task(tmp_path, model: str, *overrides: str):
    hf = ["--model.source", "transformers", "--model.name", str(REPO / TINY_HF[model]), "--model.kwargs", "{}"]
    return shapes_task(tmp_path, "shapes.yaml", *hf, *overrides)


@pytest.mark.parametrize("model", sorted(TINY_HF))
def test_transformers_detector_trains_on_its_own_loss_and_predicts_in_original_coordinates(tmp_path, model):
    cfg, task = hf_task(tmp_path, model)
    torch.manual_seed(0)
    net = task.build_model()
    train, val = task.build_datasets()
    batch = task.collate([train[0], train[1], train[2]])  # scale jitter: images of different sizes
    loss = task.training_step(net.train(), batch)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad and p.dim() > 1)
    net.eval()
    with torch.no_grad():
        outputs = task.evaluation_step(net, task.collate([val[0], val[1]]))
    for out, sample in zip(outputs, [val[0], val[1]], strict=True):
        assert out["image_id"] == sample["image_id"]
        h, w = sample["original_size"].tolist()
        assert len(out["boxes"]) > 0 and (out["boxes"] >= -1e-3).all()
        assert (out["boxes"][:, 2] <= w + 1e-3).all() and (out["boxes"][:, 3] <= h + 1e-3).all()
        assert set(out["labels"].tolist()) <= {1, 2, 3}


def test_transformers_targets_and_predictions_convert_both_ways(tmp_path):
    """Known boxes: pixel xyxy -> normalised (cx, cy, w, h) with 0-based labels for the model;
    a model output that is certain of class 2 at a known normalised box -> that box in the
    original image's pixels, label 3, through DETR's own post-processing."""
    from types import SimpleNamespace

    _, task = hf_task(tmp_path, "detr")
    image = torch.zeros(3, 100, 200)
    labels = task.hf.labels([image], [{"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([3])}])
    assert labels[0]["class_labels"].tolist() == [2]
    assert labels[0]["boxes"].tolist() == [pytest.approx([0.2, 0.3, 0.2, 0.4])]
    logits = torch.full((1, 2, 4), -20.0)  # 3 classes + "no object"
    logits[0, 0, 2] = 20.0
    outputs = SimpleNamespace(logits=logits, pred_boxes=torch.tensor([[[0.5, 0.5, 0.5, 0.2], [0.1, 0.1, 0.1, 0.1]]]))
    (detections,) = task.hf.detections(outputs, torch.tensor([[300, 400]]))
    best = detections["scores"].argmax()
    assert detections["labels"][best] == 3
    assert detections["boxes"][best].tolist() == pytest.approx([100.0, 120.0, 300.0, 180.0], abs=1e-3)
    pixels = task.hf.inputs([image, torch.ones(3, 80, 120)], resize=False)
    assert pixels["pixel_values"].shape == (2, 3, 100, 200)
    assert pixels["pixel_mask"][1].sum() == 80 * 120 and pixels["pixel_mask"][1, 79, 119] == 1


def test_transformers_detector_fine_tunes_with_a_new_number_of_classes(tmp_path, caplog):
    import logging

    from safetensors.torch import save_file

    from core.errors import WeightsError
    from core.weights import load_weights

    _, task3 = hf_task(tmp_path, "detr")
    source = task3.build_model()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "detr3.safetensors"))
    _, task5 = hf_task(tmp_path, "detr", "--model.num_classes", "5")
    target = task5.build_model()
    with pytest.raises(WeightsError, match=r"class_labels_classifier\.weight: file \(4, 64\) vs model \(6, 64\)"):
        load_weights(target, str(tmp_path / "detr3.safetensors"))
    with caplog.at_level(logging.INFO, logger="core.weights"):
        load_weights(target, str(tmp_path / "detr3.safetensors"), ["class_labels_classifier.*"])
    assert (
        "2 start fresh (model.weights_exclude): class_labels_classifier.bias, class_labels_classifier.weight"
        in caplog.text
    )
    loaded = target.state_dict()
    for name, value in source.state_dict().items():
        if not name.startswith("class_labels_classifier"):
            assert torch.equal(loaded[name], value), name


@pytest.mark.parametrize("model", ["shapes.yaml", "shapes_instances.yaml", *sorted(TINY_HF)])
def test_every_detector_trains_and_predicts_on_bf16_weights_under_autocast_or_refuses_at_start(tmp_path, model):
    """DeepSpeed's bf16 holds the weights in bf16 and does not autocast. NMS and the DETR family's
    matcher (cdist) have no bf16 CPU kernel and RT-DETR adds fp32 anchors, so each detector fails
    on bare bf16 weights; DetectionTask asks the trainer for autocast there, under which every one
    trains and predicts, except the types that put fp32 position embeddings ahead of a LayerNorm:
    those still fail on CPU, so the task refuses that setup before anything is built."""
    from recipes.detection.task import FP32_EMBEDDINGS_BEFORE_LAYER_NORM

    _, task = hf_task(tmp_path, model) if model in TINY_HF else shapes_task(tmp_path, model)
    assert task.autocast_half_weights
    torch.manual_seed(0)
    net = task.build_model().to(torch.bfloat16)
    for buffer in net.buffers():  # as the trainer casts them under DeepSpeed
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(torch.bfloat16)
    train, val = task.build_datasets()
    batch = cast_inputs(task.collate([train[0], train[1]]), task.input_keys, torch.bfloat16, False)
    with pytest.raises((RuntimeError, NotImplementedError)):
        task.training_step(net.train(), batch)
    cpu = torch.device("cpu")
    for strategy, precision in (("ddp", "bf16"), ("deepspeed", "no")):
        task.check_strategy(strategy, precision, cpu)
    if task.hf is not None and task.hf.model_type in FP32_EMBEDDINGS_BEFORE_LAYER_NORM:
        with pytest.raises(RuntimeError, match="mixed dtype"), torch.autocast("cpu", dtype=torch.bfloat16):
            task.training_step(net.train(), batch)
        with pytest.raises(ConfigError, match=rf"model type '{task.hf.model_type}' cannot train on DeepSpeed's bf16"):
            task.check_strategy("deepspeed", "bf16", cpu)
        return
    task.check_strategy("deepspeed", "bf16", cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.training_step(net.train(), batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad and p.dim() > 1]
    assert grads and all(g is not None and g.dtype == torch.bfloat16 for g in grads)
    eval_batch = cast_inputs(task.collate([val[0], val[1]]), task.input_keys, torch.bfloat16, False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = task.evaluation_step(net.eval(), eval_batch)
    assert [out["image_id"] for out in outputs] == [val[0]["image_id"], val[1]["image_id"]]


def pycocotools_one_category(gt_path, results_path, category, iou_type="bbox"):
    """COCOeval's stats on one category alone (`params.catIds = [category]`), from the results
    file as written: the independent reference for a per-class AP."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    gt = load_gt(gt_path)
    results = json.loads(open(results_path).read())
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(gt, gt.loadRes(results), iou_type)
        e.params.catIds = [category]
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def test_per_class_ap_equals_pycocotools_on_that_category_alone(tmp_path):
    """GT's boxes shifted right by 3 px (category 1 keeps IoU 0.74: matched at IoU 0.5..0.7, so AP
    0.5, AP50 1), a wrong category-2 box scored above its two right ones (AP50 2/3) and a box of
    category 3, which has no ground truth (no AP). Each per-class value is COCOeval's on that
    category alone; the overall values stay the all-categories run's."""
    import math

    gt_path = write_coco(tmp_path, GT, categories=(1, 2, 3))
    predictions = predictions_from(GT, shift=3.0)
    predictions[2] = {  # image 3 has no object
        "image_id": 3,
        "boxes": torch.tensor([[5.0, 5.0, 25.0, 25.0]]),
        "scores": torch.tensor([0.95]),
        "labels": torch.tensor([2]),
    }
    predictions[0]["boxes"] = torch.cat([predictions[0]["boxes"], torch.tensor([[40.0, 30.0, 60.0, 45.0]])])
    predictions[0]["scores"] = torch.cat([predictions[0]["scores"], torch.tensor([0.5])])
    predictions[0]["labels"] = torch.cat([predictions[0]["labels"], torch.tensor([3])])
    metrics = CocoMetrics(load_gt(gt_path), [1, 2, 3])
    for prediction in predictions:
        metrics.update([prediction])
    values = metrics.compute()
    metrics.write(str(tmp_path / "eval"), values)
    results = tmp_path / "eval" / "predictions.json"
    for category in (1, 2):
        alone = pycocotools_one_category(gt_path, results, category)
        assert values[f"AP/c{category}"] == pytest.approx(alone[0], abs=1e-12)
        assert values[f"AP50/c{category}"] == pytest.approx(alone[1], abs=1e-12)
    assert (values["AP/c1"], values["AP50/c1"]) == pytest.approx((0.5, 1.0))
    assert values["AP50/c2"] == pytest.approx(2 / 3, abs=1e-3)
    assert pycocotools_one_category(gt_path, results, 3)[0] == -1  # nothing to find
    assert math.isnan(values["AP/c3"]) and math.isnan(values["AP50/c3"])
    direct = pycocotools_direct(gt_path, results)
    assert [values[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == pytest.approx(list(direct[:6]))
    lines = metrics.table().splitlines()
    assert lines[0].split() == ["class", "AP", "AP50", "objects"]
    assert [line.split()[0] for line in lines[1:]] == ["c1", "c2", "c3"]
    assert [line.split()[-1] for line in lines[1:]] == ["1", "2", "0"]
    assert lines[1].split()[1:3] == ["0.5000", "1.0000"] and lines[3].split()[1:3] == ["nan", "nan"]

    nothing = CocoMetrics(load_gt(gt_path), [1, 2, 3], class_names=["one", "two", "three"])
    nothing.update([{"image_id": 1, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}])
    values = nothing.compute()  # image 1 only: one object of each of categories 1 and 2
    assert (values["AP/one"], values["AP50/two"]) == (0.0, 0.0) and math.isnan(values["AP/three"])


def test_per_class_mask_ap_equals_pycocotools_on_that_category_alone(tmp_path):
    from recipes.detection.metrics import mask_rles

    cfg = DetectionDataConfig(source="shapes", root=str(tmp_path), shapes_count=[2, 6], min_size=128, max_size=128)
    _, val = build_datasets(cfg, 0, masks=True)
    gt_path = next(tmp_path.glob("shapes-det-*")) / "annotations" / "instances_val.json"
    metrics = CocoMetrics(val.base.coco, val.base.category_ids, masks=True, class_names=val.base.category_names)
    for i in range(len(val)):
        sample = val[i]
        masks = -torch.nn.functional.max_pool2d(-sample["masks"].float()[:, None], 7, 1, 3)  # eroded by 3 px
        n = len(sample["labels"])
        scores = torch.linspace(0.9, 0.5, n) if n else torch.zeros(0)
        metrics.update(
            [
                {
                    "image_id": sample["image_id"],
                    "boxes": sample["boxes"],
                    "labels": sample["labels"],
                    "scores": scores,
                    "rles": mask_rles(masks),
                }
            ]
        )
    values = metrics.compute()
    metrics.write(str(tmp_path / "eval"), values)
    results = tmp_path / "eval" / "predictions.json"
    for category, name in zip(val.base.category_ids, ["square", "circle", "triangle"], strict=True):
        alone = pycocotools_one_category(gt_path, results, category, "segm")
        assert values[f"mask_AP/{name}"] == pytest.approx(alone[0], abs=1e-12)
        assert values[f"mask_AP50/{name}"] == pytest.approx(alone[1], abs=1e-12)
        assert values[f"AP/{name}"] == pytest.approx(1.0)  # boxes untouched
    assert metrics.table().splitlines()[0].split() == ["class", "AP", "AP50", "mask_AP", "mask_AP50", "objects"]


def test_the_per_class_table_reaches_the_console_metrics_jsonl_and_the_report(tmp_path, capsys, fresh_accelerate_state):
    """A real (tiny, in-process) evaluation-only run on the shapes demo: its category names name
    the rows of the table logged after the evaluation, the `AP/<class>`, `AP50/<class>` values of metrics.jsonl's
    eval row and the report's per-class table, as segmentation's IoU/<class> do."""
    import importlib

    from safetensors.torch import save_file

    from core.commands.report import per_class_table, read_run, render
    from tests.builders import QUICK_RUN

    _, task = shapes_task(tmp_path, "shapes.yaml")
    torch.manual_seed(0)
    weights = str(tmp_path / "untrained.safetensors")
    save_file({k: v.contiguous() for k, v in task.build_model().state_dict().items()}, weights)
    run_dir = tmp_path / "run"
    args = ["--config", str(REPO / "recipes/detection/configs/shapes.yaml"), "--output-dir", str(run_dir)]
    args += ["--data.root", str(tmp_path / "data"), "--data.shapes_count", "[4, 3]", "--data.micro_batch_size", "2"]
    args += ["--data.min_size", "128", "--data.max_size", "128", "--eval-only", "--weights", weights, *QUICK_RUN]
    values = importlib.import_module("recipes.detection.train").main(args)

    names = ["square", "circle", "triangle"]
    expected = {f"{metric}/{name}" for metric in ("AP", "AP50") for name in names}
    assert {k for k in values if "/" in k} == expected
    console = capsys.readouterr().err
    table = console.split("per-class results\n", 1)[1].splitlines()
    assert table[0].split() == ["class", "AP", "AP50", "objects"]
    assert [row.split()[0] for row in table[1:4]] == names

    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    evaluation = [row for row in rows if row["split"] == "eval"][-1]
    logged = {k: v for k, v in evaluation.items() if "/" in k}
    assert logged == pytest.approx({k: values[k] for k in expected}, nan_ok=True)
    header, table_rows = per_class_table(read_run(str(run_dir)).last_eval)
    assert header == ["class", "AP", "AP50"] and [row[0] for row in table_rows] == names
    assert table_rows[0][1] == f"{values['AP/square']:.4g}"
    assert "<th>class</th><th>AP</th><th>AP50</th>" in render([read_run(str(run_dir))])


def coco_splits(tmp_path, val_categories, val_boxes, names=None):
    """A training split with categories 1, 2, 3 and a validation split with `val_categories`
    (names c<id>, or `names`), and the detection config that reads them."""
    write_coco(
        tmp_path / "train",
        [[(1, (4, 4, 20, 16))], [(2, (30, 10, 24, 30))], [(3, (10, 8, 30, 20))]],
        categories=(1, 2, 3),
    )
    val = write_coco(tmp_path / "val", val_boxes, categories=val_categories)
    if names:
        content = json.loads(val.read_text())
        content["categories"] = [{"id": c, "name": names[c]} for c in val_categories]
        val.write_text(json.dumps(content))
    return DetectionDataConfig(
        source="coco",
        root=str(tmp_path),
        train_images="train/images",
        train_annotations="train/instances.json",
        eval_images="val/images",
        eval_annotations="val/instances.json",
    )


def test_a_validation_split_lacking_a_category_keeps_the_training_labels(tmp_path):
    """The validation file has no category 1: its category 3 must still be label 3 (not 2), and
    the scores map labels back through the training table."""
    cfg = coco_splits(tmp_path, (2, 3), [[(3, (4, 4, 20, 16))], [(2, (30, 10, 24, 30))]])
    train, val = build_datasets(cfg, seed=0)
    assert val.base.category_ids == train.base.category_ids == [1, 2, 3]
    assert val.base.category_names == ["c1", "c2", "c3"]
    assert val.base.targets[1]["labels"] == [3] and val.base.targets[2]["labels"] == [2]
    # A detector that predicts each object's own label scores 1, through the training table.
    metrics = CocoMetrics(val.base.coco, val.base.category_ids, class_names=val.base.category_names)
    for image_id, target in val.base.targets.items():
        xyxy = torch.tensor(target["boxes"], dtype=torch.float32)
        metrics.update(
            [
                {
                    "image_id": image_id,
                    "boxes": xyxy,
                    "scores": torch.ones(len(xyxy)),
                    "labels": torch.tensor(target["labels"]),
                }
            ]
        )
    values = metrics.compute()
    assert values["AP"] == pytest.approx(1.0)
    assert values["AP/c3"] == pytest.approx(1.0) and math.isnan(values["AP/c1"])


@pytest.mark.parametrize(
    "val_categories, names, message",
    [
        (
            (1, 2, 3, 4),
            None,
            r"val/instances\.json: category 4 \('c4'\) is not among the training split's categories in "
            r".*train/instances\.json",
        ),
        (
            (1, 2, 3),
            {1: "c1", 2: "cat", 3: "c3"},
            r"val/instances\.json: category 2 is 'cat' here but 'c2' in .*train/instances\.json",
        ),
    ],
    ids=["unknown-category", "renamed-category"],
)
def test_a_validation_split_numbering_categories_otherwise_is_refused(tmp_path, val_categories, names, message):
    cfg = coco_splits(tmp_path, val_categories, [[(2, (4, 4, 20, 16))]], names)
    with pytest.raises(DataError, match=message):
        build_datasets(cfg, seed=0)
