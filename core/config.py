"""Run configuration: one typed dataclass per concern, each field documented (the text doubles
as `--help`) and validated. core/config_parsing.py fills them from a YAML file and dotted
command-line overrides: an unknown key, a value of the wrong type or outside its choices stops
the run with an error that names the key, where it came from, and the close matches. The
resolved config is written to `<output_dir>/config.yaml` so every run can be reproduced from its
own folder.

Recipes extend `TrainConfig` with their own `model` and `data` dataclasses; the other concerns
(optimizer, schedule, loop, checkpoint, distributed, logging) are shared by every task.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from core.errors import ConfigError
from core.shipped import user_path

TRACKERS = ("tensorboard", "mlflow", "wandb")


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A documented dataclass field; `help` doubles as the `--help` text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


# --------------------------------------------------------------------------------------------
# The shared concerns. Recipes add `model` and `data` by subclassing ModelConfig / DataConfig.
# --------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str = option("resnet18", "Model name in the recipe's model factory (e.g. a timm name).")
    num_classes: int = option(1000, "Number of output classes.")
    weights: str | None = option(
        None, "Local weights to start from (.safetensors, or .pt/.pth read with weights_only=True)."
    )
    weights_exclude: list[str] = option(
        [], "Glob patterns of weight names to skip when loading `weights` (e.g. a new head: 'head.*')."
    )
    kwargs: dict[str, Any] = option({}, "Extra keyword arguments for the model constructor.")
    compile: bool = option(
        False, "torch.compile the model (inductor, through accelerate's dynamo plugin). Costs a compile at start."
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = option("default", "torch.compile mode.")
    compile_regional: bool = option(
        False, "Compile one instance of each repeated block (e.g. a ViT's Block) and reuse it: a much shorter compile."
    )
    channels_last: bool = option(
        False, "Store weights and 4-D inputs channels-last (NHWC): faster convolutions on tensor cores."
    )
    grad_checkpointing: bool = option(
        False,
        "Recompute block activations in the backward pass (timm/transformers models): less memory, about "
        "1/3 more compute.",
    )
    lora_rank: int = option(
        0,
        "LoRA through peft: the rank of the low-rank adapters added to model.lora_targets' layers; every "
        "other weight is frozen but the head's (0: off, the whole model trains).",
    )
    lora_alpha: int | None = option(None, "LoRA scale numerator (adapter output x alpha / rank); default the rank.")
    lora_dropout: float = option(0.0, "Dropout on the adapters' inputs.")
    lora_targets: list[str] = option(
        [],
        "Regular expressions of the module names LoRA adapts, matched whole. Default per family: timm ViT "
        "attention qkv/proj and MLP fc1/fc2, transformers ViT q/k/v/o_proj and MLP fc1/fc2, timm "
        "ConvNeXt's pointwise MLP.",
    )
    lora_modules_to_save: list[str] | None = option(
        None, "Modules trained fully beside the adapters; default the classifier (timm's pretrained_cfg, HF's)."
    )

    def validate(self) -> None:
        _check(self.num_classes >= 1, "model.num_classes", self.num_classes, "must be >= 1")
        _check(self.lora_rank >= 0, "model.lora_rank", self.lora_rank, "must be >= 0 (0: off)")
        if self.lora_rank and self.weights is None:
            raise ConfigError("model.lora_rank: LoRA adapts pretrained weights; give them with model.weights")
        _check(0 <= self.lora_dropout < 1, "model.lora_dropout", self.lora_dropout, "must be in [0, 1)")
        for pattern in self.lora_targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"model.lora_targets: {pattern!r} is not a regular expression: {e}") from None
        if self.weights is not None and not os.path.isfile(self.weights):
            raise ConfigError(f"model.weights: file not found: {self.weights!r}")


@dataclass
class DataConfig:
    micro_batch_size: int = option(32, "Samples per rank per forward pass (before accumulation).")
    eval_micro_batch_size: int | None = option(None, "Samples per rank per eval forward; default micro_batch_size.")
    num_workers: int = option(2, "DataLoader worker processes per rank (0 loads in the main process).")
    pin_memory: bool = option(
        True, "Pin host memory, so batches are copied to the GPU without blocking the host (ignored on CPU)."
    )
    shard_partitions: int = option(
        16,
        "Sharded data only (webdataset, parquet): the parts an epoch's shuffled shards are cut into, each "
        "step taking as many samples from each. Must divide the global batch; a multiple of ranks x "
        "accumulation (of every world size you may resume on) lets each rank read only its parts' shards.",
    )
    shuffle_window: int = option(
        1000,
        "Sharded data only (webdataset, parquet): samples are shuffled within windows of this many "
        "consecutive ones of a part.",
    )
    bad_samples: Literal["error", "skip"] = option(
        "error",
        "A sample that cannot be used (unreadable, truncated or empty file, bad box or mask value): stop "
        "every rank with an error naming it, or skip it (the next readable sample takes its place; each is "
        "listed in <output_dir>/bad_samples.txt).",
    )

    def validate(self) -> None:
        _check(self.micro_batch_size >= 1, "data.micro_batch_size", self.micro_batch_size, "must be >= 1")
        if self.eval_micro_batch_size is not None:
            _check(
                self.eval_micro_batch_size >= 1,
                "data.eval_micro_batch_size",
                self.eval_micro_batch_size,
                "must be >= 1",
            )
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        _check(self.shard_partitions >= 1, "data.shard_partitions", self.shard_partitions, "must be >= 1")
        _check(self.shuffle_window >= 1, "data.shuffle_window", self.shuffle_window, "must be >= 1")


@dataclass
class OptimConfig:
    name: str = option(
        "adamw", "Optimizer, any name timm.optim.create_optimizer_v2 knows (adamw, sgd, momentum, lamb, ...)."
    )
    lr: float = option(1e-3, "Peak learning rate (after warmup) for the whole global batch.")
    weight_decay: float = option(0.05, "Decoupled weight decay; never applied to norm layers and biases.")
    momentum: float = option(0.9, "Momentum for SGD-style optimizers.")
    betas: list[float] = option([0.9, 0.999], "Adam-style betas.")
    eps: float = option(1e-8, "Adam-style epsilon.")
    layer_decay: float | None = option(None, "Layer-wise lr decay for ViT/ConvNeXt fine-tuning (e.g. 0.65).")
    fused: bool | None = option(
        None,
        "One fused kernel per optimizer step (torch's adam, adamw, sgd, momentum, adagrad; CPU and GPU); "
        "None: on wherever the optimizer has it.",
    )
    foreach: bool | None = option(
        None,
        "Multi-tensor (foreach) optimizer kernels where no fused one is used; None: on wherever the "
        "optimizer has them.",
    )

    def validate(self) -> None:
        from timm.optim import list_optimizers

        names = [name for name in list_optimizers() if isinstance(name, str)]
        if self.name.lower() not in names:
            raise ConfigError(unknown_choice("optim.name", self.name, names, "optimizer"))
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _check(len(self.betas) == 2, "optim.betas", self.betas, "must have two values")
        if self.layer_decay is not None:
            _check(0 < self.layer_decay <= 1, "optim.layer_decay", self.layer_decay, "must be in (0, 1]")
        if self.fused:
            _check(
                not self.foreach,
                "optim.foreach",
                self.foreach,
                "contradicts optim.fused: true (one kernel choice per step; set one of them)",
            )
            _check(
                "fused" in kernel_options(self.name),
                "optim.fused",
                self.fused,
                f"optimizer {self.name!r} has no fused kernel (torch's adam, adamw, sgd, momentum and "
                "adagrad have one)",
            )


def kernel_options(name: str) -> set[str]:
    """Which of `fused` / `foreach` timm's optimizer `name` takes (apex/bitsandbytes ones are
    named by a string until imported: timm reports those itself if they are missing)."""
    from timm.optim import get_optimizer_info

    opt_class = get_optimizer_info(name).opt_class
    if not isinstance(opt_class, type):
        return set()
    return {"fused", "foreach"} & set(inspect.signature(opt_class).parameters)


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "step", "constant"] = option("cosine", "LR shape after warmup.")
    warmup_epochs: float = option(0.0, "Linear warmup length in epochs (converted to optimizer steps).")
    warmup_steps: int | None = option(None, "Warmup length in optimizer steps; overrides warmup_epochs.")
    warmup_start_factor: float = option(0.01, "LR multiplier at the first optimizer step of warmup.")
    min_lr_ratio: float = option(0.0, "Cosine floor as a fraction of the peak lr.")
    milestones_epochs: list[float] = option(
        [30.0, 60.0, 90.0], "Step schedule: epochs at which lr is multiplied by gamma."
    )
    gamma: float = option(0.1, "Step schedule: lr multiplier at each milestone.")

    def validate(self) -> None:
        _check(self.warmup_epochs >= 0, "schedule.warmup_epochs", self.warmup_epochs, "must be >= 0")
        if self.warmup_steps is not None:
            _check(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(
            0 < self.warmup_start_factor <= 1,
            "schedule.warmup_start_factor",
            self.warmup_start_factor,
            "must be in (0, 1]",
        )
        _check(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _check(0 < self.gamma <= 1, "schedule.gamma", self.gamma, "must be in (0, 1]")


@dataclass
class LoopConfig:
    epochs: int = option(10, "Training epochs.")
    max_steps: int | None = option(None, "Stop after this many optimizer steps in total (for smoke runs and tests).")
    grad_accum_steps: int = option(1, "Micro-batches accumulated per optimizer step.")
    clip_grad_norm: float | None = option(None, "Clip the global gradient norm to this value; None disables.")
    precision: Literal["no", "bf16", "fp16"] = option("no", "Mixed precision. fp16 needs a GPU.")
    ema_decay: float | None = option(None, "Keep an exponential moving average of the weights with this decay.")
    nonfinite_loss: Literal["error", "skip"] = option(
        "error", "On a NaN/inf loss: stop with an error naming the step, or skip that optimizer step."
    )
    eval_every_epochs: int = option(
        1, "Evaluate every N epochs (and always after the last one); 0: only after the last one."
    )
    eval_at_start: bool = option(False, "Also evaluate the starting weights before training (a baseline at step 0).")

    def validate(self) -> None:
        _check(self.epochs >= 1, "loop.epochs", self.epochs, "must be >= 1")
        if self.max_steps is not None:
            _check(self.max_steps >= 1, "loop.max_steps", self.max_steps, "must be >= 1")
        _check(self.grad_accum_steps >= 1, "loop.grad_accum_steps", self.grad_accum_steps, "must be >= 1")
        if self.clip_grad_norm is not None:
            _check(self.clip_grad_norm > 0, "loop.clip_grad_norm", self.clip_grad_norm, "must be > 0")
        if self.ema_decay is not None:
            _check(0 < self.ema_decay < 1, "loop.ema_decay", self.ema_decay, "must be in (0, 1)")
        _check(self.eval_every_epochs >= 0, "loop.eval_every_epochs", self.eval_every_epochs, "must be >= 0")


@dataclass
class CheckpointConfig:
    every_steps: int = option(0, "Save every N optimizer steps (0: only at epoch end).")
    at_epoch_end: bool = option(True, "Save at the end of every epoch.")
    keep_last: int = option(
        3, "Newest complete checkpoints to keep (older ones are deleted after a new one is complete)."
    )
    keep_best: int = option(
        0, "Also keep this many checkpoints whose own evaluation scored best (the task's primary metric)."
    )
    resume: str | None = option(None, "'auto' (newest intact checkpoint in output_dir, if any) or a checkpoint path.")
    allow_pickle: bool = option(
        False,
        "Allow resuming a DeepSpeed/FSDP checkpoint from outside this run's output_dir: their files are Python "
        "pickles, and loading one runs code stored in it.",
    )
    export_final: bool = option(True, "Write consolidated weights to <output_dir>/final/model.safetensors at the end.")
    async_save: bool = option(
        True,
        "Save in the background: the state is copied to host memory at the step boundary and training goes on "
        "while it is written and published (every strategy; FSDP2's DCP shards too).",
    )

    def validate(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "must be >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "must be >= 1")
        _check(self.keep_best >= 0, "checkpoint.keep_best", self.keep_best, "must be >= 0")


@dataclass
class DistributedConfig:
    strategy: Literal["auto", "ddp", "deepspeed", "fsdp"] = option(
        "auto", "auto follows the launcher (accelerate config / deepspeed launcher); else must agree with it."
    )
    deepspeed_config: str | None = option(
        None, 'DeepSpeed JSON (ds_configs/*.json); its "auto" values are filled from this config.'
    )
    fsdp_reshard_after_forward: bool = option(True, "FSDP2: free gathered params after forward (ZeRO-3-like).")
    fsdp_auto_wrap_classes: list[str] = option(
        [], "FSDP2: module class names to shard as units (e.g. Block); [] takes the layer the model repeats."
    )
    fsdp_activation_checkpointing: bool = option(False, "FSDP2: recompute activations of wrapped blocks.")
    fsdp_hybrid: bool = option(
        False,
        "FSDP2: shard within each host and replicate across hosts (HSDP): the per-unit gathers stay on a host's "
        "links, and each host keeps one whole copy of the training state.",
    )
    find_unused_parameters: bool = option(False, "DDP: tolerate parameters that get no gradient.")
    timeout_minutes: int = option(
        60, "The backend's own collective timeout (gloo/NCCL), the last resort after the two below."
    )
    hang_timeout_minutes: float = option(
        15.0,
        "A rank that makes no progress this long (a collective, a save, a data fetch) writes its stacks to "
        "<output_dir>/hang-<rank>.txt and exits with code 124. 0 disables.",
    )
    startup_timeout_minutes: float = option(
        30.0,
        "The same limit from launch to the end of the first optimizer step (rendezvous, data, resume, "
        "compile). 0 disables.",
    )

    def validate(self) -> None:
        if self.deepspeed_config is not None and not os.path.isfile(user_path(self.deepspeed_config)):
            raise ConfigError(
                f"distributed.deepspeed_config: file not found: {self.deepspeed_config!r} (neither from the "
                "current directory nor among the shipped ds_configs/)"
            )
        _check(self.timeout_minutes >= 1, "distributed.timeout_minutes", self.timeout_minutes, "must be >= 1")
        for key in ("hang_timeout_minutes", "startup_timeout_minutes"):
            value = getattr(self, key)
            _check(value >= 0, f"distributed.{key}", value, "must be >= 0")
            # Past the backend's timeout the collective fails first, with no stacks and no phase.
            _check(
                value < self.timeout_minutes,
                f"distributed.{key}",
                value,
                f"must be below distributed.timeout_minutes ({self.timeout_minutes})",
            )


@dataclass
class LoggingConfig:
    every_steps: int = option(10, "Log training loss, lr and throughput every N optimizer steps.")
    progress_bar: bool = option(
        True, "Show progress on rank 0: the whole run (steps, ETA to the end, images/s) and the epoch."
    )
    trackers: list[str] = option(
        ["tensorboard"],
        "Where metrics, the run config and the final metrics also go (accelerate's trackers): tensorboard "
        "(<output_dir>/tensorboard), mlflow, wandb; [] for none. A resumed run continues the same tracker run.",
    )
    project: str = option("shardvision", "MLflow experiment / W&B project name.")
    mlflow_tracking_uri: str | None = option(
        None, "MLflow store or server; None: the local store sqlite:///<output_dir>/mlflow.db (no server)."
    )
    wandb_mode: Literal["offline", "online"] = option(
        "offline", "W&B: offline writes <output_dir>/wandb/ (upload later with `wandb sync`); online needs a login."
    )
    count_flops: bool = option(True, "Count the model's FLOPs per sample once at start, to log TFLOP/s and MFU.")
    peak_tflops: float | None = option(
        None,
        "Peak TFLOP/s of one device for MFU; None: the bf16 peak of a known GPU (H100, H200, A100, L40S, "
        "L4), else no MFU.",
    )

    def validate(self) -> None:
        _check(self.every_steps >= 1, "logging.every_steps", self.every_steps, "must be >= 1")
        for tracker in self.trackers:
            _check(tracker in TRACKERS, "logging.trackers", tracker, f"must be one of {', '.join(TRACKERS)}")
            _check(
                importlib.util.find_spec(tracker) is not None,
                "logging.trackers",
                tracker,
                f"needs the {tracker} package: pip install 'shardvision[trackers]'",
            )
        if self.peak_tflops is not None:
            _check(self.peak_tflops > 0, "logging.peak_tflops", self.peak_tflops, "must be > 0")


@dataclass
class TrainConfig:
    output_dir: str = option("runs/default", "Run folder: config, metrics, checkpoints, final weights.")
    seed: int = option(0, "Base seed; each rank derives its own from it.")
    eval_only: bool = option(False, "Only evaluate model.weights (or the resumed checkpoint), then exit.")
    model: ModelConfig = section(ModelConfig, "Model.")
    data: DataConfig = section(DataConfig, "Data.")
    optim: OptimConfig = section(OptimConfig, "Optimizer.")
    schedule: ScheduleConfig = section(ScheduleConfig, "Learning-rate schedule.")
    loop: LoopConfig = section(LoopConfig, "Training loop.")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints.")
    distributed: DistributedConfig = section(DistributedConfig, "Distributed strategy.")
    logging: LoggingConfig = section(LoggingConfig, "Logging.")

    def validate(self) -> None:
        if self.eval_only and self.model.weights is None and self.checkpoint.resume is None:
            raise ConfigError("--eval-only needs --weights FILE or --resume auto|PATH: nothing to evaluate.")
        if self.model.lora_rank and self.loop.ema_decay is not None:
            raise ConfigError(
                "loop.ema_decay with model.lora_rank: a LoRA run cannot keep a weight average yet (it would average "
                "the adapters alone); leave one of them unset"
            )


# --------------------------------------------------------------------------------------------
# What validate() raises
# --------------------------------------------------------------------------------------------


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")


def unknown_choice(key: str, value: Any, valid: list[str], what: str) -> str:
    # Dotted keys share long prefixes, so they need a stricter match than short values do.
    close = difflib.get_close_matches(str(value), valid, n=3, cutoff=0.8 if what == "key" else 0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    shown = ", ".join(valid) if len(valid) <= 30 else ", ".join(valid[:30]) + ", ..."
    return f"{key}: unknown {what} {value!r}.{hint} Valid: {shown}"
