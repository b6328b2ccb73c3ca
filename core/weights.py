"""Read and write model weights without unpickling anything.

`.safetensors` is read with safetensors; `.pt`/`.pth`/`.bin` with `torch.load(weights_only=True)`,
which refuses arbitrary Python objects. Nothing is ever downloaded.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open

from core.errors import WeightsError
from core.params import full_shape, sharded_like

logger = logging.getLogger(__name__)


def _read_torch_file(path: str) -> dict[str, torch.Tensor]:
    """A .pt/.pth/.bin state dict, read whole with torch.load(weights_only=True)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # noqa: TID251 (weights_only: never unpickling)
    except Exception as e:
        raise WeightsError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e}). "
            "shardvision never unpickles arbitrary objects; convert it to .safetensors."
        ) from None
    # Common wrappers of training scripts: {"model": sd}, {"state_dict": sd}, {"module": sd}.
    for key in ("model", "state_dict", "module", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a mapping of parameter names to tensors")
    return obj


def load_weights(model: torch.nn.Module, path: str, exclude: Sequence[str] = ()) -> None:
    """Load `path` into `model` strictly, except for names matching an `exclude` glob.

    A model built partitioned by ZeRO-3 (`deepspeed.zero.Init`) is filled one tensor at a time:
    rank 0 reads each tensor from the file (from safetensors just that tensor; a .pt file is read
    whole) and the tensor's partitions go to the ranks that own them. A model sharded by FSDP2
    (DTensor parameters, after `allocate_for_sharded_load` and accelerate's prepare) is filled one
    tensor at a time too: every rank reads it and keeps its own shard. Either way no rank ever
    holds the whole model. The checks and their errors are the same in every case."""
    state, fresh, dropped = _fitting(model, path, exclude)
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        _load_partitioned(model, state)
    elif any(_is_dtensor(p) for p in model.parameters()):
        _load_sharded(model, state)
    else:
        model.load_state_dict({k: v.read() for k, v in state.items()}, strict=False)
    logger.info(
        "%s: %d tensors loaded%s%s",
        path,
        len(state),
        f"; {len(fresh)} start fresh (model.weights_exclude): {', '.join(fresh)}" if fresh else "",
        f"; {len(dropped)} dropped by the modules' own loading, e.g. {min(dropped)}" if dropped else "",
    )


def allocate_for_sharded_load(model: torch.nn.Module, path: str, exclude: Sequence[str] = ()) -> None:
    """FSDP2's half of a sharded start, before accelerate's prepare: `model` was built with its
    parameters on the meta device (core/distributed.py model_construction). The file is checked as
    `load_weights` checks it, before anything is allocated. The parameters the file will fill get
    uninitialised storage: accelerate's prepare tells parameters apart by their storage, and
    fully_shard copies each rank's shard out of it, so pages never written are never resident.
    The modules of those it leaves out (model.weights_exclude: a new head) are built for real by
    their own `reset_parameters`, from the run's seed, the same on every rank; a module that has
    none cannot start fresh this way and is named."""
    _, fresh, _ = _fitting(model, path, exclude)
    fresh_modules = {name.rpartition(".")[0] for name in fresh}
    given: dict[int, torch.nn.Parameter] = {}  # a tied parameter gets one storage under all its names
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not param.is_meta:
                continue
            if id(param) not in given:
                empty = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                given[id(param)] = torch.nn.Parameter(empty, requires_grad=param.requires_grad)
            module._parameters[name] = given[id(param)]
    with torch.no_grad():
        for module_name in sorted(fresh_modules):
            module = model.get_submodule(module_name)
            reset = getattr(module, "reset_parameters", None)
            if not callable(reset):
                starts_fresh = [n for n in fresh if n.rpartition(".")[0] == module_name]
                raise WeightsError(
                    f"{', '.join(starts_fresh)}: not taken from {path} (model.weights_exclude), and its module "
                    f"({type(module).__name__}) has no reset_parameters to start it fresh in a model built on the "
                    "meta device (FSDP2 fine-tune). Take it from the file, or start it fresh under DDP or ZeRO-3."
                )
            reset()


def _fitting(model: torch.nn.Module, path: str, exclude: Sequence[str]) -> tuple[dict[str, Stored], list[str], set]:
    """The tensors of `path` that `model` takes, the names that start fresh, and the entries the
    modules' own loading drops; a WeightsError saying everything that does not fit."""
    state = stored_tensors(path)
    skipped = {k for k in state if any(fnmatch.fnmatch(k, pat) for pat in exclude)}
    state = {k: v for k, v in state.items() if k not in skipped}

    own = _full_shapes(model)
    dropped = _dropped_on_load(model, [k for k in state if k not in own])
    state = {k: v for k, v in state.items() if k not in dropped}
    tied = _tied_names(model)
    # A tied name is filled through any of its names.
    loaded = {k for k in own if any(name in state for name in tied[k])}
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k])}"
        for k, v in state.items()
        if k in own and v.shape != own[k]
    ]
    missing = [k for k in own if k not in loaded and not any(fnmatch.fnmatch(k, pat) for pat in exclude)]
    unexpected = [k for k in state if k not in own]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched[:5])}")
    if missing:
        problems.append(f"missing from the file: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"not in the model: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    if problems:
        raise WeightsError(
            f"{path} does not fit the model ({'; '.join(problems)}). "
            "To fine-tune with a new head, skip its weights with model.weights_exclude (e.g. ['head.*'])."
        )
    return state, sorted(k for k in own if k not in loaded), dropped


def _dropped_on_load(model: torch.nn.Module, names: list[str]) -> set[str]:
    """Those of `names` (entries the model's state dict lacks) that the module they would belong to
    discards when it loads a state dict itself: torchvision's FrozenBatchNorm2d drops a BatchNorm
    checkpoint's `num_batches_tracked`, so an ImageNet backbone file starts a detector with frozen
    norms as `load_state_dict` would take it. Asked of the module's own `_load_from_state_dict`,
    with only that entry: it holds no parameter or buffer of that name, so nothing is copied."""
    dropped = set()
    for name in names:
        prefix, _, _ = name.rpartition(".")
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue
        entry = {name: torch.zeros(())}
        unexpected: list[str] = []
        module._load_from_state_dict(entry, prefix + ".", {}, True, [], unexpected, [])
        if name not in entry and name not in unexpected:
            dropped.add(name)
    return dropped


@dataclass
class Stored:
    """One tensor of a weights file: its shape at once, its values when read."""

    shape: torch.Size
    read: Callable[[], torch.Tensor]


def stored_tensors(path: str) -> dict[str, Stored]:
    """Every tensor of `path`, under its name without DDP's `module.` wrapper prefix; from a
    safetensors file each is read only when asked for, so a partitioned load holds one at a time
    (a .pt file is a pickle container and is read whole)."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path!r}")
    if not path.endswith(".safetensors"):
        return {k.removeprefix("module."): Stored(v.shape, _constant(v)) for k, v in _read_torch_file(path).items()}
    try:
        with safe_open(path, "pt") as f:
            shapes = {name: torch.Size(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None

    def reader(name: str) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            with safe_open(path, "pt") as f:
                return f.get_tensor(name)

        return read

    return {name.removeprefix("module."): Stored(shape, reader(name)) for name, shape in shapes.items()}


def _constant(value: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: value


def _full_shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Every state-dict entry's full shape; ZeRO-3 keeps a partitioned parameter's aside (ds_shape)."""
    return {k: full_shape(v) for k, v in model.state_dict(keep_vars=True).items()}


def _tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Each state-dict name -> every name of the same tensor. Tied weights (a language model's
    embeddings and output layer, D-FINE's heads and its decoder's) are one tensor under several
    names, and a safetensors export keeps one of them (accelerate's save_model, as transformers')."""
    names_of: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_of.setdefault(id(tensor), []).append(name)
    return {name: names for names in names_of.values() for name in names}


def _load_partitioned(model: torch.nn.Module, state: dict[str, Stored]) -> None:
    import deepspeed

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with torch.no_grad():
        for name, stored in state.items():
            if name in params:
                param = params[name]
                # Gathered whole on every rank for this one tensor; rank 0's copy is then partitioned.
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if rank0:
                        param.copy_(stored.read())
            else:
                buffers[name].copy_(stored.read())


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _load_sharded(model: torch.nn.Module, state: dict[str, Stored]) -> None:
    """Each rank reads each tensor whole, one at a time, and copies its own shard of it (DTensor's
    placement on the model's mesh, HSDP's replicas included) into the parameter."""
    tensors = {
        **dict(model.named_buffers(remove_duplicate=False)),
        **dict(model.named_parameters(remove_duplicate=False)),
    }
    with torch.no_grad():
        for name, stored in state.items():
            target: Any = tensors[name]
            value = stored.read().to(target.dtype)
            if _is_dtensor(target):
                value, target = sharded_like(target, value).to_local(), target.to_local()
            target.copy_(value)
