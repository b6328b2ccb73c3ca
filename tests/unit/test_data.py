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


def photos(root, count: int = 12) -> None:
    """JPEG photos of uneven sizes (textured, so that resampling differences show) in an ImageFolder."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(count // 2):
                h, w = int(rng.integers(90, 140)), int(rng.integers(90, 140))
                smooth = np.kron(rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
                pixels = np.clip(smooth + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.jpg", quality=90)


@pytest.mark.parametrize("interpolation, largest", [("bilinear", 2), ("bicubic", 16)])
def test_fast_decode_crops_and_flips_as_the_pil_path_within_a_few_levels(tmp_path, interpolation, largest):
    """data.fast_decode (torchvision.io decode, uint8 tensor resize, normalised on the device) draws
    the same crops and flips as timm's PIL transforms: the images differ by resampling only."""
    from recipes.classification.data import normalized

    photos(tmp_path)
    common = dict(source="imagefolder", root=str(tmp_path), image_size=64, interpolation=interpolation)
    pil = build_datasets(ClassificationDataConfig(**common), num_classes=2, seed=3)
    fast = build_datasets(ClassificationDataConfig(**common, fast_decode=True), num_classes=2, seed=3)
    for split in (0, 1):  # training (random crops, flips) and evaluation (resize, centre crop)
        expected = torch.stack([pil[split][i]["image"] for i in range(12)])
        samples = [fast[split][i] for i in range(12)]
        assert all(s["image"].dtype == torch.uint8 for s in samples)
        got = normalized(torch.stack([s["image"] for s in samples]), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        levels = ((got - expected) * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255).abs()
        assert levels.mean() < 0.5 and levels.max() <= largest + 1e-3, (split, levels.mean(), levels.max())
        assert [s["label"] for s in samples] == [pil[split][i]["label"] for i in range(12)]


def test_fast_decode_names_an_unreadable_image_and_refuses_augmentations_it_lacks(tmp_path):
    from core.errors import DataError

    photos(tmp_path, count=4)
    broken = tmp_path / "train" / "a" / "0.jpg"
    broken.write_bytes(broken.read_bytes()[:300])
    train, _ = build_datasets(
        ClassificationDataConfig(source="imagefolder", root=str(tmp_path), fast_decode=True), num_classes=2, seed=0
    )
    with pytest.raises(DataError, match=rf"{broken}: cannot read image \(Image is incomplete or truncated\)"):
        train[0]
    with pytest.raises(ConfigError, match=r"data.fast_decode crops, resizes and flips only; data.auto_augment"):
        ClassificationDataConfig(fast_decode=True, auto_augment="rand-m9-mstd0.5").validate()
    with pytest.raises(ConfigError, match=r"data.fast_decode resizes tensors, bilinear or bicubic; data.interpolation"):
        ClassificationDataConfig(fast_decode=True, interpolation="nearest").validate()


def test_fast_decode_reads_what_torchvision_does_not_decode_through_pil(tmp_path):
    """BMP and TIFF (PIL reads them, torchvision.io does not) and 16-bit PNG, as uint8 RGB."""
    from core.data import read_image_tensor

    pixels = np.random.default_rng(0).integers(0, 255, (9, 7, 3), dtype=np.uint8)
    for extension in ("bmp", "tiff", "png"):
        Image.fromarray(pixels).save(tmp_path / f"x.{extension}")
        image = read_image_tensor(str(tmp_path / f"x.{extension}"))
        assert image.dtype == torch.uint8 and np.array_equal(image.permute(1, 2, 0).numpy(), pixels), extension
    Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit grey
    deep = read_image_tensor(str(tmp_path / "deep.png"))
    assert deep.dtype == torch.uint8 and deep.shape == (3, 9, 7)
    assert np.array_equal(deep[0].numpy(), pixels[..., 0])
