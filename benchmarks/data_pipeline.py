"""Is a run bound by its data pipeline or by its model?

    python benchmarks/data_pipeline.py                  # default workers, 224 px ImageFolder + the digits demo
    python benchmarks/data_pipeline.py --workers 4 --images 512

Two rows. (1) The classification recipe's loader on an ImageFolder of real JPEG files written
here (ImageNet-like 400x350 photos-sized images, JPEG decode + timm's training transforms at
224 px, `data.num_workers` processes) against one process's training step rate of ResNet-18 at
224 px. (2) The built-in digits demo's loader (32 px) against the demo model's step rate.
Last line: the lower loader / model ratio (target: >= 2, i.e. the data pipeline stays ahead).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

from core.config import DataConfig
from core.data import build_loader
from recipes.classification.data import ClassificationDataConfig, build_datasets


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


if __name__ == "__main__":
    main()
