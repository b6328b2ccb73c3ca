"""Optimizer and learning-rate schedule.

The optimizer comes from timm's `create_optimizer_v2`, and its parameter groups from timm's own
rules: a decayed group and a no-decay group (norm weights, biases: every parameter of at most one
dimension, and whatever the model lists in `no_weight_decay()`), with layer-wise lr decay where
asked. timm reads each parameter's `ndim`, which a model built partitioned under ZeRO-3 reports as
1 for every parameter (an empty local tensor): it would put every weight in the no-decay group and
fine-tune without weight decay. So timm's rules run here over stand-ins of each parameter's full
shape (core/params.py), and the groups it returns are mapped back to the real parameters.

The schedule is defined in optimizer steps, not micro-batches or epochs, and is stepped by the
trainer exactly once per optimizer step. It is therefore the same lr at the same optimizer step
for any number of ranks and any accumulation. (A scheduler handed to `accelerator.prepare` steps
once per process per call by default, a known trap, so shardvision never prepares it.) It is a
closed-form factor of the step rather than a chain of torch schedulers so that resuming sets it
from the step alone.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay

from core.config import OptimConfig, ScheduleConfig, kernel_options
from core.errors import ConfigError
from core.params import full_numel, full_shape


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, sharded: bool = False) -> torch.optim.Optimizer:
    """`sharded`: the parameters will be FSDP2's DTensors (see step_kernel)."""
    kwargs: dict[str, Any] = dict(step_kernel(cfg, sharded))
    if cfg.name.lower() in ("adam", "adamw", "nadam", "nadamw", "radam", "lamb", "lambw", "adan"):
        kwargs.update(betas=tuple(cfg.betas), eps=cfg.eps)
    optimizer = create_optimizer_v2(
        model,
        opt=cfg.name,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        param_group_fn=functools.partial(param_groups, cfg=cfg),
        **kwargs,
    )
    for group in optimizer.param_groups:
        # timm's own schedulers apply lr_scale (layer decay) on every step; ours bakes it into the base lr.
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
    return optimizer


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """timm's weight-decay (or layer-decay) groups of `model`, decided on every parameter's full
    shape and name, whatever strategy built it."""
    view: Any = _FullShapes(model)  # read as the module it stands in for
    no_weight_decay: set[str] = getattr(model, "no_weight_decay", lambda: set())()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(
            view, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay, no_weight_decay_list=no_weight_decay
        )
    else:
        groups = param_groups_weight_decay(view, weight_decay=cfg.weight_decay, no_weight_decay_list=no_weight_decay)
    for group in groups:
        group["params"] = [view.real[id(p)] for p in group["params"]]
    return groups


class _FullShapes:
    """`model` as timm's grouping reads it (named_parameters, group_matcher, pretrained_cfg), with
    each parameter replaced by a meta-device stand-in of its full shape (no memory)."""

    def __init__(self, model: torch.nn.Module):
        self._model = model
        self._stand_ins = {
            name: torch.empty(full_shape(p), device="meta", requires_grad=p.requires_grad)
            for name, p in model.named_parameters()
        }
        self.real = {id(self._stand_ins[name]): p for name, p in model.named_parameters()}

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:
        return iter(self._stand_ins.items())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


# The fused update kernels DTensor can run on shards (torch/distributed/tensor/_ops/_pointwise_ops.py
# registers Adam's and AdamW's); any other fused kernel on FSDP2's parameters raises "Operator
# aten._fused_sgd_.default does not have a sharding strategy registered" at the first step.
FUSED_ON_DTENSOR = ("adam", "adamw")


def step_kernel(cfg: OptimConfig, sharded: bool = False) -> dict[str, bool]:
    """The fastest update kernel the optimizer has and the config leaves on: fused (one kernel for
    every tensor, CPU and CUDA), else multi-tensor (foreach). torch turns neither on by itself on
    CPU and only foreach on CUDA; on 2 CPU cores a fused AdamW step is 3-6x faster than the
    per-tensor loop (benchmarks/optimizer_step.py). On FSDP2's DTensors (`sharded`) only
    FUSED_ON_DTENSOR's fused kernels run; the others take foreach."""
    options = kernel_options(cfg.name)
    if sharded and cfg.name.lower() not in FUSED_ON_DTENSOR:
        if cfg.fused:
            raise ConfigError(
                f"optim.fused: true: the fused {cfg.name} kernel cannot run on FSDP2's sharded parameters "
                f"(DTensor runs fused {' and '.join(FUSED_ON_DTENSOR)} only); leave optim.fused unset"
            )
        options = options - {"fused"}
    if cfg.fused or (cfg.fused is None and cfg.foreach is not True and "fused" in options):
        return {"fused": True}
    foreach = cfg.foreach if cfg.foreach is not None else ("foreach" in options or None)
    return {} if foreach is None else {"foreach": foreach}


def lr_factor(
    step: int,
    *,
    name: str,
    warmup_steps: int,
    total_steps: int,
    start_factor: float,
    min_lr_ratio: float,
    milestones: tuple[int, ...],
    gamma: float,
) -> float:
    """Multiplier of the peak lr used by optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    if name == "constant":
        return 1.0
    if name == "step":
        return gamma ** sum(step >= m for m in milestones)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_of(cfg: ScheduleConfig, steps_per_epoch: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(round(cfg.warmup_epochs * steps_per_epoch))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    factor = functools.partial(
        lr_factor,
        name=cfg.name,
        warmup_steps=warmup_steps_of(cfg, steps_per_epoch),
        total_steps=total_steps,
        start_factor=cfg.warmup_start_factor,
        min_lr_ratio=cfg.min_lr_ratio,
        milestones=tuple(int(round(m * steps_per_epoch)) for m in cfg.milestones_epochs),
        gamma=cfg.gamma,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_schedule_step(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put the schedule at optimizer step `step` (used on resume)."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's and DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_kind(optimizer: torch.optim.Optimizer) -> tuple[str, str]:
    """(the optimizer's class name under accelerate's and DeepSpeed's wrappers, its update kernel:
    fused, foreach or per-tensor)."""
    inner = innermost_optimizer(optimizer)
    first = optimizer.param_groups[0]
    return type(inner).__name__, "fused" if first.get("fused") else "foreach" if first.get("foreach") else "per-tensor"


def param_group_facts(optimizer: torch.optim.Optimizer) -> list[dict[str, float]]:
    """What each parameter group holds (tensors, values at their full size) and its peak lr and
    weight decay: the run summary's lines and the `run` row's `param_groups`."""
    return [
        {
            "tensors": len(group["params"]),
            "values": sum(full_numel(p) for p in group["params"]),
            "lr": group["lr"],
            "weight_decay": group.get("weight_decay", 0.0),
        }
        for group in optimizer.param_groups
    ]


def describe_param_groups(optimizer: torch.optim.Optimizer, facts: list[dict[str, float]]) -> list[str]:
    name, kernel = optimizer_kind(optimizer)
    lines = [f"optimizer {name}, {kernel} update kernel"]
    for i, group in enumerate(facts):
        lines.append(
            f"group {i}: {group['tensors']} tensors, {group['values']:,} values, lr {group['lr']:.3g}, "
            f"weight_decay {group['weight_decay']:g}"
        )
    return lines
