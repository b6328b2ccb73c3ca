"""What a run reports: `<output_dir>/metrics.jsonl`, accelerate's trackers (TensorBoard), tqdm
progress bars (the run and the epoch) and a throughput meter (images/s, model TFLOP/s and, where the device's peak is
known, model FLOPs utilisation). Only the main process writes or prints."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from core.config import LoggingConfig
from core.config_parsing import flat_dict
from core.distributed import reduce_mean

TRACKER_IDS = "trackers.json"


def _tracker_params(config: dict) -> dict[str, Any]:
    """The config as trackers take it: dotted keys, scalar values (lists and None as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_dict(config).items()}


class RunLogger:
    """One JSON object per line in metrics.jsonl (step, epoch, split and the values), mirrored to
    the trackers as `<split>/<name>`. Splits: `train`, `eval`, `final` (the exported weights'
    metrics), and `run` and `checkpoint` (the run's shape once per launch, and each save's cost:
    not mirrored).

    The trackers are accelerate's (TensorBoard, MLflow, W&B), started on rank 0. A run that
    resumes continues the same tracker run: the MLflow run id and the W&B id are kept in
    `<output_dir>/trackers.json`, and the config is sent only when the tracker run is new (MLflow
    refuses a parameter whose value changes, and a resumed launch's --resume does)."""

    def __init__(self, accelerator: Accelerator, output_dir: str, config: dict, settings: LoggingConfig):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.use_trackers = bool(settings.trackers)
        if not self.use_trackers:
            return
        ids_path = os.path.join(output_dir, TRACKER_IDS)
        new = not os.path.isfile(ids_path)  # the first launch with trackers: the config goes to them
        ids: dict[str, str] = {}
        if not new:
            with open(ids_path) as f:
                ids = json.load(f)
        kwargs: dict[str, dict] = {}
        name = os.path.basename(os.path.abspath(output_dir))
        if "mlflow" in settings.trackers and accelerator.is_main_process:
            import mlflow

            store = settings.mlflow_tracking_uri or f"sqlite:///{os.path.abspath(output_dir)}/mlflow.db"
            mlflow.set_tracking_uri(store)
            artifacts = os.path.join(os.path.abspath(output_dir), "mlruns")
            kwargs["mlflow"] = {"run_id": ids.get("mlflow"), "run_name": name, "logging_dir": artifacts}
        if "wandb" in settings.trackers:
            wandb_id = ids.get("wandb") or uuid.uuid4().hex[:8]
            ids["wandb"] = wandb_id
            kwargs["wandb"] = {
                "mode": settings.wandb_mode,
                "dir": output_dir,
                "id": wandb_id,
                "resume": "allow",
                "name": name,
            }
        params = _tracker_params(config) if new else None
        accelerator.init_trackers(settings.project, config=params, init_kwargs=kwargs)
        if accelerator.is_main_process:
            if "mlflow" in settings.trackers:
                ids["mlflow"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
            with open(ids_path, "w") as f:
                json.dump(ids, f)

    def log(self, split: str, step: int, epoch: float, values: dict[str, Any], trackers: bool = True) -> None:
        if not self.accelerator.is_main_process:
            return
        row = {"step": step, "epoch": round(epoch, 4), "split": split, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if trackers and self.use_trackers:
            self.accelerator.log(
                {f"{split}/{k}": v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)},
                step=step,
            )

    def close(self) -> None:
        """Finish the trackers and tear down the process group (accelerate's end_training)."""
        self.accelerator.end_training()


class TrainMeter:
    """The training loss, gradient norm and throughput between two log lines, and when the next
    line is due. The loss stays summed on the device (no host sync per step); a window whose
    optimizer step was dropped (non-finite loss, loop.nonfinite_loss: skip) is left out."""

    def __init__(self, accelerator: Accelerator, every_steps: int):
        self.accelerator, self.every_steps = accelerator, every_steps
        self.restart()

    def restart(self) -> None:
        """Forget everything: each epoch is measured on its own."""
        device = self.accelerator.device
        self.window_loss = torch.zeros((), device=device)  # this accumulation window's
        self._window_batches = 0
        self._loss = torch.zeros((), device=device)  # applied windows since the last line
        self._batches = 0
        self._grad_norm: torch.Tensor | None = None  # the last one computed
        self._images, self._start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.window_loss += loss.detach().float()
        self._window_batches += 1
        self._images += images

    def close_window(self, applied: bool, grad_norm: torch.Tensor | None) -> None:
        if applied:
            self._loss += self.window_loss
            self._batches += self._window_batches
        self._grad_norm = grad_norm if grad_norm is not None else self._grad_norm
        self.window_loss.zero_()
        self._window_batches = 0

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0 and self._batches > 0

    def read(self) -> dict[str, float]:
        """Loss (mean over ranks), images/s (all ranks) and gradient norm since the last read; restarts the sums."""
        acc = self.accelerator
        elapsed = time.perf_counter() - self._start
        values = {
            "loss": reduce_mean(acc, self._loss / self._batches).item(),
            "images_per_sec": self._images * acc.num_processes / elapsed if elapsed > 0 else 0.0,
        }
        if self._grad_norm is not None:
            values["grad_norm"] = float(self._grad_norm)
        self._loss.zero_()
        self._batches = 0
        self._images, self._start = 0, time.perf_counter()
        return values


# Dense bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s per device, matched
# against torch.cuda.get_device_name() in this order. Anything else needs logging.peak_tflops.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_tflops(device: torch.device, configured: float | None) -> float | None:
    """The per-device peak MFU is measured against: the configured one, else a known GPU's bf16 peak."""
    if configured is not None or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def training_flops_per_sample(model: torch.nn.Module, forward: Callable[[], Any], samples: int) -> float:
    """Model FLOPs of one training sample: 3x the forward pass (the backward costs two forwards),
    as torch's FlopCounterMode counts them (matmuls and convolutions). `forward` runs the model
    once on `samples` samples in eval mode, so no norm statistic or RNG stream is touched.
    Activation recomputation is not counted: MFU is defined on the model's FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            forward()
    finally:
        model.train(was_training)
    return 3.0 * counter.get_total_flops() / samples


class RunProgress:
    """Rank 0's console: a bar for the whole run (optimizer steps done of the total, the ETA to
    the run's end, images/s) above one for the epoch in progress (micro-batches). A resumed run's
    bar starts at the step it resumed from; its rate and ETA count only this launch's steps."""

    def __init__(self, accelerator: Accelerator, enabled: bool, total_steps: int, done_steps: int):
        self.enabled = enabled and accelerator.is_main_process
        self.run = tqdm(
            total=total_steps,
            initial=done_steps,
            desc="run",
            unit="step",
            disable=not self.enabled,
            dynamic_ncols=True,
            mininterval=1.0,
            position=0,
        )

    def epoch(self, batches: Iterable, total: int, initial: int, desc: str) -> tqdm:
        """`batches`, counted below the run's bar. Use it as a context manager so the bar is
        closed however the loop ends."""
        return tqdm(
            batches,
            total=total,
            initial=initial,
            desc=desc,
            unit="batch",
            disable=not self.enabled,
            dynamic_ncols=True,
            mininterval=1.0,
            leave=False,
            position=1,
        )

    def step_taken(self) -> None:
        self.run.update(1)

    def show(self, **values: str) -> None:
        """The latest logged values beside the run's bar (loss, lr, images/s)."""
        self.run.set_postfix(values, refresh=False)

    def close(self) -> None:
        self.run.close()


def peak_resident_mb() -> float:
    """This process's peak resident (host) memory so far, in MB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_resident_mb_per_rank(accelerator: Accelerator) -> list[float]:
    """Every rank's peak_resident_mb(); a collective. Taken after the first step, it is what
    building the model, loading its weights and setting up the strategy cost."""
    mine = torch.tensor([peak_resident_mb()], device=accelerator.device)
    return [round(v, 1) for v in accelerator.gather(mine).tolist()]


def memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_resident_mb()
