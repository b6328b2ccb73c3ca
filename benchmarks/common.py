"""What several benchmarks share: a synthetic in-memory task for the real engine, the optimizer
update kernels they compare, and a launcher that runs a benchmark's worker function on N gloo
ranks with one of the repo's accelerate configs."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from core.task import Metrics, Task

REPO = Path(__file__).resolve().parents[1]

# Optimizer update kernels by name, as flags that both torch's optimizers and OptimConfig take.
OPTIMIZER_KERNELS = {
    "per-tensor": dict(fused=False, foreach=False),
    "foreach": dict(fused=False, foreach=True),
    "fused": dict(fused=True),
}


def create_timm_model(name: str, image_size: int, num_classes: int) -> torch.nn.Module:
    import timm

    try:  # ViTs fix their input size when built; convolutional nets take any size
        return timm.create_model(name, num_classes=num_classes, img_size=image_size)
    except TypeError:
        return timm.create_model(name, num_classes=num_classes)


def synthetic_samples(n: int, image_size: int, num_classes: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(3, image_size, image_size, generator=g), "label": i % num_classes} for i in range(n)]


class SyntheticTask(Task):
    """A timm classifier on fixed random images held in memory: the model and the engine are
    measured, not the data."""

    def __init__(
        self,
        cfg,
        model_name: str,
        image_size: int,
        num_samples: int,
        num_classes: int = 10,
        samples: list | None = None,
    ):
        super().__init__(cfg)
        self.model_name, self.num_classes, self.image_size = model_name, num_classes, image_size
        self.samples = samples if samples is not None else synthetic_samples(num_samples, image_size, num_classes)

    def build_model(self):
        return create_timm_model(self.model_name, self.image_size, self.num_classes)

    def build_datasets(self):
        return self.samples, self.samples[: min(32, len(self.samples))]

    def training_step(self, model, batch):
        return F.cross_entropy(model(batch["image"]).float(), batch["label"])

    def evaluation_step(self, model, batch):
        return {"loss": F.cross_entropy(model(batch["image"]).float(), batch["label"], reduction="none")}

    def build_metrics(self) -> Metrics:
        raise NotImplementedError  # benchmarks time training only


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden flags launch_ranks (and a benchmark's own subprocesses) start a worker with."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)


def launch_ranks(accelerate_config: str, nproc: int, script: str, args: list[str], out: str) -> list[dict]:
    """`accelerate launch` `script --worker --out OUT ARGS` on `nproc` gloo ranks; return the JSON
    report each rank wrote to OUT/rank<N>.json."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "accelerate_configs" / accelerate_config),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(free_port()),
        script,
        "--worker",
        "--out",
        out,
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    reports = []
    for rank in range(nproc):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            reports.append(json.load(f))
    return reports


def write_report(out: str, rank: int, report: dict) -> None:
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
