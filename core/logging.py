"""What a run reports: `<output_dir>/metrics.jsonl`, accelerate's trackers (TensorBoard), a tqdm
progress bar and a throughput meter. Only the main process writes or prints."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class RunLogger:
    """One JSON object per line in metrics.jsonl (step, epoch, split and the values), mirrored to
    the trackers as `<split>/<name>`."""

    def __init__(self, accelerator: Accelerator, output_dir: str, config: dict, use_trackers: bool):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.use_trackers = use_trackers
        if use_trackers:
            accelerator.init_trackers("shardvision", config=_flat(config))

    def log(self, split: str, step: int, epoch: float, values: dict[str, float]) -> None:
        if not self.accelerator.is_main_process:
            return
        row = {"step": step, "epoch": round(epoch, 4), "split": split, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.use_trackers:
            self.accelerator.log({f"{split}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}, step=step)

    def close(self) -> None:
        if self.use_trackers:
            self.accelerator.end_training()


class Throughput:
    """Images per second over a window, counted on this rank and scaled by the world size."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.images, self.start = 0, time.perf_counter()

    def add(self, images: int) -> None:
        self.images += images

    def images_per_sec(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.images * self.world_size / elapsed if elapsed > 0 else 0.0


def progress_bar(accelerator: Accelerator, enabled: bool, total: int, initial: int, desc: str) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not (enabled and accelerator.is_main_process),
        dynamic_ncols=True,
        mininterval=1.0,
        leave=False,
    )


def memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
