"""Does the shardvision trainer cost anything over a minimal hand-written accelerate loop?

    python benchmarks/loop_overhead.py                 # ResNet-18, 64 px, batch 32, in memory
    python benchmarks/loop_overhead.py --steps 20 --repeats 3
    python benchmarks/loop_overhead.py --kernel foreach   # both loops on AdamW's foreach kernels

Both loops train the same model on the same in-memory batches with AdamW and the same update
kernel (default: fused, shardvision's default), one process, in fp32 and in bf16 autocast. They
alternate in A B B A order and the median images/s of each is compared, so load changes and
warm-up effects on a noisy machine hit both alike. Last line: the lower of the two ratios
(target: >= 0.97).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from common import OPTIMIZER_KERNELS, SyntheticTask, create_timm_model, synthetic_samples
from core.config import TrainConfig
from core.distributed import reset_accelerator_state
from core.trainer import Trainer


def shardvision_images_per_sec(samples, args, precision: str) -> float:
    reset_accelerator_state()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(output_dir=out)
        cfg.model.name = args.model
        cfg.data.micro_batch_size, cfg.data.num_workers = args.batch, 0
        cfg.loop.precision, cfg.loop.epochs = precision, 2
        cfg.optim = dataclasses.replace(cfg.optim, **OPTIMIZER_KERNELS[args.kernel])
        cfg.logging.progress_bar, cfg.logging.trackers, cfg.logging.every_steps = False, [], 10**9
        trainer = Trainer(cfg, SyntheticTask(cfg, args.model, args.image_size, len(samples), samples=samples))
        trainer.train_one_epoch(0)  # warm-up epoch
        start = time.perf_counter()
        trainer.train_one_epoch(1)
        return len(samples) / (time.perf_counter() - start)


def handwritten_images_per_sec(samples, args, precision: str) -> float:
    reset_accelerator_state()
    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    torch.manual_seed(0)
    model = create_timm_model(args.model, args.image_size, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, **OPTIMIZER_KERNELS[args.kernel])
    loader = torch.utils.data.DataLoader(samples, batch_size=args.batch, shuffle=True, drop_last=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()

    def epoch() -> None:
        for batch in loader:
            loss = F.cross_entropy(model(batch["image"]), batch["label"])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    epoch()  # warm-up epoch
    start = time.perf_counter()
    epoch()
    return len(samples) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument(
        "--kernel", choices=tuple(OPTIMIZER_KERNELS), default="fused", help="AdamW's update kernel, in both loops"
    )
    args = parser.parse_args()
    samples = synthetic_samples(args.batch * args.steps, args.image_size, num_classes=10)

    print(
        f"{args.model}, {args.image_size} px, batch {args.batch}, {args.steps} steps per epoch, "
        f"{args.kernel} AdamW, {args.repeats} alternating (ABBA) repeats, {torch.get_num_threads()} threads"
    )
    print(f"{'precision':<10} {'hand-written img/s':>19} {'shardvision img/s':>18} {'ratio':>7}")
    ratios = []
    for precision in ("no", "bf16"):
        hand, ours = [], []
        for repeat in range(args.repeats):
            order = (hand, ours) if repeat % 2 == 0 else (ours, hand)
            for results in order:
                measure = handwritten_images_per_sec if results is hand else shardvision_images_per_sec
                results.append(measure(samples, args, precision))
        ratio = statistics.median(ours) / statistics.median(hand)
        ratios.append(ratio)
        print(
            f"{'fp32' if precision == 'no' else precision:<10} {statistics.median(hand):19.1f} "
            f"{statistics.median(ours):18.1f} {ratio:7.3f}"
        )
    print(f"ratio shardvision / hand-written (lower of fp32, bf16): {min(ratios):.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()
