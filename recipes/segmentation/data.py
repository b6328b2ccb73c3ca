"""Segmentation data: image + index-mask pairs from VOC or ADE20K folders, `datasets` saved to
disk, tar or Parquet shards (core/shards.py), or the built-in synthetic shapes (written as real
JPEG/PNG files in the VOC layout, so the demo goes through the same loader as real data). Joint
image/mask augmentations come from torchvision's transforms v2, which resize `tv_tensors.Mask`
with nearest-neighbour."""

from __future__ import annotations

import io
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
from core.data import (
    DECODE_ERRORS,
    SeededTransforms,
    decode_failure,
    folder_written_once,
    generated_data_root,
    read_image,
)
from core.errors import ConfigError, DataError
from core.shards import (
    IMAGE_EXTENSIONS,
    SHARD_SUFFIX,
    ShardIndex,
    ShardSamples,
    png_bytes,
    readable,
    sample_file,
)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SHAPES_CLASSES = ["background", "square", "circle", "triangle"]


@dataclass
class SegmentationDataConfig(DataConfig):
    source: Literal["shapes", "voc", "ade20k", "hf_disk", "webdataset", "parquet"] = option(
        "shapes",
        "shapes: built-in synthetic set written as VOC-layout files; voc: JPEGImages/ + SegmentationClass/ + "
        "ImageSets/Segmentation/<split>.txt; ade20k: images/<split>/ + annotations/<split>/; hf_disk: a "
        "DatasetDict saved to disk; webdataset: tar shards root/<split>-*.tar, each sample an image (jpg, jpeg, "
        "png, webp) and its index mask (seg.png or mask.png); parquet: Parquet shards root/<split>-*.parquet, "
        "columns image_column and mask_column.",
    )
    root: str | None = option(
        None,
        "Dataset folder. For shapes: where the files are written (default ~/.cache/shardvision); for webdataset "
        "and parquet also a brace pattern or glob of shards.",
    )
    train_split: str = option("train", "Training split (voc: train, ade20k: training, datasets: a split name).")
    eval_split: str = option("val", "Evaluation split (voc: val, ade20k: validation).")
    image_column: str = option("image", "hf_disk and parquet: the image column.")
    mask_column: str = option("mask", "hf_disk and parquet: the index-mask column.")
    ignore_index: int = option(255, "Mask value that is neither trained on nor scored (VOC borders, padding).")
    reduce_zero_label: bool = option(False, "ADE20K: label 0 ('other') becomes ignore_index and 1..N become 0..N-1.")
    image_size: int = option(512, "Training crop size; evaluation resizes the shorter side to it.")
    scale_range: list[float] = option([0.5, 2.0], "Training scale jitter around image_size.")
    hflip: float = option(0.5, "Horizontal flip probability.")
    mean: list[float] = option(IMAGENET_MEAN, "Normalisation mean per channel.")
    std: list[float] = option(IMAGENET_STD, "Normalisation std per channel.")
    eval_mode: Literal["whole", "slide"] = option(
        "whole", "whole: one forward per image; slide: overlapping windows (large images)."
    )
    slide_stride: int = option(341, "slide: window stride in pixels (windows are image_size).")
    shapes_count: list[int] = option([200, 50], "shapes: number of train and val images.")

    def validate(self) -> None:
        super().validate()
        if self.source != "shapes" and not self.root:
            raise ConfigError(f"data.root is required for data.source={self.source!r}")
        if self.source not in ("shapes", *SHARD_SUFFIX) and not os.path.exists(self.root):
            raise ConfigError(f"data.root: no such folder: {self.root!r}")
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(f"data.scale_range must be [low, high] with 0 < low <= high, got {self.scale_range!r}")
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"data.hflip must be in [0, 1], got {self.hflip!r}")
        if self.eval_mode == "slide" and self.eval_micro_batch_size not in (None, 1):
            raise ConfigError("data.eval_mode=slide evaluates one image at a time: set data.eval_micro_batch_size 1")


# --------------------------------------------------------------------------------------------
# Raw pairs: (PIL image, index mask as a uint8/int array, names of both files)
# --------------------------------------------------------------------------------------------


def _read_mask(path: str | bytes, name: str = "") -> np.ndarray:
    """An index mask from a PNG file or its bytes (named `name`)."""
    where = name or (path if isinstance(path, str) else "a mask's bytes")
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
            mode, mask = img.mode, np.array(img, dtype=np.int64)
    except DECODE_ERRORS as e:
        raise DataError(f"{where}: cannot read mask ({decode_failure(e)})") from None
    if mode not in ("P", "L", "I", "I;16"):
        raise DataError(f"{where}: a mask must be a single-channel index PNG (mode P or L), got mode {mode}")
    return mask


class PairFolder(Dataset):
    """Image/mask file pairs, checked for size and label range when read."""

    def __init__(self, pairs: list[tuple[str, str]], num_classes: int, ignore_index: int, reduce_zero_label: bool):
        self.pairs, self.num_classes, self.ignore_index, self.reduce_zero_label = (
            pairs,
            num_classes,
            ignore_index,
            reduce_zero_label,
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        image_path, mask_path = self.pairs[i]
        return self.check(read_image(image_path), _read_mask(mask_path), image_path, mask_path)

    def check(
        self, image: Image.Image, mask: np.ndarray, image_name: str, mask_name: str
    ) -> tuple[Image.Image, np.ndarray]:
        if mask.shape != (image.height, image.width):
            raise DataError(
                f"{mask_name}: mask is {mask.shape[1]}x{mask.shape[0]} but {image_name} is {image.width}x{image.height}"
            )
        if self.reduce_zero_label:
            reduced = mask - 1
            reduced[(mask == 0) | (mask == self.ignore_index)] = self.ignore_index
            mask = reduced
        bad = ((mask >= self.num_classes) & (mask != self.ignore_index)) | (mask < 0)
        if bad.any():
            values = sorted(set(np.unique(mask[bad]).tolist()))[:5]
            raise DataError(
                f"{mask_name}: mask values {values} are outside 0..{self.num_classes - 1} and not ignore_index "
                f"({self.ignore_index}); check model.num_classes, data.ignore_index, data.reduce_zero_label"
            )
        return image, mask


class HFPairs(PairFolder):
    def __init__(self, ds: Any, image_column: str, mask_column: str, where: str, **kwargs: Any):
        for column in (image_column, mask_column):
            if column not in ds.column_names:
                raise ConfigError(
                    f"{where}: no column {column!r}; columns are {ds.column_names} (set "
                    "data.image_column / data.mask_column)"
                )
        super().__init__([], **kwargs)
        self.ds, self.image_column, self.mask_column, self.where = ds, image_column, mask_column, where

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        name = f"{self.where} row {i}"
        try:
            row = self.ds[int(i)]  # `datasets` decodes both images here
            image, mask = row[self.image_column].convert("RGB"), np.array(row[self.mask_column], dtype=np.int64)
        except DECODE_ERRORS as e:
            raise DataError(f"{name}: cannot read image or mask ({decode_failure(e)})") from None
        return self.check(image, mask, name, name)


class ShardPairs(PairFolder):
    """Shards' samples as (image, mask): in a tar shard the sample's jpg, jpeg, png or webp file and
    its seg.png or mask.png; in a Parquet shard the row's `columns` (image, mask), each as bytes
    or as `datasets`' Image struct. Named by shard and key when missing or unreadable."""

    MASKS = ("seg.png", "mask.png")

    def __init__(self, index: ShardIndex, columns: tuple[str, str], **checks: Any):
        super().__init__([], **checks)
        self.index, self.samples, self.columns = index, ShardSamples(index), columns

    @property
    def problems(self) -> list[str]:
        return self.index.problems

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, np.ndarray]:
        (image_name, image_bytes), (mask_name, mask_bytes) = self.files(self.samples[i])
        image, mask = read_image(image_bytes, image_name), _read_mask(mask_bytes, mask_name)
        return self.check(image, mask, image_name, mask_name)

    def files(self, sample: dict) -> tuple[tuple[str, bytes], tuple[str, bytes]]:
        """((name, bytes) of the image, (name, bytes) of the mask), each named shard: sample.file."""
        where = f"{sample['__shard__']}: sample {sample['__key__']}"
        if self.index.parquet:
            image_file = sample_file(sample, self.columns[:1], "set data.image_column")
            mask_file = sample_file(sample, self.columns[1:], "set data.mask_column")
        else:
            image_file, mask_file = sample_file(sample, IMAGE_EXTENSIONS), sample_file(sample, self.MASKS)
        return (f"{where}.{image_file[0]}", image_file[1]), (f"{where}.{mask_file[0]}", mask_file[1])


def shard_samples(
    cfg: SegmentationDataConfig, num_classes: int, problems: list[str]
) -> dict[str, Iterator[tuple[str, dict[str, bytes]]]]:
    """For `shardvision shard`: each split's samples as WebDataset files, the image and mask files'
    own bytes (jpg, seg.png) where the source has files, else PNGs (the mask as stored). A sample
    that cannot be read is left out and its problem appended to `problems`."""
    raw = dict(zip((cfg.train_split, cfg.eval_split), _raw_pairs(cfg, num_classes), strict=True))

    def files(pairs: PairFolder) -> Iterator[tuple[str, dict[str, bytes]]]:
        for i, (image, _) in readable(pairs.__getitem__, range(len(pairs)), problems):
            if pairs.pairs:  # files: their own bytes
                image_path, mask_path = pairs.pairs[i]
                extension = os.path.splitext(image_path)[1].lower().lstrip(".")
                with open(image_path, "rb") as f, open(mask_path, "rb") as g:
                    yield f"{i:09d}", {extension: f.read(), "seg.png": g.read()}
            elif isinstance(pairs, ShardPairs):  # shards again (other sizes or format): their files' bytes
                (_, image_bytes), (_, mask_bytes) = pairs.files(pairs.samples[i])
                with Image.open(io.BytesIO(image_bytes)) as img, Image.open(io.BytesIO(mask_bytes)) as m:
                    extension, mask_is_png = str(img.format).lower().replace("jpeg", "jpg"), m.format == "PNG"
                mask_png = mask_bytes if mask_is_png else png_bytes(_read_mask(mask_bytes))  # as stored
                yield f"{i:09d}", {extension: image_bytes, "seg.png": mask_png}
            else:
                assert isinstance(pairs, HFPairs)
                mask = pairs.ds[i][pairs.mask_column]  # as stored, not as checked (reduce_zero_label applies when read)
                yield f"{i:09d}", {"png": png_bytes(image), "seg.png": png_bytes(np.asarray(mask))}

    return {split: files(pairs) for split, pairs in raw.items()}


def voc_pairs(root: str, split: str) -> list[tuple[str, str]]:
    listing = os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt")
    if not os.path.isfile(listing):
        raise ConfigError(
            f"data.root: {listing} is missing (VOC layout: JPEGImages/, SegmentationClass/, "
            "ImageSets/Segmentation/<split>.txt)"
        )
    with open(listing) as f:
        ids = [line.strip() for line in f if line.strip()]
    return [
        (os.path.join(root, "JPEGImages", f"{i}.jpg"), os.path.join(root, "SegmentationClass", f"{i}.png")) for i in ids
    ]


def ade20k_pairs(root: str, split: str) -> list[tuple[str, str]]:
    images, masks = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
    for folder in (images, masks):
        if not os.path.isdir(folder):
            raise ConfigError(
                f"data.root: {folder} is missing (ADE20K layout: images/<split>/*.jpg, annotations/<split>/*.png)"
            )
    names = sorted(os.path.splitext(n)[0] for n in os.listdir(images) if n.lower().endswith((".jpg", ".jpeg", ".png")))
    pairs = [(os.path.join(images, n + ".jpg"), os.path.join(masks, n + ".png")) for n in names]
    missing = [m for _, m in pairs if not os.path.isfile(m)]
    if missing:
        raise ConfigError(f"data.root: {len(missing)} images have no annotation, e.g. {missing[0]}")
    return pairs


# --------------------------------------------------------------------------------------------
# The synthetic shapes set
# --------------------------------------------------------------------------------------------


def write_shapes(root: str, counts: tuple[int, int], size: int = 96) -> None:
    """Deterministic scenes of squares, circles and triangles on textured backgrounds, written in
    the VOC layout with 255 on a 1-pixel border around every shape, as VOC marks its borders."""
    rng = np.random.default_rng(1234)
    with folder_written_once(root) as tmp:
        _write_shapes_into(tmp, rng, counts, size)


def _write_shapes_into(tmp: str, rng: np.random.Generator, counts: tuple[int, int], size: int) -> None:
    from PIL import ImageDraw

    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(tmp, sub))
    for split, count in zip(("train", "val"), counts, strict=True):
        ids = []
        for k in range(count):
            noise = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            image = Image.fromarray(noise + rng.integers(0, 120, 3, dtype=np.uint8))
            mask = Image.new("L", (size, size), 0)
            draw, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
            for _ in range(rng.integers(1, 4)):
                cls = int(rng.integers(1, 4))
                r = int(rng.integers(10, 24))
                cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
                color = tuple(int(c) for c in rng.integers(130, 256, 3))
                box = [cx - r, cy - r, cx + r, cy + r]
                for d, fill, outline in ((draw, color, None), (draw_mask, cls, 255)):
                    if cls == 1:
                        d.rectangle(box, fill=fill, outline=outline)
                    elif cls == 2:
                        d.ellipse(box, fill=fill, outline=outline)
                    else:
                        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill, outline=outline)
            name = f"{split}_{k:05d}"
            image.save(os.path.join(tmp, "JPEGImages", name + ".jpg"), quality=95)
            mask.save(os.path.join(tmp, "SegmentationClass", name + ".png"))
            ids.append(name)
        with open(os.path.join(tmp, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")


def shapes_root(cfg: SegmentationDataConfig) -> str:
    root = os.path.join(generated_data_root(cfg.root), f"shapes-seg-v1-{cfg.shapes_count[0]}-{cfg.shapes_count[1]}")
    if not os.path.isdir(root):
        write_shapes(root, (cfg.shapes_count[0], cfg.shapes_count[1]))
    return root


# --------------------------------------------------------------------------------------------
# Transforms and collate
# --------------------------------------------------------------------------------------------


class TrainTransform:
    """Scale jitter, crop (padding the mask with ignore_index), flip, normalise: image and mask together."""

    def __init__(self, cfg: SegmentationDataConfig):
        size = cfg.image_size
        self.transform = v2.Compose(
            [
                v2.ScaleJitter(target_size=(size, size), scale_range=tuple(cfg.scale_range), antialias=True),
                v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: cfg.ignore_index}),
                v2.RandomHorizontalFlip(cfg.hflip),
                v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
                v2.Normalize(cfg.mean, cfg.std),
            ]
        )

    def __call__(self, pair: tuple[Image.Image, np.ndarray]) -> dict:
        image, mask = pair
        image, mask = self.transform(
            tv_tensors.Image(v2.functional.pil_to_tensor(image)), tv_tensors.Mask(torch.from_numpy(mask))
        )
        return {"image": image.as_subclass(torch.Tensor), "mask": mask.as_subclass(torch.Tensor)}


class EvalTransform:
    """Resize the image (shorter side = image_size); keep the mask at its original resolution,
    where the metrics are computed."""

    def __init__(self, cfg: SegmentationDataConfig):
        self.transform = v2.Compose(
            [
                v2.Resize(cfg.image_size, antialias=True),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(cfg.mean, cfg.std),
            ]
        )

    def __call__(self, pair: tuple[Image.Image, np.ndarray]) -> dict:
        image, mask = pair
        image = self.transform(tv_tensors.Image(v2.functional.pil_to_tensor(image))).as_subclass(torch.Tensor)
        return {"image": image, "mask": torch.from_numpy(mask)}


def collate(samples: list[dict]) -> dict:
    """Stack training crops; pad eval images of different sizes to the largest, recording each
    image's own extent, and keep masks at their original size in a list."""
    if all(s["image"].shape == samples[0]["image"].shape for s in samples) and all(
        s["mask"].shape == samples[0]["mask"].shape for s in samples
    ):
        images = torch.stack([s["image"] for s in samples])
        return {
            "image": images,
            "mask": torch.stack([s["mask"] for s in samples]),
            "extent": torch.tensor([s["image"].shape[1:] for s in samples]),
        }
    h = max(s["image"].shape[1] for s in samples)
    w = max(s["image"].shape[2] for s in samples)
    images = torch.zeros(len(samples), 3, h, w)
    for i, s in enumerate(samples):
        images[i, :, : s["image"].shape[1], : s["image"].shape[2]] = s["image"]
    return {
        "image": images,
        "mask": [s["mask"] for s in samples],
        "extent": torch.tensor([s["image"].shape[1:] for s in samples]),
    }


def _raw_pairs(cfg: SegmentationDataConfig, num_classes: int) -> list[PairFolder]:
    """The train and eval splits' (image, mask) pairs, checked but not transformed."""
    checks = dict(num_classes=num_classes, ignore_index=cfg.ignore_index, reduce_zero_label=cfg.reduce_zero_label)
    splits = (cfg.train_split, cfg.eval_split)
    if cfg.source in SHARD_SUFFIX:
        assert cfg.root is not None  # validate() requires it
        columns = (cfg.image_column, cfg.mask_column)
        return [
            ShardPairs(ShardIndex(cfg.root, split, SHARD_SUFFIX[cfg.source]), columns, **checks) for split in splits
        ]
    if cfg.source == "hf_disk":
        import datasets

        loaded = datasets.load_from_disk(cfg.root)
        raw: list[PairFolder] = []
        for split in splits:
            if split not in loaded:
                raise ConfigError(
                    f"{cfg.root}: no split {split!r}; it has {list(loaded)} (set data.train_split / data.eval_split)"
                )
            raw.append(HFPairs(loaded[split], cfg.image_column, cfg.mask_column, f"{cfg.root} [{split}]", **checks))
        return raw
    root = shapes_root(cfg) if cfg.source == "shapes" else cfg.root
    pairs_of = ade20k_pairs if cfg.source == "ade20k" else voc_pairs
    return [PairFolder(pairs_of(root, split), **checks) for split in splits]


def build_datasets(cfg: SegmentationDataConfig, num_classes: int, seed: int) -> tuple[Dataset, Dataset]:
    train, val = _raw_pairs(cfg, num_classes)
    return SeededTransforms(train, TrainTransform(cfg), seed), SeededTransforms(val, EvalTransform(cfg), seed)
