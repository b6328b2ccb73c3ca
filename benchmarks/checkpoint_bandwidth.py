"""How close to the disk's own speed does a shardvision checkpoint save and load?

    python benchmarks/checkpoint_bandwidth.py                    # ResNet-50 + AdamW state, ~300 MB
    python benchmarks/checkpoint_bandwidth.py --model vit_base_patch16_224 --dir /scratch

One process (the DDP layout: rank 0 writes model and optimizer). In the same run and folder it
measures: the disk's sequential write speed (the same number of bytes, fsynced), a plain
`torch.save` of model + optimizer state (fsynced), and `CheckpointManager.save` (accelerate's
save_state, fsync, CRC-32 manifest, atomic publish), then the matching loads. Last line: save
bandwidth as a fraction of the disk's (target: >= 0.7).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import timm
import torch
from accelerate import Accelerator

from core.checkpoint import CheckpointManager, TrainerState, verify


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def disk_write(path: str, nbytes: int) -> float:
    chunk = os.urandom(1 << 24)
    start = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            f.write(chunk[: min(len(chunk), nbytes - written)])
            written += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return nbytes / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    model = timm.create_model(args.model, num_classes=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()  # materialise AdamW's two moments

    root = tempfile.mkdtemp(dir=args.dir)
    manager = CheckpointManager(accelerator, os.path.join(root, "checkpoints"), keep_last=1)
    rows: dict[str, list[float]] = {k: [] for k in ("disk write", "torch.save", "shardvision save", "torch.load", "shardvision load")}
    nbytes = 0
    try:
        for step in range(1, args.repeats + 1):
            start = time.perf_counter()
            path = manager.save(TrainerState(global_step=step))
            save_s = time.perf_counter() - start
            nbytes = folder_bytes(path)
            rows["shardvision save"].append(nbytes / save_s)

            plain = os.path.join(root, "plain.pt")
            start = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, plain)
            fsync_file(plain)
            rows["torch.save"].append(os.path.getsize(plain) / (time.perf_counter() - start))

            rows["disk write"].append(disk_write(os.path.join(root, "raw.bin"), nbytes))

            start = time.perf_counter()
            torch.load(plain, map_location="cpu", weights_only=True)
            rows["torch.load"].append(os.path.getsize(plain) / (time.perf_counter() - start))
            start = time.perf_counter()
            verify(path)
            accelerator.load_state(path)
            rows["shardvision load"].append(nbytes / (time.perf_counter() - start))
            os.remove(plain)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"{args.model} + AdamW state: {nbytes / 1e6:.0f} MB per checkpoint, {args.repeats} repeats, medians (loads may come from the page cache)")
    print(f"{'operation':<18} {'GB/s':>7}")
    for name, values in rows.items():
        print(f"{name:<18} {statistics.median(values) / 1e9:7.2f}")
    ratio = statistics.median(rows["shardvision save"]) / statistics.median(rows["disk write"])
    print(f"ratio shardvision save / disk write: {ratio:.2f} (target >= 0.7)")


if __name__ == "__main__":
    main()
