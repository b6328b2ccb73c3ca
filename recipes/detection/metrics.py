"""COCO box mAP (and, for instance segmentation, mask mAP) with pycocotools, from per-image
predictions gathered across ranks.

Every image's predictions arrive once (accelerate drops the padding it adds to the last batch),
in original image coordinates, and are scored against the evaluation json by COCOeval. Each rank
holds the same gathered predictions, so each computes the same numbers; only the main process
writes them, with the predictions in the COCO results format, which any COCO tool can re-score
(masks as RLE; as detectron2 does, mask scoring loads the results without their boxes, since
pycocotools' loadRes turns a result that has a box into the box's polygon)."""

from __future__ import annotations

import contextlib
import io
import json
import os

import torch

from core.task import Metrics

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
MASK_PREFIX = "mask_"


def mask_rles(masks: torch.Tensor) -> list[dict]:
    """Mask R-CNN's (N, 1, H, W) probabilities -> COCO RLE of each mask at 0.5, JSON-ready."""
    import numpy as np
    from pycocotools import mask as mask_utils

    binary = np.asfortranarray((masks[:, 0] > 0.5).cpu().numpy().astype(np.uint8).transpose(1, 2, 0))
    rles = mask_utils.encode(binary)
    return [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]


def to_coco_results(prediction: dict, category_ids: list[int]) -> list[dict]:
    boxes = prediction["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    rles = prediction.get("rles") or [None] * len(xywh)
    return [
        {
            "image_id": int(prediction["image_id"]),
            "category_id": category_ids[int(label) - 1],
            "bbox": [round(v, 3) for v in box],
            "score": round(float(score), 5),
            **({"segmentation": rle} if rle is not None else {}),
        }
        for box, score, label, rle in zip(
            xywh, prediction["scores"].float().cpu().tolist(), prediction["labels"].cpu().tolist(), rles, strict=True
        )
        if 1 <= int(label) <= len(category_ids)
    ]


def coco_map(coco_gt, results: list[dict], image_ids: list[int], iou_type: str = "bbox") -> dict[str, float]:
    """COCOeval stats (`iou_type` bbox or segm) over `image_ids`; 0 for every stat when there is
    no prediction."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {name: 0.0 for name in STAT_NAMES}
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats[:6], strict=True)}


class CocoMetrics(Metrics):
    """Box mAP; with `masks`, also mask mAP as mask_AP, mask_AP50, ..."""

    def __init__(self, coco_gt, category_ids: list[int], masks: bool = False):
        self.coco_gt, self.category_ids, self.masks = coco_gt, category_ids, masks
        self.results: list[dict] = []
        self.image_ids: list[int] = []

    def update(self, outputs: list[dict]) -> None:
        for prediction in outputs:
            self.image_ids.append(int(prediction["image_id"]))
            self.results += to_coco_results(prediction, self.category_ids)

    def compute(self) -> dict[str, float]:
        values = coco_map(self.coco_gt, self.results, self.image_ids)
        if self.masks:
            segm = coco_map(self.coco_gt, self.results, self.image_ids, "segm")
            values |= {MASK_PREFIX + name: value for name, value in segm.items()}
        return {**values, "images": float(len(self.image_ids))}

    def write(self, folder: str, values: dict[str, float]) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "predictions.json"), "w") as f:
            json.dump(self.results, f)
        with open(os.path.join(folder, "metrics.json"), "w") as f:
            json.dump(values, f, indent=2)
