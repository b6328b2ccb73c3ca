"""What tests build and compare against: a tiny in-memory task for in-process trainings, data
sets with known faults for every recipe and source, and pycocotools called directly as the
independent reference for COCO mAP."""

from __future__ import annotations

import contextlib
import io
import json
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.config import TrainConfig
from core.task import Metrics, Task

# --- a tiny task, trained in-process -----------------------------------------------------------


class MeanLoss(Metrics):
    def __init__(self):
        self.losses = []

    def update(self, outputs):
        self.losses.append(outputs["loss"])

    def compute(self):
        return {"loss": torch.cat(self.losses).mean().item()}


class TinyTask(Task):
    """Two-class linear data; `nan_at` makes the loss of that training call NaN."""

    def __init__(self, cfg, nan_at=None):
        super().__init__(cfg)
        self.nan_at, self.calls = nan_at, 0

    def build_model(self):
        return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))

    def build_datasets(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 4, generator=g)
        samples = [{"image": xi, "label": int(xi.sum() > 0)} for xi in x]
        return samples[:64], samples[64:]

    def training_step(self, model, batch):
        loss = F.cross_entropy(model(batch["image"]), batch["label"])
        self.calls += 1
        return loss * float("nan") if self.calls == self.nan_at else loss

    def evaluation_step(self, model, batch):
        return {"loss": F.cross_entropy(model(batch["image"]), batch["label"], reduction="none")}

    def build_metrics(self):
        return MeanLoss()


def tiny_config(tmp_path, **loop) -> TrainConfig:
    cfg = TrainConfig(output_dir=str(tmp_path))
    cfg.data.micro_batch_size, cfg.data.num_workers = 8, 0
    cfg.optim.lr = 0.05
    cfg.loop.epochs = 2
    for key, value in loop.items():
        setattr(cfg.loop, key, value)
    cfg.logging.progress_bar, cfg.logging.trackers, cfg.logging.every_steps = False, [], 1
    return cfg


# --- data sets with known faults: each builder returns (recipe, arguments, the faults' patterns) --


QUICK_RUN = [
    "--logging.progress_bar",
    "false",
    "--logging.trackers",
    "[]",
    "--logging.count_flops",
    "false",
    "--logging.every_steps",
    "1",
    "--data.num_workers",
    "0",
    "--loop.epochs",
    "1",
]
TINY_CLASSIFIER = [
    "--model.name",
    "test_vit",
    "--model.kwargs",
    "{img_size: 16}",
    "--model.num_classes",
    "2",
    "--data.image_size",
    "16",
    "--data.micro_batch_size",
    "4",
]


def rng_for(name: str) -> np.random.Generator:
    """The same pixels for the same file name in every test, whatever ran before."""
    return np.random.default_rng(zlib.crc32(name.encode()))


def noise_image(path: Path, size=(32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng_for(path.name).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def image_bytes(i: int, size=(32, 32)) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(rng_for(str(i)).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar_shards(folder: Path, split: str, samples: list[tuple[str, dict[str, bytes]]], per_shard: int) -> None:
    """`samples` ((key, {extension: bytes}), in order) as `folder/<split>-000000.tar`, ... with
    `per_shard` samples each: written with tarfile alone, as WebDataset's own writer lays them out."""
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    for shard, first in enumerate(range(0, len(samples), per_shard)):
        with tarfile.open(folder / f"{split}-{shard:06d}.tar", "w") as tar:
            for key, files in samples[first : first + per_shard]:
                for extension, data in files.items():
                    member = tarfile.TarInfo(f"{key}.{extension}")
                    member.size, member.mtime = len(data), 0
                    tar.addfile(member, io.BytesIO(data))


def write_parquet_shards(
    folder: Path, split: str, rows: list, per_shard: int, classes, row_group: int, broken_image_at: int | None = None
) -> None:
    """(PIL image, label) `rows` as `folder/<split>-00000-of-0000N.parquet` files of `per_shard`
    rows, written by `datasets` (`to_parquet`, the Hugging Face Hub's layout): the image as its
    Image feature (PNG bytes), the label a ClassLabel of `classes` or a plain integer."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=classes) if classes else datasets.Value("int64")}
    )
    images = []
    for i, (image, _) in enumerate(rows):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue()[: 40 if i == broken_image_at else None], "path": None})
    folder.mkdir(parents=True, exist_ok=True)
    shards = range(0, len(rows), per_shard)
    for shard, first in enumerate(shards):
        part = slice(first, first + per_shard)
        table = {"image": images[part], "label": [label for _, label in rows[part]]}
        path = folder / f"{split}-{shard:05d}-of-{len(shards):05d}.parquet"
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(path), batch_size=row_group)


def digit_shards(folder: Path, per_shard: int = 240) -> Path:
    """The digits demo's two splits as tar shards of PNG images and cls labels, with classes.txt."""
    from recipes.classification.data import Digits

    for split in ("train", "val"):
        digits = Digits(split)
        samples = []
        for i in range(len(digits)):
            image, label = digits[i]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            samples.append((f"{split}/{i:05d}", {"png": buffer.getvalue(), "cls": str(label).encode()}))
        write_tar_shards(folder, split, samples, per_shard)
    (folder / "classes.txt").write_text("".join(f"{c}\n" for c in Digits("train").classes))
    return folder


def digit_parquet(folder: Path, per_shard: int = 240) -> Path:
    """The digits demo's two splits as Parquet shards written by `datasets`, in row groups of 100:
    the samples of digit_shards, shard for shard."""
    from recipes.classification.data import Digits

    for split in ("train", "val"):
        digits = Digits(split)
        rows = [digits[i] for i in range(len(digits))]
        write_parquet_shards(folder, split, rows, per_shard, classes=digits.classes, row_group=100)
    return folder


# --------------------------------------------------------------------------------------------
# One small data set per recipe and source, each with its own bad samples. A builder returns the
# recipe, its command-line arguments, and the bad samples it planted as
# {split: [(regex the message must match, ...)]}, in the order the file lists them.
# --------------------------------------------------------------------------------------------


def imagefolder(root: Path):
    for split, n in (("train", 8), ("val", 4)):
        for c in ("a", "b"):
            for i in range(n):
                noise_image(root / split / c / f"{i}.jpg")
    truncate(root / "train" / "a" / "3.jpg")
    (root / "train" / "b" / "2.jpg").write_bytes(b"")
    (root / "val" / "a" / "1.jpg").write_text("not an image")
    args = [*TINY_CLASSIFIER, "--data.source", "imagefolder", "--data.root", str(root)]
    bad = {
        "train": [
            r"train sample 3: .*train/a/3\.jpg: cannot read image \(.*[Tt]runcated",
            r"train sample 10: .*train/b/2\.jpg: cannot read image \(cannot identify image file",
        ],
        "eval": [r"eval sample 1: .*val/a/1\.jpg: cannot read image \(cannot identify image file"],
    }
    return "classification", args, bad


def classification_hf_disk(root: Path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})

    def split(n, broken, wrong_label):
        images = [
            {"bytes": b"\x89PNG garbage" if i == broken else image_bytes(i), "path": f"img{i}.png"} for i in range(n)
        ]
        labels = [7 if i == wrong_label else i % 2 for i in range(n)]
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    datasets.DatasetDict({"train": split(16, 5, 9), "val": split(8, 2, None)}).save_to_disk(str(root))
    args = [*TINY_CLASSIFIER, "--data.source", "hf_disk", "--data.root", str(root)]
    bad = {
        "train": [
            r"train sample 5: .* \[train\] row 5 \(img5\.png\): cannot read image",
            r"train sample 9: .* \[train\] row 9 \(img9\.png\): label 7 is outside 0\.\.1",
        ],
        "eval": [r"eval sample 2: .* \[val\] row 2 \(img2\.png\): cannot read image"],
    }
    return "classification", args, bad


def coco(root: Path):
    images, annotations = {"train": [], "val": []}, {"train": [], "val": []}
    for split, n in (("train", 8), ("val", 4)):
        for i in range(1, n + 1):
            noise_image(root / split / f"{i}.jpg", (48, 40))
            images[split].append({"id": i, "file_name": f"{i}.jpg", "width": 48, "height": 40})
            annotations[split].append(
                {
                    "id": 100 * i,
                    "image_id": i,
                    "category_id": 1 + i % 2,
                    "bbox": [4, 4, 20, 16],
                    "area": 320.0,
                    "iscrowd": 0,
                }
            )
    annotations["train"].append(
        {"id": 999, "image_id": 2, "category_id": 1, "bbox": [40, 30, 20, 20], "area": 400.0, "iscrowd": 0}
    )
    truncate(root / "train" / "6.jpg")
    (root / "val" / "3.jpg").write_bytes(b"")
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        cats = [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]
        (root / "annotations" / f"{split}.json").write_text(
            json.dumps({"images": images[split], "annotations": annotations[split], "categories": cats})
        )
    args = [
        "--model.name",
        "fasterrcnn_mobilenet_v3_large_320_fpn",
        "--model.num_classes",
        "2",
        "--data.source",
        "coco",
        "--data.root",
        str(root),
        "--data.train_images",
        "train",
        "--data.train_annotations",
        "annotations/train.json",
        "--data.eval_images",
        "val",
        "--data.eval_annotations",
        "annotations/val.json",
        "--data.min_size",
        "48",
        "--data.max_size",
        "48",
        "--data.micro_batch_size",
        "2",
    ]
    bad = {
        "train": [
            r"annotations/train\.json: annotation 999 of image 2 \(2\.jpg\): box \[40, 30, 20, 20\] "
            r"outside the 48x40 image",
            r"train sample 5: .*train/6\.jpg: cannot read image \(.*[Tt]runcated",
        ],
        "eval": [r"eval sample 2: .*val/3\.jpg: cannot read image \(cannot identify image file"],
    }
    return "detection", args, bad


SEGMENTATION_ARGS = [
    "--config",
    "recipes/segmentation/configs/shapes.yaml",
    "--model.num_classes",
    "3",
    "--data.image_size",
    "32",
    "--data.micro_batch_size",
    "4",
]


def mask(cls: int, value_at_corner: int = 0) -> np.ndarray:
    m = np.zeros((32, 32), dtype=np.uint8)
    m[8:20, 8:20] = cls
    m[0, 0] = value_at_corner
    return m


def voc(root: Path):
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, n in (("train", 8), ("val", 4)):
        for i in range(n):
            noise_image(root / "JPEGImages" / f"{split}{i}.jpg")
            (root / "SegmentationClass").mkdir(exist_ok=True)
            Image.fromarray(mask(1 + i % 2, 37 if (split, i) == ("train", 4) else 0), mode="L").save(
                root / "SegmentationClass" / f"{split}{i}.png"
            )
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(f"{split}{i}" for i in range(n)))
    truncate(root / "JPEGImages" / "val2.jpg")
    bad = {
        "train": [r"train sample 4: .*SegmentationClass/train4\.png: mask values \[37\] are outside 0\.\.2"],
        "eval": [r"eval sample 2: .*JPEGImages/val2\.jpg: cannot read image \(.*[Tt]runcated"],
    }
    return "segmentation", [*SEGMENTATION_ARGS, "--data.source", "voc", "--data.root", str(root)], bad


def ade20k(root: Path):
    for split, n in (("training", 8), ("validation", 4)):
        for i in range(n):
            noise_image(root / "images" / split / f"{i}.jpg")
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask(1 + i % 2), mode="L").save(root / "annotations" / split / f"{i}.png")
    (root / "images" / "training" / "6.jpg").write_text("not an image")
    Image.new("RGB", (32, 32)).save(root / "annotations" / "validation" / "0.png")  # RGB: not an index mask
    bad = {
        "train": [r"train sample 6: .*images/training/6\.jpg: cannot read image \(cannot identify image file"],
        "eval": [
            r"eval sample 0: .*annotations/validation/0\.png: a mask must be a single-channel index PNG "
            r"\(mode P or L\), got mode RGB"
        ],
    }
    args = [
        *SEGMENTATION_ARGS,
        "--data.source",
        "ade20k",
        "--data.root",
        str(root),
        "--data.train_split",
        "training",
        "--data.eval_split",
        "validation",
    ]
    return "segmentation", args, bad


def segmentation_hf_disk(root: Path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})

    def split(n, broken):
        def png(array):
            import io

            buffer = io.BytesIO()
            Image.fromarray(array, mode="L").save(buffer, format="PNG")
            return {"bytes": buffer.getvalue(), "path": None}

        images = [{"bytes": b"garbage" if i == broken else image_bytes(i), "path": None} for i in range(n)]
        return datasets.Dataset.from_dict(
            {"image": images, "mask": [png(mask(cls=1 + i % 2)) for i in range(n)]}, features=features
        )

    datasets.DatasetDict({"train": split(8, 1), "val": split(4, None)}).save_to_disk(str(root))
    bad = {"train": [r"train sample 1: .* \[train\] row 1: cannot read image or mask"], "eval": []}
    return "segmentation", [*SEGMENTATION_ARGS, "--data.source", "hf_disk", "--data.root", str(root)], bad


SOURCES = {
    "imagefolder": imagefolder,
    "classification-hf_disk": classification_hf_disk,
    "coco": coco,
    "voc": voc,
    "ade20k": ade20k,
    "segmentation-hf_disk": segmentation_hf_disk,
}


# --- pycocotools, called directly ----------------------------------------------------------------


def load_gt(path):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def pycocotools_direct(gt_path, results_path, iou_type="bbox"):
    """COCOeval on a results file as written; for masks, its results without their boxes (as
    detectron2 scores them: pycocotools' loadRes would turn a result with a box into the box)."""
    from pycocotools.cocoeval import COCOeval

    gt = load_gt(gt_path)
    results = json.loads(Path(results_path).read_text())
    if iou_type == "segm":
        for r in results:
            r.pop("bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        e = COCOeval(gt, dt, iou_type)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats
