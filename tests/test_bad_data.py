"""Bad samples in every recipe and data source: truncated, empty and non-image files, mask values
outside the classes, boxes outside their image, labels outside the classes. In error mode a run
stops with one line naming split, sample, file and value, and exit code 2; in skip mode it trains
to the end without them and lists them in bad_samples.txt. Real files, the real readers, the real
trainer (in-process here, 1 rank; tests/test_failure_runs.py runs 2 ranks)."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import MAX_SUBSTITUTES, DataError, GuardedCollate, GuardedSamples, check_samples, read_image

QUICK_RUN = [
    "--logging.progress_bar",
    "false",
    "--logging.tensorboard",
    "false",
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


def run_recipe(recipe: str, args: list[str]):
    """The recipe's own entry point, in this process, as `python recipes/<recipe>/train.py ARGS`."""
    import importlib

    return importlib.import_module(f"recipes.{recipe}.train").main(args)


@pytest.mark.parametrize("source", SOURCES)
def test_error_mode_names_the_first_bad_sample_and_exits_2(source, tmp_path, capsys, fresh_accelerate_state):
    recipe, args, bad = SOURCES[source](tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(recipe, [*args, *QUICK_RUN, "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("shardvision: error:")]
    assert len(errors) == 1, errors
    # Which bad sample a shuffled epoch meets first is the data order's business: it must be one of them.
    assert any(re.search(pattern, errors[0]) for pattern in bad["train"] + bad["eval"]), errors[0]
    assert errors[0].endswith(("set data.bad_samples: skip to train without it.", "to leave such annotations out)"))


@pytest.mark.parametrize("source", SOURCES)
def test_skip_mode_trains_without_them_and_lists_each_once(source, tmp_path, fresh_accelerate_state):
    recipe, args, bad = SOURCES[source](tmp_path / "data")
    run = tmp_path / "run"
    metrics = run_recipe(recipe, [*args, *QUICK_RUN, "--data.bad_samples", "skip", "--output-dir", str(run)])
    listed = (run / "bad_samples.txt").read_text().splitlines()
    expected = bad["train"] + bad["eval"]
    assert len(listed) == len(expected), listed
    for pattern in expected:
        assert sum(bool(re.search(pattern, line)) for line in listed) == 1, (pattern, listed)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["bad_samples"] == len(bad["train"])  # every one met in training, by its last log
    eval_rows = [r for r in rows if r["split"] == "eval"]
    primary = {"classification": "top1", "segmentation": "mIoU", "detection": "AP"}[recipe]
    assert len(eval_rows) == 1 and np.isfinite(metrics[primary])
    counted = {"classification": "samples", "segmentation": "images", "detection": "images"}[recipe]
    eval_size = {"classification": 8, "segmentation": 4, "detection": 4}[recipe]
    assert eval_rows[-1][counted] == eval_size - len(bad["eval"])  # a stand-in sample is never scored


def test_read_image_names_the_file_for_each_kind_of_damage(tmp_path):
    noise_image(tmp_path / "good.jpg")
    assert read_image(str(tmp_path / "good.jpg")).size == (32, 32)
    noise_image(tmp_path / "truncated.jpg")
    truncate(tmp_path / "truncated.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    for name in ("truncated.jpg", "empty.png", "text.jpg", "missing.jpg"):
        with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / name))}: cannot read image \("):
            read_image(str(tmp_path / name))


class Flaky(torch.utils.data.Dataset):
    def __init__(self, n, bad):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise DataError(f"file{i}.jpg: cannot read image")
        return {"image": torch.full((2,), float(i))}


def test_a_bad_sample_is_replaced_by_the_next_readable_one_and_reported():
    guarded = GuardedSamples(Flaky(10, bad={3, 4, 9}), "train")
    collate = GuardedCollate(torch.utils.data.default_collate)
    batch, report = collate([guarded[i] for i in (2, 3, 4, 9)])
    assert batch["image"][:, 0].tolist() == [2, 5, 5, 0]  # 3 and 4 both stand-in'd by 5; 9 wraps to 0
    assert report.ok.tolist() == [True, False, False, False]
    assert report.problems == [
        "train sample 3: file3.jpg: cannot read image",
        "train sample 4: file4.jpg: cannot read image",
        "train sample 4: file4.jpg: cannot read image",
        "train sample 9: file9.jpg: cannot read image",
    ]
    assert not report.fatal


def test_a_run_of_unreadable_samples_is_fatal():
    guarded = GuardedSamples(Flaky(40, bad=range(5, 5 + MAX_SUBSTITUTES + 1)), "eval")
    batch, report = GuardedCollate(torch.utils.data.default_collate)([guarded[5]])
    assert batch is None and report.fatal.startswith(
        f"{MAX_SUBSTITUTES + 1} samples in a row cannot be read, e.g. eval sample {5 + MAX_SUBSTITUTES}"
    )


def test_check_samples_reads_everything_in_parallel_and_reports_every_problem():
    problems, read = check_samples(Flaky(50, bad={3, 4, 17, 49}), "train", num_workers=2, batch_size=8)
    assert read == 50
    assert problems == [f"train sample {i}: file{i}.jpg: cannot read image" for i in (3, 4, 17, 49)]
