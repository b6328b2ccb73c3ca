"""Classification data: the built-in digits demo, ImageFolder trees, and `datasets` from disk or
local files, all turned into (PIL image, label) pairs and then into tensors by timm's transforms."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from core.config import DataConfig, option
from core.data import (
    DECODE_ERRORS,
    SeededTransforms,
    decode_failure,
    folder_written_once,
    generated_data_root,
    read_image,
    read_image_tensor,
)
from core.errors import ConfigError, DataError
from core.shards import (
    IMAGE_EXTENSIONS,
    SHARD_SUFFIX,
    ShardIndex,
    ShardSamples,
    image_member,
    parquet_class_names,
    readable,
    sample_file,
)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class ClassificationDataConfig(DataConfig):
    source: Literal["digits", "imagefolder", "hf_disk", "hf_files", "webdataset", "parquet"] = option(
        "digits",
        "digits: scikit-learn's handwritten digits (built in); imagefolder: root/<split>/<class>/*.jpg; "
        "hf_disk: a `datasets` DatasetDict saved with save_to_disk; hf_files: local files read by a "
        "`datasets` builder; webdataset: tar shards root/<split>-*.tar, each sample an image (jpg, jpeg, "
        'png, webp) and its label (cls, or json with a "label"); parquet: Parquet shards '
        "root/<split>-*.parquet (as `datasets` and the Hugging Face Hub write them), read row by row with "
        "no cache copy, columns image_column and label_column.",
    )
    root: str | None = option(
        None, "Dataset folder (not used by digits); for webdataset and parquet also a brace pattern or glob of shards."
    )
    train_split: str = option("train", "Training split: a subfolder (imagefolder) or a split name (datasets).")
    eval_split: str = option("val", "Evaluation split, as train_split.")
    hf_builder: str = option("imagefolder", "hf_files: the `datasets` builder (imagefolder, parquet, arrow, ...).")
    image_column: str = option("image", "datasets and parquet: the image column.")
    label_column: str = option("label", "datasets and parquet: the integer label column.")
    image_size: int = option(224, "Square input size in pixels.")
    crop_pct: float = option(0.875, "Eval: resize to image_size / crop_pct, then center-crop.")
    interpolation: str = option("bilinear", "Resize interpolation (bilinear, bicubic, ...).")
    mean: list[float] = option(IMAGENET_MEAN, "Normalisation mean per channel.")
    std: list[float] = option(IMAGENET_STD, "Normalisation std per channel.")
    scale: list[float] = option([0.08, 1.0], "RandomResizedCrop area range.")
    ratio: list[float] = option([0.75, 1.3333333], "RandomResizedCrop aspect-ratio range.")
    hflip: float = option(0.5, "Horizontal flip probability.")
    color_jitter: float = option(0.0, "Color jitter strength (0 disables).")
    auto_augment: str | None = option(None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1.")
    random_erasing: float = option(0.0, "Random erasing probability.")
    mixup_alpha: float = option(0.0, "Mixup alpha (0 disables).")
    cutmix_alpha: float = option(0.0, "CutMix alpha (0 disables).")
    mixup_prob: float = option(1.0, "Probability of applying mixup or cutmix to a batch.")
    label_smoothing: float = option(0.0, "Label smoothing of the training targets.")
    fast_decode: bool = option(
        False,
        "Decode with torchvision.io and crop, resize and flip the uint8 image as a tensor, normalising whole "
        "batches: the same crops and flips, pixels within 2/255 of the PIL path (bilinear), 1.6x the images/s "
        "per loader core of timm's loader without its prefetcher (benchmarks/data_pipeline.py). Bilinear or "
        "bicubic only; not with auto_augment, color_jitter, random_erasing. See docs/data.md.",
    )

    def validate(self) -> None:
        super().validate()
        if self.source != "digits" and not self.root:
            raise ConfigError(f"data.root is required for data.source={self.source!r}")
        if self.root and not os.path.exists(self.root) and self.source not in SHARD_SUFFIX:
            raise ConfigError(f"data.root: no such folder: {self.root!r}")
        if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            if self.micro_batch_size % 2:
                raise ConfigError(f"data.micro_batch_size must be even with mixup/cutmix, got {self.micro_batch_size}")
        if self.fast_decode:
            if self.interpolation not in ("bilinear", "bicubic"):
                raise ConfigError(
                    f"data.fast_decode resizes tensors, bilinear or bicubic; data.interpolation {self.interpolation!r} "
                    "needs the PIL path: set data.fast_decode false"
                )
            for key in ("auto_augment", "color_jitter", "random_erasing"):
                if getattr(self, key):
                    raise ConfigError(
                        f"data.fast_decode crops, resizes and flips only; data.{key} ({getattr(self, key)!r}) needs "
                        "the PIL path: set data.fast_decode false"
                    )
        for key in ("hflip", "mixup_prob", "random_erasing", "label_smoothing"):
            value = getattr(self, key)
            if not 0 <= value <= 1:
                raise ConfigError(f"data.{key} must be in [0, 1], got {value!r}")


class Digits(Dataset):
    """scikit-learn's 1,797 real 8x8 handwritten digits, split 80/20 train/val, stratified and
    deterministic; shipped with scikit-learn, so nothing is downloaded. The split is made once and
    kept as arrays under ~/.cache/shardvision: importing scikit-learn cost every rank of every
    launch about a second."""

    def __init__(self, split: str):
        root = os.path.join(generated_data_root(), "digits-v1")
        if not os.path.isdir(root):
            with folder_written_once(root) as tmp:
                write_digits_split(tmp)
        with np.load(os.path.join(root, f"{split}.npz")) as arrays:
            self.images, self.labels = arrays["images"], arrays["labels"]
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode="L").convert("RGB"), int(self.labels[i])


def write_digits_split(folder: str) -> None:
    """train.npz and val.npz in `folder`: uint8 images (0..255) and int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(index, test_size=0.2, random_state=0, stratify=digits.target)
    for split, chosen in (("train", train_idx), ("val", val_idx)):
        images = (digits.images[chosen] * (255.0 / 16.0)).astype(np.uint8)
        np.savez(os.path.join(folder, f"{split}.npz"), images=images, labels=digits.target[chosen].astype(np.int64))


class ShardImages(Dataset):
    """Shards' samples as (PIL image, label). In a tar shard the image is the sample's jpg, jpeg,
    png or webp file, the label its cls file (an integer, the WebDataset and timm convention) or
    its json's "label"; in a Parquet shard they are the row's `columns` (image, label), the image
    as bytes or as `datasets`' Image struct. A sample without either, or whose image does not
    decode, is a DataError naming its shard and key."""

    def __init__(
        self, index: ShardIndex, num_classes: int, columns: tuple[str, str] = ("image", "label"), tensors: bool = False
    ):
        self.index, self.samples, self.num_classes, self.columns = index, ShardSamples(index), num_classes, columns
        self.read = read_image_tensor if tensors else read_image  # data.fast_decode: uint8 tensors
        self.classes = index.classes or (parquet_class_names(index.paths[0], columns[1]) if index.parquet else [])

    @property
    def problems(self) -> list[str]:
        return self.index.problems

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image | torch.Tensor, int]:
        sample = self.samples[i]
        where = f"{sample['__shard__']}: sample {sample['__key__']}"
        if self.index.parquet:
            found, data = sample_file(sample, self.columns[:1], "set data.image_column")
        else:
            found, data = sample_file(sample, IMAGE_EXTENSIONS)
        return self.read(data, f"{where}.{found}"), self._label(sample, where)

    def _label(self, sample: dict, where: str) -> int:
        key = self.columns[1] if self.index.parquet else "cls" if "cls" in sample else "json"
        if sample.get(key) is None:
            wanted = f"column {key!r} (data.label_column)" if self.index.parquet else 'cls, or json with a "label"'
            held = ", ".join(k for k in sample if not k.startswith("__"))
            raise DataError(f"{where} has no label ({wanted}); it has {held}")
        try:
            if key == "json":
                value = json.loads(sample["json"])
                label = int(value["label"] if isinstance(value, dict) else value)
            else:
                label = int(sample[key].decode().strip() if key == "cls" else sample[key])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: unreadable label in {key} ({e!r})") from None
        if not 0 <= label < self.num_classes:
            raise DataError(
                f"{where}: label {label} is outside 0..{self.num_classes - 1} (model.num_classes {self.num_classes})"
            )
        return label


class HFImages(Dataset):
    """A `datasets` split as (PIL image, label) pairs; an undecodable image or a label outside
    0..num_classes-1 is a DataError naming the row (and its file, where the set keeps one)."""

    def __init__(self, ds: Any, image_column: str, label_column: str, where: str, num_classes: int):
        for column in (image_column, label_column):
            if column not in ds.column_names:
                raise ConfigError(
                    f"{where}: no column {column!r}; columns are {ds.column_names} (set "
                    "data.image_column / data.label_column)"
                )
        self.ds, self.image_column, self.label_column, self.where, self.num_classes = (
            ds,
            image_column,
            label_column,
            where,
            num_classes,
        )
        # Named classes (a ClassLabel column) are checked against model.num_classes up front; plain
        # integers are checked row by row, so one mislabelled row is named rather than miscounted.
        self.classes = list(getattr(ds.features[label_column], "names", None) or [])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        try:
            row = self.ds[int(i)]  # `datasets` decodes the image here
            image = row[self.image_column].convert("RGB")
        except DECODE_ERRORS as e:
            raise DataError(f"{self._name(i)}: cannot read image ({decode_failure(e)})") from None
        label = int(row[self.label_column])
        if not 0 <= label < self.num_classes:
            raise DataError(
                f"{self._name(i)}: label {label} is outside 0..{self.num_classes - 1} (model.num_classes "
                f"{self.num_classes})"
            )
        return image, label

    def _name(self, i: int) -> str:
        """'<root> [split] row i', with the image's original file where the set recorded one."""
        import datasets

        try:
            raw = self.ds.cast_column(self.image_column, datasets.Image(decode=False))[int(i)][self.image_column]
            path = raw.get("path") if isinstance(raw, dict) else None
        except Exception:  # naming the file is best effort; the row number always names the sample
            path = None
        return f"{self.where} row {i}" + (f" ({path})" if path else "")


def _load_raw(cfg: ClassificationDataConfig, num_classes: int) -> tuple[Dataset, Dataset]:
    if cfg.source == "digits":
        return Digits("train"), Digits("val")
    if cfg.source in SHARD_SUFFIX:
        assert cfg.root is not None  # validate() requires it
        columns = (cfg.image_column, cfg.label_column)
        train, val = (
            ShardImages(ShardIndex(cfg.root, split, SHARD_SUFFIX[cfg.source]), num_classes, columns, cfg.fast_decode)
            for split in (cfg.train_split, cfg.eval_split)
        )
        return train, val
    if cfg.source == "imagefolder":
        from torchvision.datasets import ImageFolder

        sets = []
        for split in (cfg.train_split, cfg.eval_split):
            folder = os.path.join(cfg.root, split)
            if not os.path.isdir(folder):
                raise ConfigError(
                    f"data.root: {folder!r} is missing; an ImageFolder root needs {cfg.train_split}/ and "
                    f"{cfg.eval_split}/ with one subfolder per class"
                )
            sets.append(ImageFolder(folder, loader=read_image_tensor if cfg.fast_decode else read_image))
        if sets[0].classes != sets[1].classes:
            raise ConfigError(f"{cfg.root}: class folders differ between {cfg.train_split}/ and {cfg.eval_split}/")
        return sets[0], sets[1]

    import datasets

    if cfg.source == "hf_disk":
        loaded = datasets.load_from_disk(cfg.root)
    else:
        loaded = datasets.load_dataset(cfg.hf_builder, data_dir=cfg.root)
    out = []
    for split in (cfg.train_split, cfg.eval_split):
        if split not in loaded:
            raise ConfigError(
                f"{cfg.root}: no split {split!r}; it has {list(loaded)} (set data.train_split / data.eval_split)"
            )
        out.append(HFImages(loaded[split], cfg.image_column, cfg.label_column, f"{cfg.root} [{split}]", num_classes))
    return out[0], out[1]


def shard_samples(
    cfg: ClassificationDataConfig, num_classes: int, problems: list[str]
) -> tuple[dict, dict[str, Iterator[tuple[str, dict[str, bytes]]]]]:
    """For `shardvision shard`: {"classes": the class names}, and each split's samples as WebDataset
    files: the image file's own bytes where there is one (ImageFolder), else the image as PNG, and
    the label as `cls`. A sample that cannot be read is left out and its problem appended to `problems`."""
    raw = _load_raw(dataclasses.replace(cfg, fast_decode=False), num_classes)  # PIL images, to write PNG
    sets = dict(zip((cfg.train_split, cfg.eval_split), raw, strict=True))

    def files(raw: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
        paths = getattr(raw, "samples", None)  # ImageFolder's (path, label) pairs
        for i, (image, label) in readable(raw.__getitem__, range(len(raw)), problems):
            extension, data = image_member(image, paths[i][0] if paths else None)
            yield f"{i:09d}", {extension: data, "cls": str(label).encode()}

    classes = [str(c) for c in getattr(next(iter(sets.values())), "classes", [])]
    return {"classes": classes}, {split: files(raw) for split, raw in sets.items()}


class ToSample:
    """(PIL image, label) -> {"image": tensor, "label": int}; a class so workers can pickle it."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, pair: tuple[Image.Image, int]) -> dict:
        image, label = pair
        return {"image": self.transform(image), "label": label}


class TensorCrop:
    """data.fast_decode's training transform on a uint8 tensor (C, H, W), or a PIL image made
    one: timm's RandomResizedCropAndInterpolation draws the crop (the same `random` draws as
    the PIL path), torchvision resizes the uint8 crop with antialiasing, a flip draws torch.rand
    as torchvision's RandomHorizontalFlip does.
    For evaluation (`training` False): the shorter side to image_size / crop_pct, then a centred
    crop, as timm's evaluation transform. uint8 out: the task normalises whole batches on the
    model's device (ClassificationTask.on_device)."""

    def __init__(self, cfg: ClassificationDataConfig, training: bool):
        from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode

        self.size, self.training, self.hflip = cfg.image_size, training, cfg.hflip
        self.interpolation = str_to_interp_mode(cfg.interpolation)
        self.crop = RandomResizedCropAndInterpolation(cfg.image_size, tuple(cfg.scale), tuple(cfg.ratio))
        self.resize = math.floor(cfg.image_size / cfg.crop_pct)

    def __call__(self, image: torch.Tensor | Image.Image) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        if isinstance(image, Image.Image):
            image = TF.pil_to_tensor(image.convert("RGB"))
        if not self.training:
            resized = TF.resize(image, [self.resize], self.interpolation, antialias=True)
            return TF.center_crop(resized, [self.size, self.size])
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        size = [self.size, self.size]
        image = TF.resized_crop(image, top, left, height, width, size, self.interpolation, antialias=True)
        return TF.hflip(image) if self.hflip > 0 and torch.rand(1) < self.hflip else image


def normalized(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """data.fast_decode's uint8 images as ToTensor + Normalize make them: (x / 255 - mean) / std,
    float32, on the images' device."""
    mean_, std_ = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in (mean, std))
    return images.float().div_(255).sub_(mean_).div_(std_)


def build_datasets(cfg: ClassificationDataConfig, num_classes: int, seed: int) -> tuple[Dataset, Dataset]:
    from timm.data import create_transform

    train_raw, eval_raw = _load_raw(cfg, num_classes)
    classes = len(getattr(train_raw, "classes", [])) or num_classes
    if classes > num_classes:
        raise ConfigError(f"the dataset has {classes} classes but model.num_classes is {num_classes}")
    if cfg.fast_decode:
        train_tf, eval_tf = TensorCrop(cfg, training=True), TensorCrop(cfg, training=False)
        return SeededTransforms(train_raw, ToSample(train_tf), seed), SeededTransforms(
            eval_raw, ToSample(eval_tf), seed
        )
    common = dict(
        input_size=(3, cfg.image_size, cfg.image_size),
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
    )
    train_tf = create_transform(
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter or None,
        auto_augment=cfg.auto_augment,
        re_prob=cfg.random_erasing,
        **common,
    )
    eval_tf = create_transform(is_training=False, crop_pct=cfg.crop_pct, **common)
    return SeededTransforms(train_raw, ToSample(train_tf), seed), SeededTransforms(eval_raw, ToSample(eval_tf), seed)
