"""Datasets and transforms of the classification recipe, on real files made here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from core.data import SeededTransforms, build_loader
from core.errors import ConfigError
from recipes.classification.data import ClassificationDataConfig, Digits, build_datasets


def test_digits_split_is_deterministic_stratified_and_disjoint():
    train, val = Digits("train"), Digits("val")
    assert (len(train), len(val)) == (1437, 360)
    assert np.array_equal(Digits("val").images, val.images)
    assert set(np.bincount(val.labels)) <= {35, 36, 37}  # stratified: ~36 per class
    train_rows = {img.tobytes() for img in train.images}
    assert sum(img.tobytes() in train_rows for img in val.images) <= 2  # the set has a few duplicate digits


def test_seeded_augmentations_do_not_depend_on_workers():
    cfg = ClassificationDataConfig(image_size=32, scale=[0.3, 1.0], hflip=0.5)
    train, _ = build_datasets(cfg, num_classes=10, seed=0)

    def first_batches(workers):
        loader = DataLoader(train, batch_size=16, num_workers=workers)
        return [b["image"] for _, b in zip(range(3), loader, strict=False)]

    for a, b in zip(first_batches(0), first_batches(2), strict=True):
        assert torch.equal(a, b)
    epoch0 = train[5]["image"]
    assert torch.equal(epoch0, train[5]["image"])
    train.set_epoch(1)
    assert not torch.equal(train[5]["image"], epoch0)  # a new epoch, new crops


def test_persistent_workers_follow_the_epoch():
    cfg = ClassificationDataConfig(image_size=32, scale=[0.3, 1.0], hflip=0.5)
    train, _ = build_datasets(cfg, num_classes=10, seed=0)
    collate = torch.utils.data.default_collate

    def epochs(workers):
        train.set_epoch(0)
        loader = build_loader(
            train, batch_size=16, shuffle=False, num_workers=workers, collate_fn=collate, pin_memory=False
        )
        assert loader.persistent_workers == (workers > 0)
        out = []
        for epoch in range(3):
            train.set_epoch(epoch)
            out.append(torch.cat([b["image"] for _, b in zip(range(2), loader, strict=False)]))
        return out

    in_process, persistent = epochs(0), epochs(2)
    assert not torch.equal(in_process[0], in_process[1])  # each epoch draws new crops
    for a, b in zip(in_process, persistent, strict=True):
        assert torch.equal(a, b)  # the long-lived workers saw every set_epoch


def test_seeded_transform_leaves_global_rng_alone():
    data = SeededTransforms(list(range(4)), lambda x: torch.rand(1).item())
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _ = [data[i] for i in range(4)]
    assert torch.equal(torch.rand(3), expected)


def write_images(folder, classes=("cat", "dog"), per_class=3, size=(20, 16)):
    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / c / f"{i}.jpg")


def test_imagefolder(tmp_path):
    write_images(tmp_path / "train")
    write_images(tmp_path / "val", per_class=2)
    cfg = ClassificationDataConfig(source="imagefolder", root=str(tmp_path), image_size=32)
    train, val = build_datasets(cfg, num_classes=2, seed=0)
    assert (len(train), len(val)) == (6, 4)
    sample = val[3]
    assert sample["image"].shape == (3, 32, 32) and sample["label"] == 1
    with pytest.raises(ConfigError, match="the dataset has 2 classes but model.num_classes is 1"):
        build_datasets(cfg, num_classes=1, seed=0)


def test_imagefolder_errors_name_the_folder(tmp_path):
    write_images(tmp_path / "train")
    with pytest.raises(ConfigError, match=r"val' is missing; an ImageFolder root needs train/ and val/"):
        build_datasets(ClassificationDataConfig(source="imagefolder", root=str(tmp_path)), 2, 0)
    write_images(tmp_path / "val", classes=("cat", "bird"))
    with pytest.raises(ConfigError, match="class folders differ"):
        build_datasets(ClassificationDataConfig(source="imagefolder", root=str(tmp_path)), 2, 0)


def test_datasets_saved_to_disk_and_local_files(tmp_path):
    import datasets

    write_images(tmp_path / "files" / "train")
    write_images(tmp_path / "files" / "validation", per_class=1)
    cfg = ClassificationDataConfig(
        source="hf_files", root=str(tmp_path / "files"), eval_split="validation", image_size=32
    )
    train, val = build_datasets(cfg, num_classes=2, seed=0)  # datasets' own imagefolder builder, offline
    assert (len(train), len(val)) == (6, 2)

    images = [Image.new("RGB", (10, 12), color=(i * 40, 0, 0)) for i in range(4)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    split = datasets.Dataset.from_dict({"img": images, "label": [0, 1, 0, 1]}, features=features)
    datasets.DatasetDict({"train": split, "val": split}).save_to_disk(str(tmp_path / "disk"))
    cfg = ClassificationDataConfig(source="hf_disk", root=str(tmp_path / "disk"), image_column="img", image_size=32)
    train, _ = build_datasets(cfg, num_classes=2, seed=0)
    assert train[1]["image"].shape == (3, 32, 32) and train[1]["label"] == 1
    with pytest.raises(ConfigError, match=r"no column 'image'; columns are \['img', 'label'\]"):
        build_datasets(ClassificationDataConfig(source="hf_disk", root=str(tmp_path / "disk")), 2, 0)
    with pytest.raises(ConfigError, match=r"no split 'test'"):
        build_datasets(
            ClassificationDataConfig(
                source="hf_disk", root=str(tmp_path / "disk"), image_column="img", eval_split="test"
            ),
            2,
            0,
        )
