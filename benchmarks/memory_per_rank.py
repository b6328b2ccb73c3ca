"""How much training state does each rank hold under DDP, ZeRO-1, ZeRO-2 and ZeRO-3?

    python benchmarks/memory_per_rank.py                       # ViT-B/16 (86M parameters), 2 CPU ranks
    python benchmarks/memory_per_rank.py --model vit_large_patch16_224 --nproc 4

For each strategy it launches the real recipe engine on 2 gloo ranks (accelerate launch with the
repo's configs), takes one AdamW step, and each rank reports the bytes of every live tensor in
the process (parameters, gradients, optimizer state, DeepSpeed's partitions and buckets, each
storage counted once) and its peak resident memory. Last line: ZeRO-3's tensor bytes per rank
as a fraction of DDP's (target: <= 0.55).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {"DDP": "multi_gpu_ddp.yaml", "ZeRO-1": "deepspeed_zero1.yaml", "ZeRO-2": "deepspeed_zero2.yaml", "ZeRO-3": "deepspeed_zero3.yaml"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_tensor_bytes() -> int:
    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
        except Exception:  # objects that only pretend to be tensors
            continue
        if storage.data_ptr() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def worker(args: argparse.Namespace) -> None:
    """One rank: build the engine, take one optimizer step, report."""
    import torch
    import torch.nn.functional as F

    from core.config import TrainConfig
    from core.task import Task
    from core.trainer import Trainer

    class OneBatch(Task):
        def build_model(self):
            import timm

            return timm.create_model(args.model, num_classes=1000, img_size=args.image_size)

        def build_datasets(self):
            samples = [{"image": torch.randn(3, args.image_size, args.image_size), "label": 0} for _ in range(4 * int(os.environ["WORLD_SIZE"]))]
            return samples, samples

        def training_step(self, model, batch):
            return F.cross_entropy(model(batch["image"]), batch["label"])

    cfg = TrainConfig(output_dir=args.out)
    cfg.data.micro_batch_size, cfg.data.num_workers = 2, 0
    cfg.loop.max_steps = 1
    cfg.logging.progress_bar, cfg.logging.tensorboard = False, False
    trainer = Trainer(cfg, OneBatch(cfg))
    trainer.train_one_epoch(0)
    gc.collect()
    report = {
        "rank": trainer.accelerator.process_index,
        "parameters": sum(p.numel() for p in trainer.accelerator.unwrap_model(trainer.model).parameters()),
        "tensor_bytes": live_tensor_bytes(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    with open(os.path.join(args.out, f"memory_rank{report['rank']}.json"), "w") as f:
        json.dump(report, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--image-size", type=int, default=32, help="small inputs: the state, not the activations, is measured")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    results = {}
    for name, config in STRATEGIES.items():
        with tempfile.TemporaryDirectory() as out:
            cmd = [
                sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / config),
                "--num_processes", str(args.nproc), "--main_process_port", str(free_port()),
                __file__, "--worker", "--out", out, "--model", args.model, "--image-size", str(args.image_size),
            ]
            env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            reports = [json.load(open(os.path.join(out, f"memory_rank{r}.json"))) for r in range(args.nproc)]
        results[name] = reports

    params = results["DDP"][0]["parameters"]
    print(f"{args.model}: {params / 1e6:.1f}M parameters, AdamW, {args.nproc} ranks; per rank, max over ranks")
    print(f"{'strategy':<8} {'tensor MB':>10} {'x DDP':>6} {'peak RSS MB':>12}")
    ddp = max(r["tensor_bytes"] for r in results["DDP"])
    for name, reports in results.items():
        tensors = max(r["tensor_bytes"] for r in reports)
        rss = max(r["peak_rss_bytes"] for r in reports)
        print(f"{name:<8} {tensors / 1e6:10.0f} {tensors / ddp:6.2f} {rss / 1e6:12.0f}")
    ratio = max(r["tensor_bytes"] for r in results["ZeRO-3"]) / ddp
    print(f"ratio ZeRO-3 / DDP tensor bytes per rank: {ratio:.2f} (target <= 0.55)")


if __name__ == "__main__":
    main()
