"""Is a run bound by its data pipeline or by its model?

    python benchmarks/data_pipeline.py                  # default workers, 224 px ImageFolder + the digits demo
    python benchmarks/data_pipeline.py --workers 4 --images 512
    python benchmarks/data_pipeline.py --photos 512        # more photos for the per-core rows

Two rows. (1) The classification recipe's loader on an ImageFolder of real JPEG files written
here (ImageNet-like 400x350 photos-sized images, JPEG decode + timm's training transforms at
224 px, `data.num_workers` processes) against one process's training step rate of ResNet-18 at
224 px. (2) The built-in digits demo's loader (32 px) against the demo model's step rate.
Then: the lower loader / model ratio (target: >= 2, i.e. the data pipeline stays ahead).

Then images/s per core on ImageNet-like photos (500x375 JPEGs of about 100 KB: gradients, blurred
noise as texture and fine noise, quality 90), RandomResizedCrop 224 (bilinear), hflip 0.5 and
ImageNet normalisation, no colour jitter: timm's own loader (`timm.data.create_dataset` on an
ImageFolder + `create_loader`, no prefetcher) against shardvision's loader on the same files written
as tar shards (the recipe's webdataset source, GuardedSamples and PartitionOrder as the trainer
builds them). Each loader has `num_workers=1`: its one worker process decodes and augments every
image, so its rate is that of one core (the main process only receives batches). Both run in the
same process, alternately, best of --repeats passes. Target: shard / timm >= 1.5.

Last, bytes read per rank: the trainer's order for 2 ranks (global batch = 2 x micro batch, each
rank the contiguous half of every global batch, as accelerate splits it) over the shards written
here and over an ImageNet-sized layout (1,281,167 samples in 1,024 shards, bytes in proportion to
samples); the total size of the distinct shards rank 0 reads from against half of all shard bytes
(target <= 1.05). A rank reads only its samples' files within those shards, so this counts what it
must have locally or fetch, an upper bound on what it reads.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import timm
import timm.data
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from core.config import DataConfig
from core.data import GuardedCollate, GuardedSamples, build_loader
from core.shards import PartitionOrder, ShardIndex, write_shards
from recipes.classification.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationDataConfig,
    build_datasets,
    normalized,
)

PHOTO_SIZE = (500, 375)  # the most common ImageNet photo size


def write_imagefolder(root: str, images: int) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(4):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
    yy, xx = np.mgrid[0:350, 0:400]
    for i in range(images):
        # smooth gradients plus noise: JPEG sizes and decode cost close to real photos
        base = (np.sin(xx / rng.uniform(10, 60)) + np.cos(yy / rng.uniform(10, 60)))[..., None] * rng.uniform(
            40, 100, 3
        )
        pixels = np.clip(base + 128 + rng.normal(0, 12, (350, 400, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "train", f"class{i % 4}", f"{i}.jpg"), quality=90)
    Image.fromarray(pixels).save(os.path.join(root, "val", "class0", "0.jpg"), quality=90)
    for c in range(1, 4):
        Image.fromarray(pixels).save(os.path.join(root, "val", f"class{c}", "0.jpg"), quality=90)


def loader_images_per_sec(cfg: ClassificationDataConfig, batches: int) -> float:
    train, _ = build_datasets(cfg, num_classes=10, seed=0)
    loader = build_loader(
        train,
        batch_size=cfg.micro_batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        collate_fn=torch.utils.data.default_collate,
        pin_memory=False,
        drop_last=True,
    )
    it = iter(loader)
    next(it)  # workers started, first batch ready
    start, seen = time.perf_counter(), 0
    for _, batch in zip(range(batches), it, strict=False):
        seen += len(batch["label"])
    return seen / (time.perf_counter() - start)


def photo_jpeg(rng: np.random.Generator) -> bytes:
    """An ImageNet-like 500x375 photo as a quality-90 JPEG of about 100 KB: smooth gradients, noise
    blurred at a random scale as texture, and fine noise: about 0.56 bytes per pixel, near real
    photos', so JPEG entropy decoding costs about what it does on them."""
    width, height = PHOTO_SIZE
    yy, xx = np.mgrid[0:height, 0:width]
    gradients = (np.sin(xx / rng.uniform(10, 60)) + np.cos(yy / rng.uniform(10, 60)))[..., None]
    field = Image.fromarray(np.clip(rng.normal(0, 40, (height, width)) + 128, 0, 255).astype(np.uint8))
    texture = np.asarray(field.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.6))), dtype=np.float32) - 128
    texture /= texture.std() + 1e-6
    pixels = (
        gradients * rng.uniform(40, 100, 3)
        + 128
        + 60 * texture[..., None] * rng.uniform(0.6, 1.0, 3)
        + rng.normal(0, 8, (height, width, 3))
    )
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_photos(root: str, images: int, per_shard: int) -> tuple[str, str, float]:
    """`images` photos in 4 classes (and 4 for val), written twice with the same bytes: as an
    ImageFolder (root/folder/<split>/class<c>/<i>.jpg) and as tar shards of `per_shard` samples
    (root/shards/<split>-*.tar, jpg + cls, and classes.txt; no _index.json, so each process counts
    the samples by scanning the tar headers). Returns (folder root, shard folder, mean photo bytes)."""
    rng = np.random.default_rng(0)
    folder, shards, sizes = os.path.join(root, "folder"), os.path.join(root, "shards"), []
    classes = [f"class{c}" for c in range(4)]
    for split, count in (("train", images), ("val", 4)):
        photos = [(i % 4, photo_jpeg(rng)) for i in range(count)]
        sizes += [len(data) for _, data in photos]
        for c in classes:
            os.makedirs(os.path.join(folder, split, c), exist_ok=True)
        for i, (label, data) in enumerate(photos):
            with open(os.path.join(folder, split, classes[label], f"{i}.jpg"), "wb") as f:
                f.write(data)
        samples = ((f"{i:06d}", {"jpg": data, "cls": str(label).encode()}) for i, (label, data) in enumerate(photos))
        write_shards(shards, split, samples, per_shard)
    with open(os.path.join(shards, "classes.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    return folder, shards, float(np.mean(sizes))


def per_core_loaders(folder: str, shards: str, batch: int) -> dict[str, tuple[Any, Callable | None]]:
    """timm's loaders and shardvision's shard loaders, one worker each, the same augmentation (the
    recipe's defaults: 224 px, bilinear, scale 0.08-1, ratio 3/4-4/3, hflip 0.5, no colour jitter),
    each with what the training process does to a batch on the device (None: nothing)."""
    cfg = ClassificationDataConfig(source="webdataset", root=shards, micro_batch_size=batch, num_workers=1)
    loaders: dict[str, tuple[Any, Callable | None]] = {}
    for name, prefetcher in (("timm ImageFolder", False), ("timm ImageFolder, its prefetcher", True)):
        timm_loader = timm.data.create_loader(
            timm.data.create_dataset("", root=folder, split="train", is_training=True),
            input_size=(3, cfg.image_size, cfg.image_size),
            batch_size=batch,
            is_training=True,
            use_prefetcher=prefetcher,  # uint8 batches, normalised on the device (here the CPU)
            device=torch.device("cpu"),
            scale=tuple(cfg.scale),
            ratio=tuple(cfg.ratio),
            hflip=cfg.hflip,
            color_jitter=None,  # the recipe's default: data.color_jitter 0
            interpolation=cfg.interpolation,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            num_workers=1,
        )
        loaders[name] = (timm_loader, None)
    counts = ShardIndex(shards, cfg.train_split).counts
    for name, fast in (("shardvision tar shards", False), ("shardvision tar shards, data.fast_decode", True)):
        cfg.fast_decode = fast
        train, _ = build_datasets(cfg, num_classes=4, seed=0)
        shard_loader = build_loader(  # as core/trainer.py builds it, for one rank
            GuardedSamples(train, "train"),
            batch_size=batch,
            shuffle=True,
            num_workers=1,
            collate_fn=GuardedCollate(torch.utils.data.default_collate),
            pin_memory=False,
            drop_last=True,
            order=PartitionOrder(counts, cfg.shard_partitions, batch, cfg.shuffle_window, seed=0),
        )
        # data.fast_decode's uint8 batches are normalised on the device (ClassificationTask.on_device)
        loaders[name] = (shard_loader, partial(normalized, mean=cfg.mean, std=cfg.std) if fast else None)
    return loaders


def epoch_images_per_sec(loader: Any, on_device: Callable | None) -> float:
    """Images/s over one epoch after its first batch (the worker is running by then)."""
    it = iter(loader)
    next(it)
    start, seen = time.perf_counter(), 0
    for batch in it:
        images = batch[0]["image"] if isinstance(batch[0], dict) else batch[0]  # (sample, report) or (x, y)
        if on_device is not None:
            images = on_device(images)
        seen += len(images)
    return seen / (time.perf_counter() - start)


def rank_share(counts: list[int], sizes: list[int], partitions: int, micro_batch: int, ranks: int = 2) -> float:
    """Bytes of the distinct shards rank 0 reads from in one epoch / (all shard bytes / ranks)."""
    order = PartitionOrder(counts, partitions, micro_batch * ranks, window=1000, seed=0)
    indices = np.fromiter(iter(order), dtype=np.int64, count=len(order)).reshape(-1, micro_batch * ranks)
    starts = np.cumsum([0, *counts])
    touched = np.unique(np.searchsorted(starts, indices[:, :micro_batch], side="right") - 1)
    return float(np.sum(np.asarray(sizes)[touched]) / (np.sum(sizes) / ranks))


def model_images_per_sec(model_name: str, image_size: int, batch: int, steps: int) -> float:
    model = timm.create_model(model_name, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch, 3, image_size, image_size), torch.randint(0, 10, (batch,))
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workers", type=int, default=DataConfig().num_workers, help="default: the recipe's data.num_workers default"
    )
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--photos", type=int, default=384, help="500x375 photos for the per-core rows")
    parser.add_argument("--per-shard", type=int, default=20, help="samples per tar shard for the per-core rows")
    parser.add_argument("--repeats", type=int, default=3, help="passes of each per-core loader (best is kept)")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as root:
        write_imagefolder(root, args.images)
        cfg = ClassificationDataConfig(
            source="imagefolder", root=root, image_size=224, micro_batch_size=args.batch, num_workers=args.workers
        )
        rows.append(
            (
                "ImageFolder JPEG, 224 px / resnet18",
                loader_images_per_sec(cfg, args.images // args.batch - 2),
                model_images_per_sec("resnet18", 224, args.batch, 3),
            )
        )
    digits = ClassificationDataConfig(
        source="digits",
        image_size=32,
        crop_pct=1.0,
        hflip=0.0,
        scale=[0.7, 1.0],
        micro_batch_size=64,
        num_workers=args.workers,
    )
    rows.append(
        (
            "digits demo, 32 px / resnet18",
            loader_images_per_sec(digits, 20),
            model_images_per_sec("resnet18", 32, 64, 10),
        )
    )

    print(f"loader with {args.workers} workers vs one process's training steps ({torch.get_num_threads()} threads)")
    print(f"{'pipeline / model':<38} {'loader img/s':>13} {'model img/s':>12} {'ratio':>7}")
    for name, loader, model in rows:
        print(f"{name:<38} {loader:13.1f} {model:12.1f} {loader / model:7.2f}")
    print(f"ratio loader / model (lowest): {min(loader / model for _, loader, model in rows):.2f} (target >= 2)")

    with tempfile.TemporaryDirectory() as root:
        folder, shards, photo_bytes = write_photos(root, args.photos, args.per_shard)
        loaders = per_core_loaders(folder, shards, args.batch)
        rates = {name: 0.0 for name in loaders}
        for _ in range(args.repeats):  # alternately, so that other load on the machine hits both alike
            for name, (loader, on_device) in loaders.items():
                rates[name] = max(rates[name], epoch_images_per_sec(loader, on_device))
        del loaders  # their persistent workers end before the files go
        index = ShardIndex(shards, "train")
        sizes = [os.path.getsize(path) for path in index.paths]
        partitions = DataConfig().shard_partitions
        written = rank_share(index.counts, sizes, partitions, args.batch)
    imagenet = [1251] * 1023 + [1_281_167 - 1251 * 1023]
    at_scale = rank_share(imagenet, imagenet, partitions, args.batch)

    print(
        f"\nper core: {args.photos} photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} ({photo_bytes / 1e3:.0f} KB JPEG), "
        "RandomResizedCrop 224 bilinear + hflip + normalise; num_workers=1, so one worker process = one core; "
        f"best of {args.repeats} epochs"
    )
    print(f"{'loader':<42} {'img/s per core':>15} {'x timm':>7}")
    timm_rate, timm_best = (
        rates["timm ImageFolder"],
        max(rates["timm ImageFolder"], rates["timm ImageFolder, its prefetcher"]),
    )
    for name, rate in rates.items():
        print(f"{name:<42} {rate:15.1f} {rate / timm_rate:7.2f}")
    best = max(rate for name, rate in rates.items() if name.startswith("shardvision"))
    print(
        f"ratio shard loader (fastest) / timm loader: {best / timm_rate:.2f}, / timm's faster loader (the better of "
        f"its two rows): {best / timm_best:.2f} (target >= 1.5)"
    )
    print(
        f"bytes read per rank (2 ranks, micro batch {args.batch}, {partitions} partitions), rank 0's shards / its "
        f"share: {written:.3f}x on the {len(sizes)} shards written here, {at_scale:.3f}x on an ImageNet-sized layout "
        "(target <= 1.05)"
    )


if __name__ == "__main__":
    main()
