"""How close to the disk's own speed does a shardvision checkpoint save and load?

    python benchmarks/checkpoint_bandwidth.py                    # ResNet-50 + AdamW state, ~300 MB
    python benchmarks/checkpoint_bandwidth.py --model vit_base_patch16_224 --dir /scratch

For DDP and for DeepSpeed ZeRO-3, 2 gloo ranks run the real engine (one AdamW step), then save
the checkpoint `--repeats` times with `CheckpointSaver.save` (accelerate's save_state, fsync,
xxh3 manifest, atomic publish) and load it back (verify the manifest, load_state), timing rank 0
from the first barrier to the last. Between saves rank 0 also writes the same number of bytes
raw into the same folder (16 MB chunks, fsynced): the disk's own speed at that moment. Under DDP
rank 0 writes model and optimizer; under ZeRO-3 every rank writes its own shards, so the figure
is the checkpoint's bytes over the wall time.
A plain `torch.save` of the same model + optimizer state (fsynced) is measured beside them.
Then the same state is saved `--repeats` times in the background (checkpoint.async_save): the
stall is how long training waits for each such save (the host copy), against the synchronous
save of the same state in the same run.
Last lines: the lower save bandwidth of the two layouts as a fraction of the disk's (target
>= 0.7), and the higher stall as a fraction of the synchronous save (target <= 0.1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from common import SyntheticTask, add_worker_arguments, launch_ranks, write_report

LAYOUTS = {"DDP": "multi_gpu_ddp.yaml", "ZeRO-3": "deepspeed_zero3.yaml"}


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def disk_write(path: str, nbytes: int) -> float:
    """GB/s of writing `nbytes` sequentially in 16 MB chunks and fsyncing them."""
    chunk = os.urandom(1 << 24)
    start = time.perf_counter()
    with open(path, "wb") as f:
        written = 0
        while written < nbytes:
            f.write(chunk[: min(len(chunk), nbytes - written)])
            written += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return nbytes / seconds / 1e9


def worker(args: argparse.Namespace) -> None:
    """One rank: one training step, then timed saves and loads of the engine's checkpoints."""
    import torch

    from core.checkpoint.files import verify
    from core.config import TrainConfig
    from core.trainer import Trainer

    cfg = TrainConfig(output_dir=os.path.join(args.out, "run"))
    cfg.model.name = args.model
    cfg.data.micro_batch_size, cfg.data.num_workers = 2, 0
    cfg.loop.max_steps = 1
    cfg.checkpoint.keep_last = 1
    cfg.checkpoint.async_save = False  # the bandwidth of the write itself first; the background save below
    cfg.logging.progress_bar, cfg.logging.trackers = False, []
    trainer = Trainer(cfg, SyntheticTask(cfg, args.model, 64, 4 * int(os.environ["WORLD_SIZE"]), num_classes=1000))
    trainer.train_one_epoch(0)  # materialise AdamW's two moments
    acc, saves, loads, disk, nbytes = trainer.accelerator, [], [], [], 0
    for _ in range(args.repeats + 1):  # the first save is a warm-up that sizes the disk measurement
        # The previous checkpoint's background deletion overlaps training in a real run; here
        # it would overlap the measurements, so it is finished first.
        trainer.checkpoints.wait_for_pruning()
        if acc.is_main_process and nbytes:  # the disk's own speed: same bytes, same folder, same moment
            disk.append(disk_write(os.path.join(trainer.checkpoints.root, "raw.bin"), nbytes))
        trainer.state.global_step += 1
        acc.wait_for_everyone()
        start = time.perf_counter()
        path = trainer.checkpoints.save(trainer.state).path
        saves.append(time.perf_counter() - start)
        nbytes = folder_bytes(path)
        acc.wait_for_everyone()
        start = time.perf_counter()
        if acc.is_main_process:
            verify(path)
        acc.load_state(path)
        acc.wait_for_everyone()
        loads.append(time.perf_counter() - start)

    stalls, held_mb = [], 0.0
    trainer.checkpoints.async_save = True
    for _ in range(args.repeats):
        trainer.checkpoints.wait_for_pruning()
        trainer.state.global_step += 1
        acc.wait_for_everyone()
        saved = trainer.checkpoints.save(trainer.state)
        stalls.append(saved.stall_s)
        held_mb = saved.held_mb
        trainer.checkpoints.wait()  # published before the next one (a run would train meanwhile)
        acc.wait_for_everyone()

    plain = []
    if acc.is_main_process and trainer.strategy == "ddp":  # the same state, one torch.save, as by hand
        model, optimizer = acc.unwrap_model(trainer.model), trainer.optimizer
        for _ in range(args.repeats):
            target = os.path.join(args.out, "plain.pt")
            start = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, target)
            fsync_file(target)
            plain.append(os.path.getsize(target) / (time.perf_counter() - start) / 1e9)
            os.remove(target)
    write_report(
        args.out,
        acc.process_index,
        {
            "bytes": nbytes,
            "save_s": saves[1:],
            "load_s": loads[1:],
            "disk_gbs": disk,
            "torch_save_gbs": plain,
            "stall_s": stalls,
            "held_mb": held_mb,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    add_worker_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    rows = {}
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        for name, config in LAYOUTS.items():
            out = tempfile.mkdtemp(dir=root)
            report = launch_ranks(
                config, args.nproc, __file__, ["--model", args.model, "--repeats", str(args.repeats)], out
            )[0]
            shutil.rmtree(out)
            nbytes = report["bytes"]
            rows[name] = {
                "MB": nbytes / 1e6,
                "disk": statistics.median(report["disk_gbs"]),
                "save": statistics.median(nbytes / s for s in report["save_s"]) / 1e9,
                "load": statistics.median(nbytes / s for s in report["load_s"]) / 1e9,
                "sync_s": statistics.median(report["save_s"]),
                "stall_s": statistics.median(report["stall_s"]),
                "held_mb": report["held_mb"],
            }
            if report["torch_save_gbs"]:
                rows["plain torch.save"] = {
                    "MB": nbytes / 1e6,
                    "disk": rows[name]["disk"],
                    "save": statistics.median(report["torch_save_gbs"]),
                    "load": float("nan"),
                }
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"{args.model} + AdamW state, {args.nproc} ranks, {args.repeats} repeats, medians (loads may "
        "come from the page cache)"
    )
    print(f"{'layout':<17} {'MB':>6} {'disk GB/s':>10} {'save GB/s':>10} {'x disk':>7} {'load GB/s':>10}")
    for name, row in rows.items():
        print(
            f"{name:<17} {row['MB']:6.0f} {row['disk']:10.2f} {row['save']:10.2f} "
            f"{row['save'] / row['disk']:7.2f} {row['load']:10.2f}"
        )
    ratio = min(rows[name]["save"] / rows[name]["disk"] for name in LAYOUTS)
    print(f"ratio shardvision save / disk write (lower of {', '.join(LAYOUTS)}): {ratio:.2f} (target >= 0.7)")
    print(f"\n{'background save':<17} {'sync s':>7} {'stall s':>8} {'x sync':>7} {'held MB (rank 0)':>17}")
    for name in LAYOUTS:
        row = rows[name]
        print(
            f"{name:<17} {row['sync_s']:7.3f} {row['stall_s']:8.3f} {row['stall_s'] / row['sync_s']:7.2f} "
            f"{row['held_mb']:17.0f}"
        )
    stall = max(rows[name]["stall_s"] / rows[name]["sync_s"] for name in LAYOUTS)
    print(f"ratio training stall / synchronous save (higher of {', '.join(LAYOUTS)}): {stall:.2f} (target <= 0.1)")


if __name__ == "__main__":
    main()
