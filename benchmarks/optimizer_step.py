"""What does the optimizer's update kernel cost per step?

    python benchmarks/optimizer_step.py                     # AdamW on ResNet-18, ResNet-50, ViT-S/16
    python benchmarks/optimizer_step.py --optimizer sgd --device cuda

The optimizer is built by the engine (core.optim.build_optimizer, so with its two parameter
groups) three times per model: torch's per-tensor loop (`--optim.fused false --optim.foreach
false`), multi-tensor kernels (`--optim.foreach true`) and one fused kernel (`--optim.fused true`,
the default where the optimizer has one). Each times `step()` on the same gradients, in
alternating rounds so machine noise hits all three alike; the median per kernel is reported.
Last line: the smallest speed-up of the fused kernel over the per-tensor loop across the models.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import OPTIMIZER_KERNELS, create_timm_model
from core.config import OptimConfig
from core.optim import build_optimizer


def step_ms(optimizer: torch.optim.Optimizer, steps: int, device: torch.device) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vit_small_patch16_224"])
    parser.add_argument(
        "--optimizer",
        default="adamw",
        help="a timm optimizer name with a fused kernel (adamw, adam, sgd, momentum, adagrad)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)

    print(
        f"{args.optimizer} step time in ms on {device} ({torch.get_num_threads()} threads), median of "
        f"{args.rounds} rounds of {args.steps} steps"
    )
    print(f"{'model':<24} {'parameters':>11} " + " ".join(f"{k:>11}" for k in OPTIMIZER_KERNELS) + f" {'speed-up':>9}")
    speedups = []
    for name in args.models:
        model = create_timm_model(name, 224, num_classes=1000).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        optimizers = {
            kernel: build_optimizer(model, OptimConfig(name=args.optimizer, **flags))
            for kernel, flags in OPTIMIZER_KERNELS.items()
        }
        for optimizer in optimizers.values():  # warm-up: state allocated, kernels loaded
            step_ms(optimizer, 2, device)
        times: dict[str, list[float]] = {k: [] for k in OPTIMIZER_KERNELS}
        for round_ in range(args.rounds):
            order = list(OPTIMIZER_KERNELS) if round_ % 2 == 0 else list(reversed(OPTIMIZER_KERNELS))
            for kernel in order:
                times[kernel].append(step_ms(optimizers[kernel], args.steps, device))
        medians = {k: statistics.median(v) for k, v in times.items()}
        speedups.append(medians["per-tensor"] / medians["fused"])
        parameters = sum(p.numel() for p in model.parameters())
        print(
            f"{name:<24} {parameters:>11,} "
            + " ".join(f"{medians[k]:>11.2f}" for k in OPTIMIZER_KERNELS)
            + f" {speedups[-1]:>8.2f}x"
        )
    print(f"speed-up of the fused step over the per-tensor loop (smallest over models): {min(speedups):.2f}x")


if __name__ == "__main__":
    main()
