"""What a run says about itself beside its metrics: the summary of its shape at each launch (on
the console and as the `run` row of metrics.jsonl), the model's FLOPs per sample behind TFLOP/s
and MFU, and each rank's peak memory after the first step (the `startup` row)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from accelerate import Accelerator

from core.distributed import parameter_counts, zero_stage
from core.lora import adapted_layers
from core.optim import describe_param_groups, optimizer_kind, warmup_steps_of
from core.params import full_numel
from core.run_log import RunLogger, peak_resident_mb_per_rank, training_flops_per_sample
from core.task import Task

logger = logging.getLogger("shardvision")


def log_run_summary(trainer: Any) -> None:
    """The run's shape, on the console and as a `run` row of metrics.jsonl (one per launch), read
    from the built core.trainer.Trainer."""
    cfg, acc = trainer.cfg, trainer.accelerator
    stage = zero_stage(acc.state.deepspeed_plugin.deepspeed_config) if trainer.strategy == "deepspeed" else None
    optimizer, kernel = optimizer_kind(trainer.optimizer)
    micro, accum = cfg.data.micro_batch_size, cfg.loop.grad_accum_steps
    parameters, on_this_rank = parameter_counts(trainer.bare_model())
    trainable = sum(full_numel(p) for p in trainer.bare_model().parameters() if p.requires_grad)
    facts = {
        "world_size": acc.num_processes,
        "strategy": trainer.strategy,
        "zero_stage": stage,
        "precision": cfg.loop.precision,
        "device": str(acc.device),
        "global_batch": micro * accum * acc.num_processes,
        "steps_per_epoch": trainer.steps_per_epoch,
        "total_steps": trainer.total_steps,
        "parameters": parameters,
        "parameters_on_this_rank": on_this_rank,
        "trainable_parameters": trainable,
        "optimizer": optimizer,
        "update_kernel": kernel,
        "param_groups": trainer.param_groups,
        "resumed_from": trainer.resume_source.path if trainer.resume_source is not None else None,
    }
    trainer.run_logger.log("run", trainer.state.global_step, trainer.state.epoch, facts, trackers=False)
    strategy = trainer.strategy + (f" (ZeRO-{stage})" if stage is not None else "")
    sharded = stage == 3 or trainer.strategy == "fsdp"
    lines = [
        f"world size {acc.num_processes} | strategy {strategy} | precision {cfg.loop.precision} | device {acc.device}",
        f"micro batch {micro} per rank | accumulation {accum} | global batch {facts['global_batch']}",
        f"train samples {len(trainer.train_set)} | eval samples {len(trainer.eval_set)}",
        f"optimizer steps: {trainer.steps_per_epoch} per epoch, {trainer.total_steps} in total | "
        f"warmup {warmup_steps_of(cfg.schedule, trainer.steps_per_epoch)} steps | schedule {cfg.schedule.name}",
        f"model {cfg.model.name}: {parameters:,} parameters"
        + (f", {on_this_rank:,} stored on this rank (its ZeRO-3/FSDP shard)" if sharded else "")
        + (f", {trainable:,} trainable ({100 * trainable / parameters:.2g}%)" if trainable < parameters else ""),
        *describe_param_groups(trainer.optimizer, trainer.param_groups),
    ]
    if trainer.flops_per_sample:
        peak = (
            f"MFU against {trainer.peak_tflops:g} TFLOP/s per device"
            if trainer.peak_tflops
            else "no MFU: set logging.peak_tflops"
        )
        lines.append(
            f"model FLOPs per training sample: {trainer.flops_per_sample / 1e9:.3g} GFLOP (3x forward) | {peak}"
        )
    if cfg.model.lora_rank:
        lines.append(
            f"LoRA rank {cfg.model.lora_rank}: adapters in {adapted_layers(trainer.bare_model())} layers, the rest "
            "frozen but the head (no gradient, no optimizer state)"
        )
    speed = [k for k in ("compile", "channels_last", "grad_checkpointing") if getattr(cfg.model, k)]
    if speed:
        lines.append("model options: " + ", ".join(speed))
    if trainer.ema is not None:
        lines.append(f"EMA of weights, decay {cfg.loop.ema_decay}")
    logger.info("run summary\n  %s", "\n  ".join(lines))


def count_flops(
    model: torch.nn.Module, task: Task, batch: Any, autocast: contextlib.AbstractContextManager
) -> float | None:
    """Counted on one evaluation batch (`batch`: one sample, on the device, cast as training casts
    it), through the prepared model's own module: under ZeRO-3 and FSDP2 each layer is gathered
    as in training, so no rank needs a whole copy, and data-dependent models (detectors) run as
    they will in training."""
    try:
        with autocast:
            return training_flops_per_sample(model, lambda: task.evaluation_step(model, batch), samples=1)
    except (AssertionError, RuntimeError) as e:
        # The count is a diagnostic and must not stop a run: torch's module tracker fails on
        # some models (Deformable DETR passes a slice of a parameter to a submodule).
        logger.warning(
            "model FLOPs not counted, TFLOP/s and MFU will not be logged: torch's FlopCounterMode failed on "
            "this model (%s: %s). --logging.count_flops false skips the count.",
            type(e).__name__,
            e,
        )
        return None


def report_startup_memory(accelerator: Accelerator, run_logger: RunLogger, step: int, epoch: int) -> bool:
    """Each rank's peak resident memory after the first step (a collective). Returns True: reported."""
    peaks = peak_resident_mb_per_rank(accelerator)
    run_logger.log("startup", step, epoch, {"peak_resident_mb_per_rank": peaks}, trackers=False)
    logger.info("peak resident memory per rank after the first step: %s MB", ", ".join(f"{p:,.0f}" for p in peaks))
    return True
