"""Images/s and model FLOPs utilisation of ViT-B/16 and ResNet-50 under bf16, on one GPU.

    python benchmarks/gpu_throughput.py                                   # both models, 224 px, batch 128
    python benchmarks/gpu_throughput.py --models resnet50 --batch 256 --compile
    python benchmarks/gpu_throughput.py --cpu --image-size 64 --batch 8 --steps 3   # smoke run without a GPU

Two loops on the same model and the same in-memory images (a DataLoader with the same workers
and pinned memory, non-blocking copies), AdamW, bf16 autocast, channels_last, one warm-up epoch
and one timed epoch each, alternating A B B A: (A) the steps timm's own train.py takes for each
batch (`timm.create_model`, `create_optimizer_v2`, `torch.autocast(bfloat16)`, `loss.backward()`,
`optimizer.step()`, `zero_grad(set_to_none=True)`), written out here because timm's train.py
ships in timm's repository, not in its wheel; (B) the shardvision trainer with the same settings.
Model FLOPs per image come from torch's FlopCounterMode (3x the forward); MFU is measured against
the device's dense bf16 peak (core/run_log.py knows H100, H200, A100, L40S, L4; else --peak-tflops).
Last line: the lower shardvision / timm-loop images/s ratio of the models.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch.utils.data import DataLoader

from common import SyntheticTask, create_timm_model, synthetic_samples
from core.distributed import reset_accelerator_state
from core.run_log import peak_tflops, training_flops_per_sample


def timm_loop_images_per_sec(args: argparse.Namespace, name: str, device: torch.device, samples: list) -> float:
    torch.manual_seed(0)
    model = create_timm_model(name, args.image_size, 1000).to(device, memory_format=torch.channels_last).train()
    if args.compile:
        model = torch.compile(model)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    loader = DataLoader(
        samples,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )

    def epoch() -> None:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            labels = batch["label"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)

    epoch()  # warm-up (and compile)
    start = time.perf_counter()
    epoch()
    return len(samples) / (time.perf_counter() - start)


def shardvision_images_per_sec(args: argparse.Namespace, name: str, samples: list) -> tuple[float, float]:
    """(images/s, model FLOPs per training image) of the trainer on the same model and data."""
    from core.config import TrainConfig
    from core.trainer import Trainer

    reset_accelerator_state()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(output_dir=out)
        cfg.model.name, cfg.model.channels_last, cfg.model.compile = name, True, args.compile
        cfg.data.micro_batch_size, cfg.data.num_workers = args.batch, args.workers
        cfg.loop.precision, cfg.loop.epochs = "bf16", 2
        cfg.logging.progress_bar, cfg.logging.trackers, cfg.logging.every_steps = False, [], 10**9
        cfg.checkpoint.at_epoch_end = False
        task = SyntheticTask(cfg, name, args.image_size, len(samples), num_classes=1000, samples=samples)
        trainer = Trainer(cfg, task)
        trainer.train_one_epoch(0)  # warm-up (and compile)
        synchronize(trainer.accelerator.device)
        start = time.perf_counter()
        trainer.train_one_epoch(1)
        synchronize(trainer.accelerator.device)
        return len(samples) / (time.perf_counter() - start), trainer.flops_per_sample


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "resnet50"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--steps", type=int, default=20, help="optimizer steps per epoch (one warm-up epoch, one timed)"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of both loops")
    parser.add_argument("--repeats", type=int, default=2, help="A B B A rounds")
    parser.add_argument("--compile", action="store_true", help="torch.compile both loops")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="per-device peak for MFU when the GPU is not known"
    )
    parser.add_argument(
        "--cpu", action="store_true", help="run on CPU (a smoke run: CPU figures say nothing about GPUs)"
    )
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no GPU here: this benchmark measures GPU throughput (use --cpu for a smoke run)")
    device = torch.device("cpu" if args.cpu else "cuda")
    peak = peak_tflops(device, args.peak_tflops)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{where}, {args.image_size} px, batch {args.batch}, bf16 autocast, channels_last, AdamW"
        f"{', torch.compile' if args.compile else ''}; peak {peak or 'unknown'} TFLOP/s"
    )
    print(f"{'model':<22} {'loop':<12} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'ratio':>6}")
    ratios = []
    for name in args.models:
        timm_runs, ours_runs, flops = [], [], None
        samples = synthetic_samples(args.batch * args.steps, args.image_size, 1000)
        for repeat in range(args.repeats):
            for which in ("timm", "ours") if repeat % 2 == 0 else ("ours", "timm"):
                if which == "timm":
                    timm_runs.append(timm_loop_images_per_sec(args, name, device, samples))
                else:
                    rate, flops = shardvision_images_per_sec(args, name, samples)
                    ours_runs.append(rate)
        if flops is None:  # the trainer counts them unless logging.count_flops is off
            model = create_timm_model(name, args.image_size, 1000)
            image = torch.randn(1, 3, args.image_size, args.image_size)
            flops = training_flops_per_sample(model, lambda model=model, image=image: model(image), 1)
        ratio = statistics.median(ours_runs) / statistics.median(timm_runs)
        ratios.append(ratio)
        for loop, runs in (("timm loop", timm_runs), ("shardvision", ours_runs)):
            rate = statistics.median(runs)
            tflops = rate * flops / 1e12
            mfu = f"{tflops / peak:6.1%}" if peak else "     -"
            print(
                f"{name:<22} {loop:<12} {rate:9.1f} {tflops:8.2f} {mfu} {ratio if loop == 'shardvision' else 1.0:6.3f}"
            )
    print(f"ratio shardvision / timm loop images/s (lower of {', '.join(args.models)}): {min(ratios):.3f}")


if __name__ == "__main__":
    main()
