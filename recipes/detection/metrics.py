"""COCO box mAP (and, for instance segmentation, mask mAP) with pycocotools, from per-image
predictions gathered across ranks.

Every image's predictions arrive once (accelerate drops the padding it adds to the last batch),
in original image coordinates, and are scored against the evaluation json by COCOeval. Each rank
holds the same gathered predictions, so each computes the same numbers; only the main process
writes them, with the predictions in the COCO results format, which any COCO tool can re-score
(masks as RLE; as detectron2 does, mask scoring loads the results without their boxes, since
pycocotools' loadRes turns a result that has a box into the box's polygon).

Per category, AP and AP50 (and mask_AP, mask_AP50) as `AP/<class>`, ...: read from the same
COCOeval's `eval['precision']`, as detectron2's and mmdet's per-category tables are, which equals
COCOeval run on that category alone (`params.catIds = [c]`). A category with no ground truth
among the evaluated images has no AP (NaN), where COCOeval's summary would print -1."""

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


def evaluate_coco(coco_gt, results: list[dict], image_ids: list[int], iou_type: str = "bbox"):
    """A COCOeval (`iou_type` bbox or segm) over `image_ids`, evaluated, accumulated and
    summarised; None when there is no prediction (pycocotools cannot load an empty result list)."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return None
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def summary_of(evaluator) -> dict[str, float]:
    """The summary's AP, AP50, ...; 0 for every stat when there was no prediction."""
    if evaluator is None:
        return {name: 0.0 for name in STAT_NAMES}
    return {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats[:6], strict=True)}


def coco_map(coco_gt, results: list[dict], image_ids: list[int], iou_type: str = "bbox") -> dict[str, float]:
    """COCOeval stats (`iou_type` bbox or segm) over `image_ids`; 0 for every stat when there is
    no prediction."""
    return summary_of(evaluate_coco(coco_gt, results, image_ids, iou_type))


def per_category_ap(evaluator, category_ids: list[int]) -> dict[str, list[float]]:
    """AP and AP50 of each of `category_ids`, computed as the summary computes them over all
    categories: the mean of `eval['precision']` ([IoU thresholds, recall points, categories, area
    ranges, max detections]) at area "all" and 100 detections, over every IoU threshold (AP) or at
    0.5 (AP50), leaving out -1 (no ground truth). NaN for a category without ground truth."""
    import numpy as np

    p = evaluator.params
    precision = evaluator.eval["precision"][:, :, :, p.areaRngLbl.index("all"), list(p.maxDets).index(100)]
    at_50 = np.where(p.iouThrs == 0.5)[0]
    out: dict[str, list[float]] = {"AP": [], "AP50": []}
    for category in category_ids:
        if category not in p.catIds:  # not in the evaluation's ground truth at all
            out["AP"].append(float("nan"))
            out["AP50"].append(float("nan"))
            continue
        k = list(p.catIds).index(category)
        for name, s in (("AP", precision[:, :, k]), ("AP50", precision[at_50, :, k])):
            s = s[s > -1]
            out[name].append(float(np.mean(s)) if s.size else float("nan"))
    return out


class CocoMetrics(Metrics):
    """Box mAP; with `masks`, also mask mAP as mask_AP, mask_AP50, ...; and per category (named
    by `class_names`, by default the categories' names in `coco_gt`) AP and AP50 of each."""

    def __init__(self, coco_gt, category_ids: list[int], masks: bool = False, class_names: list[str] | None = None):
        self.coco_gt, self.category_ids, self.masks = coco_gt, category_ids, masks
        self.class_names = class_names or [str(coco_gt.cats.get(c, {}).get("name", c)) for c in category_ids]
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self.per_class: dict[str, list[float]] = {}  # "AP" -> one value per category, set by compute
        self.objects: list[int] = []  # ground-truth objects per category, set by compute

    def update(self, outputs: list[dict]) -> None:
        for prediction in outputs:
            self.image_ids.append(int(prediction["image_id"]))
            self.results += to_coco_results(prediction, self.category_ids)

    def objects_per_class(self) -> list[int]:
        """Ground-truth objects of each category in the evaluated images (crowds, which COCOeval
        ignores, left out)."""
        counts = dict.fromkeys(self.category_ids, 0)
        for image_id in self.image_ids:
            for ann in self.coco_gt.imgToAnns.get(image_id, []):
                if ann["category_id"] in counts and not ann.get("iscrowd", 0):
                    counts[ann["category_id"]] += 1
        return list(counts.values())

    def compute(self) -> dict[str, float]:
        self.objects = self.objects_per_class()
        values: dict[str, float] = {}
        self.per_class = {}
        iou_types = [("bbox", "")] + ([("segm", MASK_PREFIX)] if self.masks else [])
        for iou_type, prefix in iou_types:
            evaluator = evaluate_coco(self.coco_gt, self.results, self.image_ids, iou_type)
            values |= {prefix + name: value for name, value in summary_of(evaluator).items()}
            if evaluator is None:  # no prediction: 0 where there was something to find
                nothing = [0.0 if n else float("nan") for n in self.objects]
                self.per_class |= {prefix + "AP": nothing, prefix + "AP50": list(nothing)}
            else:
                self.per_class |= {prefix + k: v for k, v in per_category_ap(evaluator, self.category_ids).items()}
        values["images"] = float(len(self.image_ids))
        for metric, per_category in self.per_class.items():
            values |= {f"{metric}/{name}": v for name, v in zip(self.class_names, per_category, strict=True)}
        return values

    def table(self) -> str:
        if not self.per_class:
            self.compute()
        metrics = list(self.per_class)
        rows = [f"{'class':<24} " + " ".join(f"{m:>9}" for m in metrics) + f" {'objects':>8}"]
        for i, (name, count) in enumerate(zip(self.class_names, self.objects, strict=True)):
            rows.append(f"{name:<24} " + " ".join(f"{self.per_class[m][i]:9.4f}" for m in metrics) + f" {count:8d}")
        return "\n".join(rows)

    def write(self, folder: str, values: dict[str, float]) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "predictions.json"), "w") as f:
            json.dump(self.results, f)
        with open(os.path.join(folder, "metrics.json"), "w") as f:
            json.dump(values, f, indent=2)
