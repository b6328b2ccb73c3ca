"""What do the engine's speed switches buy on this machine?

    python benchmarks/engine_switches.py                          # ResNet-50 and ViT-S/16 at 128 px, CPU
    python benchmarks/engine_switches.py --image-size 224 --batch 64   # on a GPU

For each model, the real trainer (one process, in-memory data, AdamW, bf16 autocast unless
--precision no) runs a warm-up epoch (where torch.compile compiles) and a timed epoch with each
switch alone: `model.channels_last`, `model.grad_checkpointing`, `model.compile`. Each setting
runs in its own process, so the peak memory of one cannot hide in another's. Reported per setting:
images/s and the peak memory the training steps added (resident memory on CPU, allocated memory on
GPU) as ratios to the baseline measured in the same run. Last line: the best speed-up found.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import REPO, SyntheticTask, add_worker_arguments

SWITCHES = ("baseline", "channels_last", "grad_checkpointing", "compile")


def worker(args: argparse.Namespace) -> None:
    import torch

    from core.config import TrainConfig
    from core.run_log import memory_mb
    from core.trainer import Trainer

    cfg = TrainConfig(output_dir=args.out)
    cfg.model.name = args.model
    if args.switch != "baseline":
        setattr(cfg.model, args.switch, True)
    cfg.data.micro_batch_size, cfg.data.num_workers = args.batch, 0
    cfg.loop.precision, cfg.loop.epochs = args.precision, 2
    cfg.checkpoint.at_epoch_end = False
    cfg.logging.progress_bar, cfg.logging.trackers, cfg.logging.every_steps = False, [], 10**9
    trainer = Trainer(cfg, SyntheticTask(cfg, args.model, args.image_size, args.batch * args.steps))
    device = trainer.accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = 0 if device.type == "cuda" else memory_mb(device)
    trainer.train_one_epoch(0)  # warm-up (and compile)
    start = time.perf_counter()
    trainer.train_one_epoch(1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    report = {"images_per_sec": args.batch * args.steps / seconds, "memory_bytes": (memory_mb(device) - before) * 2**20}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f)


def measure(args: argparse.Namespace, model: str, switch: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            "--out",
            out,
            "--model",
            model,
            "--switch",
            switch,
            "--image-size",
            str(args.image_size),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--precision",
            args.precision,
        ]
        proc = subprocess.run(
            cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True
        )
        if proc.returncode:
            sys.exit(f"{model} with {switch} failed:\n{proc.stderr[-3000:]}")
        with open(os.path.join(out, "report.json")) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_small_patch16_224"])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed epoch")
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16"])
    parser.add_argument("--switch", choices=SWITCHES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    add_worker_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    precision = "fp32" if args.precision == "no" else f"{args.precision} autocast"
    print(f"{args.image_size} px, batch {args.batch}, {args.steps} timed steps, {precision}, one process")
    print(f"{'model':<22} {'switch':<19} {'img/s':>8} {'x base':>7} {'step memory MB':>15} {'x base':>7}")
    best = (0.0, "")
    for model in args.models:
        base = measure(args, model, "baseline")
        for switch in SWITCHES:
            row = base if switch == "baseline" else measure(args, model, switch)
            speed = row["images_per_sec"] / base["images_per_sec"]
            memory = row["memory_bytes"] / max(1, base["memory_bytes"])
            print(
                f"{model:<22} {switch:<19} {row['images_per_sec']:8.1f} {speed:7.2f} "
                f"{row['memory_bytes'] / 2**20:15.0f} {memory:7.2f}"
            )
            if switch != "baseline" and speed > best[0]:
                best = (speed, f"{switch} on {model}")
    print(f"best speed-up over the baseline: {best[0]:.2f}x ({best[1]})")


if __name__ == "__main__":
    main()
