"""Build the Accelerator for DDP, DeepSpeed ZeRO or FSDP from the run config and the launcher.

Every distributed act in shardvision goes through the Accelerator this module builds, plus the
few helpers below. Recipes never touch `torch.distributed` or `deepspeed`.

Which strategy runs is decided once, here:
- `accelerate launch --config_file accelerate_configs/deepspeed_*.yaml` sets ACCELERATE_USE_DEEPSPEED,
  an FSDP accelerate config sets ACCELERATE_USE_FSDP, the `deepspeed` launcher sets CROSS_SIZE;
- `distributed.strategy` in the run config either says `auto` (follow the launcher) or must agree
  with it: a run config asking for ddp under a DeepSpeed launch is an error, never a silent pick.

On a host without CUDA, the Accelerator is built with `cpu=True` (DDP) or a gloo process group
(DeepSpeed), which is what makes `torchrun --nproc_per_node 2` and the repo's accelerate configs
give a real 2-rank run on CPU; without it accelerate initialises the group but distributes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import importlib.util
import json
import logging
import os
import random
import warnings
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.parallelism_config import ParallelismConfig
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedDataParallelKwargs,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    TorchDynamoPlugin,
)

from core.config import TrainConfig
from core.errors import ConfigError
from core.params import full_numel
from core.shipped import shipped_path, user_path

STRATEGIES = ("ddp", "deepspeed", "fsdp")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def launcher_strategy() -> str | None:
    """The strategy the launcher asked for, or None when it leaves the choice to the run config."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if "CROSS_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
        return "deepspeed"  # the `deepspeed` launcher exports CROSS_RANK/CROSS_SIZE; torchrun does not
    return None


def resolve_strategy(cfg: TrainConfig) -> str:
    asked, launched = cfg.distributed.strategy, launcher_strategy()
    if asked == "auto":
        if launched is not None:
            return launched
        return "deepspeed" if cfg.distributed.deepspeed_config else "ddp"
    if launched is not None and launched != asked:
        raise ConfigError(
            f"distributed.strategy={asked!r} contradicts the launcher, which set up {launched!r}. "
            f"Set distributed.strategy to 'auto' or {launched!r}, or launch with a matching config "
            "(accelerate_configs/ holds one per strategy)."
        )
    return asked


def resolve_precision(cfg: TrainConfig, on_gpu: bool) -> str:
    precision = cfg.loop.precision
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    # accelerate launch always exports a value ("no" by default); only a real choice can conflict.
    if launched != "no" and launched != precision:
        raise ConfigError(
            f"loop.precision={precision!r} contradicts the launcher's mixed_precision={launched!r}; "
            f"make them agree (e.g. --loop.precision {launched})."
        )
    if precision == "fp16" and not on_gpu:
        raise ConfigError(
            "loop.precision='fp16' needs a GPU: on CPU accelerate silently trains in fp32. "
            "Use 'bf16' (CPU autocast) or 'no'."
        )
    return precision


def deepspeed_config_path(cfg: TrainConfig) -> str:
    given, launched = cfg.distributed.deepspeed_config, os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    # A relative path (the accelerate configs' own "ds_configs/zero2.json" too) is looked up from
    # the current directory, then among the shipped files: an installed shardvision finds its own.
    from_cfg = user_path(given) if given else None
    from_launcher = user_path(launched) if launched else None
    if from_cfg and from_launcher and os.path.realpath(from_cfg) != os.path.realpath(from_launcher):
        raise ConfigError(
            f"distributed.deepspeed_config={from_cfg!r} contradicts the accelerate config's "
            f"deepspeed_config_file={from_launcher!r}; give one of them."
        )
    path = from_cfg or from_launcher
    if not path:
        shipped = sorted(f"ds_configs/{os.path.basename(p)}" for p in glob.glob(shipped_path("ds_configs/*.json")))
        raise ConfigError(
            "DeepSpeed was asked for but no DeepSpeed JSON was given: set "
            f"--distributed.deepspeed_config to one of {', '.join(shipped)}."
        )
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config file not found: {path!r}")
    return path


def fill_deepspeed_config(ds: dict, cfg: TrainConfig, world_size: int, source: str) -> dict:
    """Replace the batch, accumulation, clipping and precision "auto" values from the run config.

    A value the JSON pins explicitly must equal the run config's, so a run cannot train with a
    batch size or precision other than the one its own config.yaml records.
    """
    ds = copy.deepcopy(ds)
    micro, accum = cfg.data.micro_batch_size, cfg.loop.grad_accum_steps
    wanted = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(cfg.loop.clip_grad_norm or 0.0),
    }
    for key, value in wanted.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif have != value:
            raise ConfigError(f'{source}: {key}={have!r} contradicts the run config ({value!r}); set it to "auto".')
    for section, on in (("bf16", cfg.loop.precision == "bf16"), ("fp16", cfg.loop.precision == "fp16")):
        block = ds.setdefault(section, {})
        have = block.get("enabled", "auto")
        if have == "auto":
            block["enabled"] = on
        elif bool(have) != on:
            raise ConfigError(
                f"{source}: {section}.enabled={have!r} contradicts "
                f'loop.precision={cfg.loop.precision!r}; set it to "auto".'
            )
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(
            f'{source}: remove the "optimizer"/"scheduler" sections: shardvision builds the optimizer '
            "(optim.*) and steps the schedule itself so the lr is the same under every strategy."
        )
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f'{source}: shardvision cannot fill these "auto" values, give numbers: {", ".join(leftover)}')
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """The one Accelerator of a run, for the strategy resolve_strategy() picks."""
    on_gpu = torch.cuda.is_available()
    strategy = resolve_strategy(cfg)
    precision = resolve_precision(cfg, on_gpu)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    timeout = timedelta(minutes=cfg.distributed.timeout_minutes)

    handlers: list[Any] = []
    if world_size > 1:  # a backend given to a single process makes accelerate expect a process group
        handlers.append(InitProcessGroupKwargs(backend=None if on_gpu else "gloo", timeout=timeout))
    plugins: dict[str, Any] = {}
    if strategy == "ddp":
        # Gradients as views of the all-reduce buckets: one copy of the gradients per rank, not two.
        handlers.append(
            DistributedDataParallelKwargs(
                find_unused_parameters=cfg.distributed.find_unused_parameters, gradient_as_bucket_view=True
            )
        )
    elif strategy == "deepspeed":
        # DeepSpeed 0.19 gathers ZeRO-3 partitions with a collective torch 2.14 deprecates: one
        # warning per gather, dozens per step, burying the run's log.
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        path = deepspeed_config_path(cfg)
        with open(path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON: {e}") from None
        ds = fill_deepspeed_config(raw, cfg, world_size, path)
        if cfg.loop.nonfinite_loss == "skip":
            raise ConfigError(
                "loop.nonfinite_loss='skip' is not supported under DeepSpeed, which steps inside "
                "backward; use 'error' (its fp16 loss scaler already skips overflowing steps)."
            )
        plugins["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds)
    elif strategy == "fsdp":
        # Under an FSDP accelerate config its fsdp_config is used as is (the plugin reads it from
        # the environment the launcher set); otherwise the run config's distributed.fsdp_* keys.
        plugins["fsdp_plugin"] = (
            FullyShardedDataParallelPlugin() if launcher_strategy() == "fsdp" else build_fsdp_plugin(cfg)
        )
        if plugins["fsdp_plugin"].fsdp_version != 2:
            raise ConfigError(
                "the accelerate config asks for FSDP1 (fsdp_version: 1); shardvision trains, checkpoints and "
                "resumes with FSDP2 only: set fsdp_version: 2 (accelerate_configs/fsdp.yaml)."
            )

    if strategy == "fsdp" and on_gpu:
        plugins["parallelism_config"] = fsdp_mesh(cfg, world_size)
    accelerator = Accelerator(
        cpu=not on_gpu and strategy in ("ddp", "fsdp"),
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.loop.grad_accum_steps,
        kwargs_handlers=handlers,
        dataloader_config=build_dataloader_config(cfg, on_gpu),
        project_config=ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=os.path.join(cfg.output_dir, "tensorboard")
        ),
        log_with=list(cfg.logging.trackers) or None,
        dynamo_plugin=build_dynamo_plugin(cfg),
        **plugins,
    )
    if strategy == "fsdp" and not on_gpu:
        enable_fsdp_on_cpu(accelerator, plugins["fsdp_plugin"], precision, fsdp_mesh(cfg, world_size))
    return accelerator


def fsdp_mesh(cfg: TrainConfig, world_size: int) -> ParallelismConfig:
    """FSDP2's device mesh: one dimension sharding over every rank, or with distributed.fsdp_hybrid
    (HSDP) sharding over a host's ranks and replicating across hosts."""
    if not cfg.distributed.fsdp_hybrid:
        return ParallelismConfig(dp_shard_size=world_size)
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size % per_host:
        raise ConfigError(
            f"distributed.fsdp_hybrid needs as many ranks on every host: {world_size} ranks, {per_host} on this one"
        )
    return ParallelismConfig(dp_replicate_size=world_size // per_host, dp_shard_size=per_host)


def enable_fsdp_on_cpu(
    accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin, precision: str, mesh: ParallelismConfig
) -> None:
    """Lift accelerate's one gate against FSDP on CPU ranks, the only place shardvision does.

    accelerate 1.15 decides the distributed type once, in `AcceleratorState.__init__` (state.py),
    and sets `DistributedType.FSDP` only for accelerator devices (MULTI_GPU, MULTI_XPU, ...): on
    CPU ranks it leaves MULTI_CPU and its FSDP2 code never runs. Everything after that decision
    works on CPU over gloo (prepare's `fully_shard`, save_state/load_state through DCP,
    get_state_dict), so the decision is made again here, in the state both AcceleratorState and
    PartialState read, with what accelerate would have done after it: the mixed precision policy,
    and an explicit CPU mesh (given no mesh, `fully_shard` on a host that also has GPUs moves the
    model to CUDA, pytorch#132471). tests/unit/test_strategies.py fails when accelerate changes
    this gate (opens it, or moves it), so an upgrade cannot silently change what runs.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        raise ConfigError(
            "distributed.strategy='fsdp' on CPU needs a gloo process group, which accelerate builds for a "
            "launched run: start it with torchrun, accelerate launch or srun (one process is "
            "`torchrun --nproc_per_node 1`)."
        )
    state = accelerator.state
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    if precision != "no":
        plugin.set_mixed_precision(precision)
    state.parallelism_config = mesh
    state.device_mesh = mesh.get_device_mesh("cpu")


def build_dataloader_config(cfg: TrainConfig, on_gpu: bool) -> DataLoaderConfiguration:
    """Data order is a function of (seed, epoch) alone, so resuming mid-epoch replays it exactly.
    Batches from pinned memory are copied to the GPU without blocking the host, so the copy of
    one batch overlaps the previous step's kernels."""
    return DataLoaderConfiguration(
        use_seedable_sampler=True, data_seed=cfg.seed, non_blocking=on_gpu and cfg.data.pin_memory
    )


def reset_accelerator_state() -> None:
    """Forget accelerate's process-wide singletons, so one process can build another Accelerator
    (tests and benchmarks that run several trainers in turn)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def build_dynamo_plugin(cfg: TrainConfig) -> TorchDynamoPlugin | None:
    """model.compile as accelerate's dynamo plugin, which compiles after wrapping (DDP, FSDP) or
    through the DeepSpeed engine. None leaves accelerate's default: an accelerate config's
    dynamo_config still applies."""
    if not cfg.model.compile:
        return None
    return TorchDynamoPlugin(
        backend="inductor", mode=cfg.model.compile_mode, use_regional_compilation=cfg.model.compile_regional
    )


def build_fsdp_plugin(cfg: TrainConfig) -> FullyShardedDataParallelPlugin:
    """accelerate's FSDP2 plugin. Checkpoints stay sharded (each rank writes its own part);
    the final export gathers a full state dict through `accelerator.get_state_dict`."""
    d = cfg.distributed
    kwargs: dict[str, Any] = dict(
        fsdp_version=2,
        reshard_after_forward=d.fsdp_reshard_after_forward,
        activation_checkpointing=d.fsdp_activation_checkpointing,
        state_dict_type="SHARDED_STATE_DICT",
        cpu_ram_efficient_loading=False,
    )
    if d.fsdp_auto_wrap_classes:
        kwargs.update(
            auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=list(d.fsdp_auto_wrap_classes)
        )
    return FullyShardedDataParallelPlugin(**kwargs)


def choose_fsdp_units(
    plugin: FullyShardedDataParallelPlugin, model: torch.nn.Module, configured: list[str]
) -> list[str]:
    """Set the run's FSDP plugin, before `prepare`, to shard `model` by `fsdp_unit_classes`
    (distributed.fsdp_auto_wrap_classes, else an FSDP accelerate config's class list, else the
    model's own choice). Returns the class names."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    names = fsdp_unit_classes(model, list(configured) or list(plugin.transformer_cls_names_to_wrap or []))
    if input_embeddings(model) is None and hasattr(model, "get_input_embeddings"):
        # accelerate's FSDP2 preparation asks every model for its input embeddings; transformers
        # vision models without any (Segformer) raise instead of answering None.
        model.get_input_embeddings = lambda: None  # type: ignore[assignment]
    plugin.auto_wrap_policy = transformer_auto_wrap_policy if names else None
    plugin.transformer_cls_names_to_wrap = names
    return names


def fsdp_unit_classes(model: torch.nn.Module, configured: list[str]) -> list[str]:
    """The module classes FSDP2 shards as units of their own (each gathered for its forward and
    freed after): `configured` when given, else the layer the model repeats. A transformers model
    names its own (`_no_split_modules`: ViTLayer, ...); otherwise each module class that a
    container holds more than once and that has layers of its own (timm ViT's Block, ConvNeXt's
    stages and blocks, ResNet's blocks, MobileNet's InvertedResidual, torchvision's FPN blocks).
    The root module is always a unit, so a model with no repeated layer is one unit."""
    names = list(configured) or list(getattr(model, "_no_split_modules", None) or []) or repeated_layers(model)
    # accelerate makes the input embeddings a unit of their own after wrapping these classes; a
    # unit around them (transformers ViT's ViTEmbeddings) would already hold their parameters
    # sharded, and sharding them again fails (overlapping meshes).
    embeddings = input_embeddings(model)
    if embeddings is not None:
        around = {type(m).__name__ for m in model.modules() if any(c is embeddings for c in m.modules())}
        names = [n for n in names if n not in around or type(embeddings).__name__ == n]
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in present]
    if missing:
        raise ConfigError(
            f"FSDP units {missing} are not module classes of this model; set distributed.fsdp_auto_wrap_classes to "
            f"some of: {', '.join(repeated_layers(model)) or '(none repeat)'}"
        )
    return names


def input_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    """A transformers model's input embeddings; None for models without (timm, torchvision) and
    for the vision models whose `get_input_embeddings` raises NotImplementedError (Segformer)."""
    try:
        return getattr(model, "get_input_embeddings", lambda: None)()
    except NotImplementedError:
        return None


def reshard(model: torch.nn.Module) -> None:
    """Back to every FSDP2 parameter's shard. FSDP2 frees gathered weights after the backward, and
    after the forward only in the units that reshard after forward (never the root): a forward
    with no backward (evaluation, the FLOP count) leaves the root's parameters whole, as plain
    tensors, where code that works on shards (the weight average, a per-parameter load) expects
    them sharded. Elsewhere a no-op."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def repeated_layers(model: torch.nn.Module) -> list[str]:
    """Class names of the modules made of layers that a container (Sequential, ModuleList,
    ModuleDict: torchvision's backbone getter is one) holds more than once; plain containers are
    not units themselves."""
    containers = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
    names: dict[str, None] = {}
    for container in model.modules():
        if not isinstance(container, containers):
            continue
        kinds = [
            type(c).__name__
            for c in container.children()
            if type(c) not in containers and any(True for _ in c.children())
        ]
        names.update((k, None) for k in kinds if kinds.count(k) > 1)
    return list(names)


def strategy_of(accelerator: Accelerator) -> str:
    from accelerate.utils import DistributedType

    return {
        DistributedType.DEEPSPEED: "deepspeed",
        DistributedType.FSDP: "fsdp",
    }.get(accelerator.distributed_type, "ddp" if accelerator.num_processes > 1 else "single")


def bare_module(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model without torch.compile's and DDP's wrappers (FSDP2's shards stay in place), as
    `accelerator.unwrap_model(model, keep_torch_compile=False)` gives it, which is used under
    DeepSpeed. Written out for the others because accelerate's imports deepspeed whenever it is
    installed, to recognise its engine: about 2 s of imports (deepspeed, and the mlflow, pandas
    and pyarrow its autotuner brings) in every DDP launch, which never uses it. (accelerate's
    FSDP2 `prepare` imports it the same way, which only accelerate can avoid.)"""
    if strategy_of(accelerator) == "deepspeed":
        return accelerator.unwrap_model(model, keep_torch_compile=False)
    model = getattr(model, "_orig_mod", model)  # compiled after wrapping: compile(DDP(model))
    while isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def layout_of(accelerator: Accelerator) -> str:
    """How this run stores model and optimizer state: ddp (one full copy, also single-process),
    zero1/zero2/zero3 (DeepSpeed's partitions) or fsdp."""
    strategy = strategy_of(accelerator)
    if strategy == "deepspeed":
        return f"zero{zero_stage(accelerator.state.deepspeed_plugin.deepspeed_config)}"
    return "fsdp" if strategy == "fsdp" else "ddp"


@contextlib.contextmanager
def model_construction(accelerator: Accelerator, partitioned: bool) -> Iterator[None]:
    """Where the task builds its model. `partitioned` (a fine-tune from a weights file under ZeRO-3
    or FSDP2): no rank ever holds the whole model. ZeRO-3 builds inside DeepSpeed's `zero.Init`,
    where each layer is partitioned as soon as it is built; FSDP2 inside accelerate's
    `init_empty_weights`, which puts the parameters on the meta device and leaves the buffers (the
    values a module computes when built, such as position indices) real; core/weights.py then
    gives them storage, fully_shard cuts it to each rank's shard, and the file is streamed in.
    Otherwise whole on every rank, transformers models included: accelerate registers its ZeRO-3
    config with transformers, whose `from_config` would then partition the model on its own,
    behind the back of a run that expects it whole (its FLOP count, its weights loading)."""
    plugin = accelerator.state.deepspeed_plugin
    if partitioned and layout_of(accelerator) == "fsdp":
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            yield
    elif partitioned:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=plugin.deepspeed_config):
            yield
    elif layout_of(accelerator) == "zero3" and importlib.util.find_spec("transformers"):
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()  # as accelerate left it, for transformers' later use
    else:
        yield


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(the model's parameters, those this rank stores). ZeRO-3 keeps a parameter's full size aside
    (`ds_numel`) and this rank's partition in `ds_tensor`; FSDP2's DTensors report the full shape
    and hold a local shard; elsewhere every rank stores everything."""
    total = mine = 0
    p: Any
    for p in model.parameters():
        total += full_numel(p)
        if hasattr(p, "ds_tensor"):
            mine += p.ds_tensor.numel()
        elif hasattr(p, "to_local"):
            mine += p.to_local().numel()
        else:
            mine += p.numel()
    return total, mine


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) identically."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank(seed: int, rank: int) -> None:
    """A different stream per rank (dropout, augmentation), reproducible from the base seed."""
    seed_everything(seed + 1000003 * rank)


def setup_logging(accelerator: Accelerator) -> None:
    """INFO on the main process, warnings and errors only on the others."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def reduce_mean(accelerator: Accelerator, value: torch.Tensor) -> torch.Tensor:
    """The mean of a per-rank scalar over all ranks."""
    return accelerator.reduce(value.detach().float().reshape(1).to(accelerator.device), reduction="mean")[0]


def share_buffers(model: torch.nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm's running statistics), as DDP does before each
    forward. DeepSpeed never does, so each rank's statistics would follow its own batches and
    ranks would evaluate, and be checkpointed (rank 0's copy only), with different models. One
    broadcast per dtype."""
    buffers = [b for b in model.buffers() if b.numel()]
    if not buffers or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    for dtype in dict.fromkeys(b.dtype for b in buffers):  # the model's order: the same on every rank
        group = [b for b in buffers if b.dtype == dtype]
        flat = torch.cat([b.detach().reshape(-1) for b in group])
        torch.distributed.broadcast(flat, src=0)
        for buffer, value in zip(group, flat.split([b.numel() for b in group]), strict=True):
            buffer.data.copy_(value.view_as(buffer))
