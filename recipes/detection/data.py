"""Detection data in the COCO layout (an images folder and an `instances_*.json`), read with
pycocotools, or a `datasets` DatasetDict saved to disk in the layout of transformers'
object-detection examples (an image column and an `objects` column of boxes and categories),
turned into the same COCO index so both are checked and scored alike; so are tar shards (a json
of COCO annotations per image) and Parquet shards (transformers' layout), core/shards.py. The built-in synthetic
shapes set is written in the COCO layout, so the demo and the tests go through the real loader.
Box-aware augmentations come from torchvision's transforms v2 on `tv_tensors.BoundingBoxes`."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from core.config import DataConfig, option
from core.data import SeededTransforms, decode_failure, folder_written_once, generated_data_root, read_image
from core.errors import ConfigError, DataError
from core.shards import (
    IMAGE_EXTENSIONS,
    SHARD_SUFFIX,
    ShardIndex,
    ShardSamples,
    image_member,
    readable,
    sample_file,
)

logger = logging.getLogger(__name__)
SHAPES_CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}, {"id": 3, "name": "triangle"}]


@dataclass
class DetectionDataConfig(DataConfig):
    source: Literal["coco", "shapes", "hf_disk", "webdataset", "parquet"] = option(
        "shapes",
        "coco: images folder + instances json; shapes: built-in synthetic set in COCO layout; hf_disk: a "
        "`datasets` DatasetDict saved with save_to_disk, boxes and categories in an objects column; webdataset: "
        'tar shards root/<split>-*.tar, each sample an image and a json {"width", "height", "annotations": '
        "[COCO annotations]}, categories in _index.json or _info.json; parquet: Parquet shards "
        "root/<split>-*.parquet in hf_disk's columns.",
    )
    root: str | None = option(
        None,
        "coco: dataset folder; hf_disk: the save_to_disk folder; shapes: where it is written "
        "(default ~/.cache/shardvision); webdataset and parquet: the shards' folder, brace pattern or glob.",
    )
    train_split: str = option("train", "hf_disk and shards: the training split.")
    eval_split: str = option("validation", "hf_disk and shards: the evaluation split.")
    image_column: str = option("image", "hf_disk and parquet: the image column.")
    objects_column: str = option(
        "objects", "hf_disk and parquet: per image, lists `bbox` and `category` (optional: `id`, `area`, `iscrowd`)."
    )
    box_format: Literal["xywh", "xyxy"] = option(
        "xywh", "hf_disk and parquet: how `bbox` is written: xywh (COCO's x, y, width, height) or xyxy (corners)."
    )
    train_images: str = option("train2017", "Training images folder, relative to root.")
    train_annotations: str = option("annotations/instances_train2017.json", "Training annotations, relative to root.")
    eval_images: str = option("val2017", "Evaluation images folder, relative to root.")
    eval_annotations: str = option("annotations/instances_val2017.json", "Evaluation annotations, relative to root.")
    min_size: int = option(800, "Shorter image side after resizing.")
    max_size: int = option(1333, "Cap on the longer side after resizing.")
    scale_jitter: list[float] = option([1.0, 1.0], "Training: random factor range applied to min_size/max_size.")
    hflip: float = option(0.5, "Training: horizontal flip probability.")
    shapes_count: list[int] = option([240, 60], "shapes: number of train and val images.")

    def validate(self) -> None:
        super().validate()
        if self.source == "hf_disk" and not (self.root and os.path.isdir(self.root)):
            raise ConfigError(f"data.root: {self.root!r} is not a folder (data.source='hf_disk' needs save_to_disk's)")
        if self.source == "coco":
            if not self.root:
                raise ConfigError("data.root is required for data.source='coco'")
            for key in ("train_images", "train_annotations", "eval_images", "eval_annotations"):
                path = os.path.join(self.root, getattr(self, key))
                if not os.path.exists(path):
                    raise ConfigError(f"data.{key}: {path} does not exist")
        if len(self.scale_jitter) != 2 or not 0 < self.scale_jitter[0] <= self.scale_jitter[1]:
            raise ConfigError(f"data.scale_jitter must be [low, high] with 0 < low <= high, got {self.scale_jitter!r}")
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"data.hflip must be in [0, 1], got {self.hflip!r}")


class CocoDetection(Dataset):
    """(image, target) pairs from a COCO json; annotations are checked once, when loaded.

    Labels are contiguous 1..K in the order of the training split's category ids (0 is the
    detectors' background), one table for the run: `category_ids[label - 1]` maps back for
    COCO-format results. Another split (`categories`: the training set) is held to that table by id
    and name, so a validation file that lacks a category, or numbers them otherwise, cannot shift
    every later label and score the model against the wrong classes. Crowd annotations are skipped
    for training, as usual; images without annotations are kept (negatives). A box outside its
    image, of zero area or of an unknown category, and an image file that is missing, stop the
    run naming them (`data.bad_samples: error`) or are left out and listed in `problems` (skip)."""

    def __init__(
        self,
        images: str,
        annotations: str,
        bad_samples: str,
        training: bool,
        masks: bool = False,
        categories: CocoDetection | None = None,
    ):
        from pycocotools.coco import COCO

        self.images_dir, self.masks = images, masks
        with _quiet():
            coco = COCO(annotations)
        self._index(coco, annotations, categories)
        missing = [i for i in self.ids if not os.path.isfile(os.path.join(images, self.coco.imgs[i]["file_name"]))]
        if missing:
            first = os.path.join(images, self.coco.imgs[missing[0]]["file_name"])
            if bad_samples == "error":
                raise DataError(
                    f"{annotations}: {len(missing)} images are missing, e.g. image {missing[0]}: {first} "
                    "(set data.bad_samples: skip to leave them out)"
                )
            logger.warning(
                "left out %d images of %s whose files are missing, e.g. %s", len(missing), annotations, first
            )
            self.problems += [
                f"{annotations}: image {i}: {os.path.join(images, self.coco.imgs[i]['file_name'])} is missing"
                for i in missing
            ]
            self.ids = [i for i in self.ids if i not in set(missing)]
        self._check(bad_samples, training)

    def _index(self, coco: Any, where: str, categories: CocoDetection | None) -> None:
        self.coco, self.annotations_file = coco, where
        if categories is None:  # the training split: its categories are the run's labels
            self.category_ids = sorted(self.coco.getCatIds())
            self.category_names = [self.coco.cats[c]["name"] for c in self.category_ids]
        else:
            self._check_categories(categories)
            self.category_ids, self.category_names = categories.category_ids, categories.category_names
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.ids = sorted(self.coco.getImgIds())
        self.problems: list[str] = []

    def _check_categories(self, training: CocoDetection) -> None:
        """Every category of this split is the training split's of the same id and name; one this
        split lacks is only absent from its scores (no ground truth: no AP for it)."""
        names = dict(zip(training.category_ids, training.category_names, strict=True))
        for cid in sorted(self.coco.getCatIds()):
            name = self.coco.cats[cid]["name"]
            if cid not in names:
                raise DataError(
                    f"{self.annotations_file}: category {cid} ({name!r}) is not among the training split's "
                    f"categories in {training.annotations_file} ({_listed(names)}): the model has no label for it. "
                    "Use one category list in both files."
                )
            if name != names[cid]:
                raise DataError(
                    f"{self.annotations_file}: category {cid} is {name!r} here but {names[cid]!r} in "
                    f"{training.annotations_file}: the two files number their categories differently. "
                    "Use one category list in both files."
                )
        missing = [names[c] for c in training.category_ids if c not in self.coco.cats]
        if missing:
            logger.info("%s has no category %s: it is scored without them", self.annotations_file, missing)

    def _check(self, bad_samples: str, training: bool) -> None:
        self.targets = {image_id: self._checked(image_id, bad_samples, training) for image_id in self.ids}

    def _checked(self, image_id: int, policy: str, training: bool) -> dict:
        info = self.coco.imgs[image_id]
        boxes, labels, ann_ids, dropped = [], [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0) and training:
                continue
            x, y, w, h = ann["bbox"]
            problem = None
            if ann["category_id"] not in self.label_of:
                problem = f"unknown category_id {ann['category_id']}"
            elif w <= 0 or h <= 0:
                problem = f"zero-area box {ann['bbox']}"
            elif x < 0 or y < 0 or x + w > info["width"] + 0.5 or y + h > info["height"] + 0.5:
                problem = f"box {ann['bbox']} outside the {info['width']}x{info['height']} image"
            elif self.masks and not ann.get("segmentation"):
                problem = "no segmentation (an instance-segmentation model needs a polygon or RLE mask)"
            if problem:
                where = (
                    f"{self.annotations_file}: annotation {ann['id']} of image {image_id} "
                    f"({info['file_name']}): {problem}"
                )
                if policy == "error":
                    raise DataError(where + " (set data.bad_samples: skip to leave such annotations out)")
                dropped.append(where)
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of[ann["category_id"]])
            ann_ids.append(ann["id"])
        if dropped:
            self.problems += dropped
            logger.warning("left out %d bad annotations, e.g. %s", len(dropped), dropped[0])
        return {
            "boxes": boxes,
            "labels": labels,
            "ann_ids": ann_ids,
            "size": (info["height"], info["width"]),
            "file": info["file_name"],
        }

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Image.Image, dict]:
        image_id = self.ids[i]
        target = self.targets[image_id]
        image, where = self._read(image_id)
        if (image.height, image.width) != target["size"]:
            raise DataError(
                f"{where}: image is {image.width}x{image.height} but {self.annotations_file} says "
                f"{target['size'][1]}x{target['size'][0]}"
            )
        out = {"image_id": image_id, "boxes": target["boxes"], "labels": target["labels"]}
        if self.masks:  # polygons and RLE alike, rasterised at the image's own size
            height, width = target["size"]
            anns = [self.coco.anns[a] for a in target["ann_ids"]]
            out["masks"] = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, height, width))
        return image, out

    def _read(self, image_id: int) -> tuple[Image.Image, str]:
        path = os.path.join(self.images_dir, self.targets[image_id]["file"])
        return read_image(path), path


class HFDetection(CocoDetection):
    """A `datasets` split in transformers' object-detection layout, indexed as COCO: image ids from
    an `image_id` column (else the row number + 1), sizes from `width`/`height` (else the image
    file's header), categories from the objects' ClassLabel names (else the ids found), boxes in
    `data.box_format`. Checked and scored exactly as a COCO json is."""

    def __init__(
        self,
        ds: Any,
        cfg: DetectionDataConfig,
        where: str,
        bad_samples: str,
        training: bool,
        categories: CocoDetection | None = None,
    ):
        from pycocotools.coco import COCO

        self.masks = False
        for column in (cfg.image_column, cfg.objects_column):
            if column not in ds.column_names:
                raise ConfigError(
                    f"{where}: no column {column!r}; columns are {ds.column_names} (set data.image_column / "
                    "data.objects_column)"
                )
        self.ds, self.image_column = ds, cfg.image_column
        coco = COCO()
        coco.dataset = coco_index(ds, cfg, where)
        with _quiet():
            coco.createIndex()
        self.row_of = {image["id"]: image["row"] for image in coco.dataset["images"]}
        self._index(coco, where, categories)
        self._check(bad_samples, training)

    def _read(self, image_id: int) -> tuple[Image.Image, str]:
        where = f"{self.annotations_file} row {self.row_of[image_id]}"
        try:
            image = self.ds[self.row_of[image_id]][self.image_column]
            return image.convert("RGB"), where
        except Exception as e:  # an undecodable image names its row
            raise DataError(f"{where}: {decode_failure(e)}") from e


class ShardDetection(CocoDetection):
    """Detection shards indexed as COCO, checked and scored as a COCO json is. Image i is sample i
    (image id i + 1), so the engine's shard order (core/shards.py) reads what it plans to. A tar
    sample is an image and a json {"width", "height", "annotations": [COCO annotations, boxes
    x, y, width, height]}, the categories COCO's table in _index.json or _info.json; a Parquet
    row has hf_disk's columns. Every rank reads the split's json members (not the images) once,
    at start, to build the index evaluation needs."""

    def __init__(
        self,
        cfg: DetectionDataConfig,
        split: str,
        training: bool,
        masks: bool = False,
        categories: CocoDetection | None = None,
    ):
        from pycocotools.coco import COCO

        assert cfg.root is not None  # validated
        index = ShardIndex(cfg.root, split, SHARD_SUFFIX[cfg.source])
        self.masks, self.shards, self.samples, self.image_column = masks, index, ShardSamples(index), cfg.image_column
        where = f"{cfg.root} [{split}]"
        coco = COCO()
        coco.dataset = _parquet_coco_index(index, cfg, where) if index.parquet else self._tar_coco_index(where)
        with _quiet():
            coco.createIndex()
        self._index(coco, where, categories)
        self._check(cfg.bad_samples, training)
        self.problems = index.problems + self.problems

    def _tar_coco_index(self, where: str) -> dict:
        images, annotations = [], []
        for n in range(len(self.samples)):
            sample = self.samples.read(n, only=("json",))
            name = f"{sample['__shard__']}: sample {sample['__key__']}"
            text = sample_file(sample, ("json",))[1]
            try:
                record = json.loads(text)
                size = (int(record["width"]), int(record["height"]))
                listed = []
                for ann in record.get("annotations", []):
                    x, y, w, h = (float(v) for v in ann["bbox"])
                    listed.append(
                        {**ann, "area": float(ann.get("area", w * h)), "category_id": int(ann["category_id"])}
                    )
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(
                    f"{name}.json: not a json of width, height and annotations (each a bbox and a category_id): {e!r}"
                ) from None
            images.append({"id": n + 1, "file_name": name, "width": size[0], "height": size[1]})
            for ann in listed:
                annotations.append(
                    {**ann, "id": len(annotations) + 1, "image_id": n + 1, "iscrowd": int(ann.get("iscrowd", 0))}
                )
        categories = self.shards.categories or [
            {"id": c, "name": str(c)} for c in sorted({a["category_id"] for a in annotations})
        ]
        return {"images": images, "annotations": annotations, "categories": categories}

    def _read(self, image_id: int) -> tuple[Image.Image, str]:
        sample = self.samples[image_id - 1]
        where = f"{sample['__shard__']}: sample {sample['__key__']}"
        if self.shards.parquet:
            found, data = sample_file(sample, (self.image_column,), "set data.image_column")
        else:
            found, data = sample_file(sample, IMAGE_EXTENSIONS)
        return read_image(data, f"{where}.{found}"), where


def _parquet_coco_index(index: ShardIndex, cfg: DetectionDataConfig, where: str) -> dict:
    """coco_index over the shards' rows, read without their images where width and height are
    columns; image ids are row numbers + 1, so image i is sample i."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(index.paths[0])
    columns = [c for c in schema.names if c not in ("image_id", cfg.image_column)]
    if not {"width", "height"} <= set(columns):
        columns.append(cfg.image_column)  # sizes from the image files' headers
    try:
        table = pa.concat_tables(pq.read_table(path, columns=columns) for path in index.paths)
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{where}: the shards' columns {columns} cannot be read ({e})") from None
    features = datasets.Features.from_arrow_schema(schema)
    rows = datasets.Dataset(table.replace_schema_metadata(None)).cast(
        datasets.Features({c: features[c] for c in columns})
    )
    return coco_index(rows, cfg, where)


def _listed(names: dict[int, str]) -> str:
    shown = ", ".join(f"{cid}: {name!r}" for cid, name in list(names.items())[:10])
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def coco_index(ds: Any, cfg: DetectionDataConfig, where: str) -> dict:
    """The COCO json equivalent of a `datasets` split in transformers' object-detection layout."""
    import datasets

    objects = ds.features[cfg.objects_column]
    fields = objects.feature if isinstance(objects, datasets.Sequence) else objects
    fields = fields[0] if isinstance(fields, list) else fields
    missing = {"bbox", "category"} - set(fields)
    if missing:
        raise ConfigError(f"{where}: column {cfg.objects_column!r} has no {sorted(missing)} (it has {sorted(fields)})")
    category = fields["category"]
    names = getattr(getattr(category, "feature", category), "names", None)
    plain = ds.remove_columns([cfg.image_column]) if cfg.image_column in ds.column_names else ds
    sizes = None
    if not {"width", "height"} <= set(ds.column_names):
        sizes = [
            _image_size(raw) for raw in ds.cast_column(cfg.image_column, datasets.Image(decode=False))[cfg.image_column]
        ]
    images, annotations, seen = [], [], set()
    next_id = 1
    for row, record in enumerate(plain):
        image_id = int(record["image_id"]) if "image_id" in record else row + 1
        if image_id in seen:
            raise DataError(f"{where} row {row}: image_id {image_id} appears twice")
        seen.add(image_id)
        width, height = (record["width"], record["height"]) if sizes is None else sizes[row]
        images.append({"id": image_id, "row": row, "file_name": f"row {row}", "width": width, "height": height})
        obj = record[cfg.objects_column]
        if isinstance(obj, list):  # a list of per-object dicts rather than a dict of lists
            obj = {k: [o[k] for o in obj] for k in (obj[0] if obj else {})}
        for k, box in enumerate(obj.get("bbox", [])):
            if len(box) != 4:
                raise DataError(f"{where} row {row}: object {k} has bbox {box}, not 4 numbers")
            x, y, a, b = (float(v) for v in box)
            w, h = (a - x, b - y) if cfg.box_format == "xyxy" else (a, b)
            annotations.append(
                {
                    "id": int(obj["id"][k]) if "id" in obj else next_id,
                    "image_id": image_id,
                    "category_id": int(obj["category"][k]),
                    "bbox": [x, y, w, h],
                    "area": float(obj["area"][k]) if "area" in obj else w * h,
                    "iscrowd": int(obj["iscrowd"][k]) if "iscrowd" in obj else 0,
                }
            )
            next_id += 1
    found = sorted({a["category_id"] for a in annotations})
    categories = (
        [{"id": i, "name": name} for i, name in enumerate(names)]
        if names
        else [{"id": c, "name": str(c)} for c in found]
    )
    return {"images": images, "annotations": annotations, "categories": categories}


def _image_size(raw: dict) -> tuple[int, int]:
    """(width, height) from the image file's header, without decoding its pixels."""

    source = io.BytesIO(raw["bytes"]) if raw.get("bytes") else raw["path"]
    with Image.open(source) as image:
        return image.width, image.height


class _quiet:
    """pycocotools prints progress to stdout; keep it out of the run's log."""

    def __enter__(self):
        import contextlib

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)


class DetectionTransform:
    """Training: scale jitter around min_size and a horizontal flip, boxes kept in step with the
    image. Evaluation: the image as it is; the detector resizes it to min_size itself and maps its
    boxes back to the original size, where COCO scores them."""

    def __init__(self, cfg: DetectionDataConfig, training: bool):
        steps: list[Any] = []
        if training:
            low, high = cfg.scale_jitter
            sizes = sorted({max(1, round(cfg.min_size * f)) for f in np.linspace(low, high, 5)})
            steps += [
                v2.RandomShortestSize(sizes, max_size=cfg.max_size, antialias=True),
                v2.RandomHorizontalFlip(cfg.hflip),
            ]
        # Masks, where there are, leave with the boxes they belong to.
        steps += [
            v2.ToDtype(torch.float32, scale=True),
            v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=lambda inputs: tuple(_per_box(inputs[1]))),
        ]
        self.transform = v2.Compose(steps)

    def __call__(self, pair: tuple[Image.Image, dict]) -> dict:
        image, target = pair
        canvas = (image.height, image.width)
        boxes = tv_tensors.BoundingBoxes(
            torch.tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=canvas
        )
        annotations = {"boxes": boxes, "labels": torch.tensor(target["labels"], dtype=torch.int64)}
        if "masks" in target:
            annotations["masks"] = tv_tensors.Mask(torch.as_tensor(target["masks"], dtype=torch.uint8))
        out_image, out = self.transform(tv_tensors.Image(v2.functional.pil_to_tensor(image)), annotations)
        sample = {
            "image": out_image.as_subclass(torch.Tensor),
            "boxes": out["boxes"].as_subclass(torch.Tensor),
            "labels": out["labels"],
            "image_id": target["image_id"],
            "original_size": torch.tensor(canvas),
        }
        if "masks" in out:
            sample["masks"] = out["masks"].as_subclass(torch.Tensor)
        return sample


def _per_box(annotations: dict) -> list[torch.Tensor]:
    return [annotations[k] for k in ("labels", "masks") if k in annotations]


def collate(samples: list[dict]) -> dict:
    """Images differ in size: lists, which the detectors batch themselves."""
    return {
        "image": [s["image"] for s in samples],
        "targets": [{k: s[k] for k in ("boxes", "labels", "masks") if k in s} for s in samples],
        "image_id": torch.tensor([s["image_id"] for s in samples]),
        "original_size": torch.stack([s["original_size"] for s in samples]),
    }


def write_shapes(root: str, counts: tuple[int, int], size: int = 128) -> None:
    """Deterministic scenes of squares, circles and triangles, in the COCO layout, each shape with
    its box and its outline as a polygon (instance masks), and a few images that have no object
    at all (negatives)."""
    rng = np.random.default_rng(4321)
    with folder_written_once(root) as tmp:
        _write_shapes_into(tmp, rng, counts, size)


def _write_shapes_into(tmp: str, rng: np.random.Generator, counts: tuple[int, int], size: int) -> None:
    from PIL import ImageDraw

    os.makedirs(os.path.join(tmp, "annotations"))
    ann_id = 1
    for split, count in zip(("train", "val"), counts, strict=True):
        os.makedirs(os.path.join(tmp, split))
        images, annotations = [], []
        for k in range(count):
            image_id = k + 1
            img = Image.fromarray(
                rng.integers(0, 60, (size, size, 3), dtype=np.uint8) + rng.integers(0, 100, 3, dtype=np.uint8)
            )
            draw = ImageDraw.Draw(img)
            n = 0 if k % 10 == 9 else int(rng.integers(1, 4))
            for _ in range(n):
                cat = int(rng.integers(1, 4))
                r = int(rng.integers(8, 28))
                cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
                color = tuple(int(c) for c in rng.integers(140, 256, 3))
                if cat == 1:
                    draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
                elif cat == 2:
                    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
                else:
                    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
                outline = _outline(cat, cx, cy, r)
                annotations.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": cat,
                        "bbox": [cx - r, cy - r, 2 * r + 1, 2 * r + 1],
                        "area": float((2 * r + 1) ** 2),
                        "segmentation": [[round(v, 2) for point in outline for v in point]],
                        "iscrowd": 0,
                    }
                )
                ann_id += 1
            name = f"{image_id:06d}.jpg"
            img.save(os.path.join(tmp, split, name), quality=95)
            images.append({"id": image_id, "file_name": name, "width": size, "height": size})
        with open(os.path.join(tmp, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": SHAPES_CATEGORIES}, f)


def _outline(category: int, cx: int, cy: int, r: int) -> list[tuple[float, float]]:
    """The drawn shape's outline in COCO's polygon convention (pixel edges: a filled pixel x
    spans x..x+1)."""
    if category == 1:
        return [(cx - r, cy - r), (cx + r + 1, cy - r), (cx + r + 1, cy + r + 1), (cx - r, cy + r + 1)]
    if category == 2:
        angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        return [(cx + 0.5 + (r + 0.5) * np.cos(a), cy + 0.5 + (r + 0.5) * np.sin(a)) for a in angles]
    return [(cx + 0.5, cy - r), (cx - r, cy + r + 1), (cx + r + 1, cy + r + 1)]


def build_datasets(cfg: DetectionDataConfig, seed: int, masks: bool = False) -> tuple[Dataset, Dataset]:
    """(train, eval) sets; `masks`: each sample also carries its instances' masks (N, H, W)."""
    if cfg.source in SHARD_SUFFIX:
        if masks and cfg.source == "parquet":
            raise ConfigError("data.source='parquet' carries boxes only (hf_disk's layout); masks need tar shards")
        train = ShardDetection(cfg, cfg.train_split, True, masks)
        val = ShardDetection(cfg, cfg.eval_split, False, masks, categories=train)
        return SeededTransforms(train, DetectionTransform(cfg, True), seed), SeededTransforms(
            val, DetectionTransform(cfg, False), seed
        )
    if cfg.source == "hf_disk":
        import datasets

        assert cfg.root is not None  # validated
        if masks:
            raise ConfigError(
                "data.source='hf_disk' carries boxes only; an instance-segmentation model needs COCO polygons or "
                "RLE masks (data.source: coco or shapes)"
            )
        loaded = datasets.load_from_disk(cfg.root)
        for split in (cfg.train_split, cfg.eval_split):
            if split not in loaded:
                raise ConfigError(
                    f"{cfg.root}: no split {split!r}; it has {list(loaded)} (set data.train_split / data.eval_split)"
                )
        train = HFDetection(loaded[cfg.train_split], cfg, f"{cfg.root} [{cfg.train_split}]", cfg.bad_samples, True)
        val = HFDetection(
            loaded[cfg.eval_split], cfg, f"{cfg.root} [{cfg.eval_split}]", cfg.bad_samples, False, categories=train
        )
        return SeededTransforms(train, DetectionTransform(cfg, True), seed), SeededTransforms(
            val, DetectionTransform(cfg, False), seed
        )
    if cfg.source == "shapes":
        root = os.path.join(generated_data_root(cfg.root), f"shapes-det-v2-{cfg.shapes_count[0]}-{cfg.shapes_count[1]}")
        if not os.path.isdir(root):
            write_shapes(root, (cfg.shapes_count[0], cfg.shapes_count[1]))
        paths = ("train", "annotations/instances_train.json", "val", "annotations/instances_val.json")
    else:
        root = cfg.root
        paths = (cfg.train_images, cfg.train_annotations, cfg.eval_images, cfg.eval_annotations)
    train = CocoDetection(os.path.join(root, paths[0]), os.path.join(root, paths[1]), cfg.bad_samples, True, masks)
    val = CocoDetection(
        os.path.join(root, paths[2]), os.path.join(root, paths[3]), cfg.bad_samples, False, masks, categories=train
    )
    return SeededTransforms(train, DetectionTransform(cfg, True), seed), SeededTransforms(
        val, DetectionTransform(cfg, False), seed
    )


def shard_samples(
    cfg: DetectionDataConfig, seed: int, problems: list[str]
) -> tuple[dict, dict[str, Iterator[tuple[str, dict[str, bytes]]]]]:
    """For `shardvision shard`: the training split's COCO category table, and each split's images
    as WebDataset samples: the image file's own bytes (a PNG where the source holds no file) and a
    json of its size and COCO annotations as the source has them (crowds and masks included).
    An image that cannot be read is left out and its problem appended to `problems`."""
    train, val = (split.base for split in build_datasets(cfg, seed))
    categories = [train.coco.cats[c] for c in train.category_ids]

    def files(raw: CocoDetection) -> Iterator[tuple[str, dict[str, bytes]]]:
        problems.extend(raw.problems)
        folder = getattr(raw, "images_dir", None)  # a COCO folder's own files; other sources as PNG
        for image_id, (image, _) in readable(raw._read, raw.ids, problems):
            info = raw.coco.imgs[image_id]
            extension, data = image_member(image, os.path.join(folder, info["file_name"]) if folder else None)
            annotations = [
                {k: v for k, v in ann.items() if k not in ("id", "image_id")}
                for ann in raw.coco.imgToAnns.get(image_id, [])
            ]
            record = {"width": info["width"], "height": info["height"], "annotations": annotations}
            yield f"{image_id:012d}", {extension: data, "json": json.dumps(record).encode()}

    names = [c["name"] for c in categories]
    return {"classes": names, "categories": categories}, {cfg.train_split: files(train), cfg.eval_split: files(val)}
