"""How the model and its inputs are set up for the run's speed and precision options, the same in
training and in the memory plan (core/commands/plan.py): activation recomputation and channels_last on the
model before it is wrapped, and the batch cast to DeepSpeed's half weights."""

from __future__ import annotations

from typing import Any

import torch

from core.config import TrainConfig
from core.errors import ConfigError

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # loop.precision -> DeepSpeed's weight dtype


def apply_model_options(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """model.grad_checkpointing and model.channels_last, before the model is wrapped.
    (model.compile is accelerate's: it compiles after wrapping, see build_dynamo_plugin.)"""
    if cfg.model.grad_checkpointing:
        try:
            timm_switch = getattr(model, "set_grad_checkpointing", None)
            transformers_switch = getattr(model, "gradient_checkpointing_enable", None)
            if callable(timm_switch):
                timm_switch(True)
            elif callable(transformers_switch):
                transformers_switch(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                raise ValueError(
                    "it has neither timm's set_grad_checkpointing() nor transformers' gradient_checkpointing_enable()"
                )
        except (ValueError, AssertionError, NotImplementedError) as e:
            raise ConfigError(
                f"model.grad_checkpointing: {cfg.model.name} ({type(model).__name__}) cannot recompute activations: {e}"
            ) from None
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)


def cast_inputs(batch: Any, input_keys: tuple[str, ...], dtype: torch.dtype | None, channels_last: bool) -> Any:
    """The batch's model inputs in the model's dtype (DeepSpeed half precision; None keeps them)
    and memory format (channels_last), tensors alone or in lists."""
    if dtype is None and not channels_last:
        return batch

    def cast(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return x if dtype is None else x.to(dtype)
        if isinstance(x, (list, tuple)):
            return type(x)(cast(v) for v in x)
        return x

    return {k: cast(v) if k in input_keys else v for k, v in batch.items()}
