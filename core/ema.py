"""The exponential moving average of the weights (`loop.ema_decay`), kept where the weights are.

Under DDP, a single process and ZeRO-1/2 every rank holds the whole model, and so the whole
average: timm's ModelEmaV3 on a copy of the model. Under ZeRO-3 and FSDP2 each rank holds one
shard of every weight, and the average is elementwise, so each rank averages only its own fp32
shard (DeepSpeed's local fp32 API; FSDP2's local DTensor shard), with no gather: memory and time
per rank shrink with the world size like the rest of the training state. Evaluation swaps the
averaged shards into the model's own and back; a checkpoint keeps one file per rank (resharded on
load at any world size or strategy, like the weights); the export gathers it parameter by
parameter into one file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
from collections.abc import Iterator

import safetensors.torch
import torch
from accelerate import Accelerator
from accelerate.utils import gather
from safetensors import safe_open

from core.distributed import bare_module, layout_of, reshard
from core.errors import WeightAverageError
from core.params import full_shape, sharded_like

FULL_FILE = "ema.safetensors"  # the whole average, in a checkpoint of a run that holds whole weights
SHARD_FILE = "ema-rank{rank:05d}-of-{world:05d}.safetensors"  # one rank's partitions, under ZeRO-3
EXPORT_FILE = "model_ema.safetensors"


class WeightAverage:
    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, decay: float) -> None:
        self.accelerator, self.decay = accelerator, decay
        layout = layout_of(accelerator)
        self.sharded = layout in ("zero3", "fsdp")
        bare = bare_module(accelerator, model)
        if self.sharded:
            self.layout: _Shards = _ZeroShards() if layout == "zero3" else _FsdpShards(bare)
            self.bare = bare
            self.params = {name: p for name, p in bare.named_parameters() if p.requires_grad}
            self.shards = {name: self.layout.local(p).detach().clone() for name, p in self.params.items()}
            # Buffers (norm statistics) are not sharded: every rank averages its own whole copy.
            self.buffers = {name: b for name, b in bare.named_buffers()}
            self.buffer_average = {name: b.detach().clone() for name, b in self.buffers.items()}
            self.model = model
        else:
            from timm.utils import ModelEmaV3

            self.full = ModelEmaV3(bare, decay=decay)

    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (counted from 0)."""
        if not self.sharded:
            self.full.update(bare_module(self.accelerator, model), step=step)
            return
        # timm's ModelEmaV3 (no warmup): the first two updates copy, then the decay applies.
        weight = 1.0 if step <= 1 else 1.0 - self.decay
        with torch.no_grad():
            torch._foreach_lerp_(
                list(self.shards.values()), [self.layout.local(p) for p in self.params.values()], weight
            )
            for name, average in self.buffer_average.items():
                if average.is_floating_point():
                    average.lerp_(self.buffers[name].to(average.dtype), weight)  # bf16 runs cast buffers
                else:
                    average.copy_(self.buffers[name])

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[torch.nn.Module]:
        """The model to evaluate the average with. Under ZeRO-3 and FSDP2 the training model itself,
        with the averaged shards copied into its own for the duration, and its own put back after."""
        if not self.sharded:
            yield self.full.module
            return
        kept = {name: self.layout.working(p).detach().clone() for name, p in self.params.items()}
        kept_buffers = {name: b.detach().clone() for name, b in self.buffers.items()}
        self._set(self.shards, self.buffer_average)
        try:
            yield self.model
        finally:
            self._set(kept, kept_buffers)

    def _set(self, shards: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                self.layout.working(p).copy_(shards[name])
            for name, b in self.buffers.items():
                b.copy_(buffers[name])
        self.layout.released(list(self.params.values()))

    # ------------------------------------------------------------------------------------------

    def save(self, folder: str) -> None:
        """Into a checkpoint being written (every rank calls it: under ZeRO-3 each writes its file)."""
        acc = self.accelerator
        if self.sharded:
            # Flat: ZeRO-3's partitions are, and FSDP2's row blocks flattened in rank order make the whole.
            flat = {k: v.reshape(-1) for k, v in self.shards.items()}
            tensors = {**flat, **{f"buffer:{k}": v for k, v in self.buffer_average.items()}}
            name = SHARD_FILE.format(rank=acc.process_index, world=acc.num_processes)
            shapes = json.dumps({name: list(full_shape(p)) for name, p in self.params.items()})  # for the export
            # through the module attribute: an asynchronous save captures it (core/checkpoint/background_save.py)
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, name), metadata={"shapes": shapes}
            )
        elif acc.is_main_process:
            self._save_whole(os.path.join(folder, FULL_FILE))

    def _save_whole(self, path: str) -> None:
        safetensors.torch.save_file({k: v.contiguous() for k, v in self.full.module.state_dict().items()}, path)

    def load(self, folder: str) -> None:
        """From a checkpoint saved whole or in shards, at any world size: each tensor is
        reassembled from the files that hold it and cut to what this rank keeps."""
        source = _SavedAverage(folder)
        with torch.no_grad():
            if not self.sharded:
                buffers = dict(self.full.module.named_buffers())
                for name, value in self.full.module.state_dict().items():
                    value.copy_(source.full(name, value.shape, buffer=name in buffers))
                return
            for name, p in self.params.items():
                self.shards[name].copy_(self.layout.cut(self.accelerator, p, source.full(name, full_shape(p))))
            for name, average in self.buffer_average.items():
                average.copy_(source.full(name, average.shape, buffer=True))

    def export(self, folder: str) -> None:
        """The whole average into `folder/model_ema.safetensors` (a collective under ZeRO-3)."""
        acc = self.accelerator
        if not self.sharded:
            if acc.is_main_process:
                self._save_whole(os.path.join(folder, EXPORT_FILE))
            return
        whole = {}
        for name, p in self.params.items():  # one parameter at a time: never more than one gathered
            gathered = self.layout.gathered(self.accelerator, p, self.shards[name])
            if acc.is_main_process:
                whole[name] = gathered.clone()
        for name, p in self.bare.named_parameters():  # frozen ones are not averaged: their value is it
            if name not in self.params:
                whole[name] = self.layout.whole_parameter(p)
        if acc.is_main_process:
            whole.update({name: b.detach().cpu().clone() for name, b in self.buffer_average.items()})
            safetensors.torch.save_file(whole, os.path.join(folder, EXPORT_FILE))


def saved_average(folder: str) -> dict[str, torch.Tensor] | None:
    """The whole average kept in a checkpoint folder (None if it has none), without the model or
    the cluster that wrote it: for `shardvision export`."""
    if not os.path.isfile(os.path.join(folder, FULL_FILE)) and not glob.glob(os.path.join(folder, "ema-rank*")):
        return None
    source = _SavedAverage(folder)
    if os.path.isfile(source.whole):
        with safe_open(source.whole, "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    with safe_open(source.shards[0], "pt") as f:
        shapes = json.loads((f.metadata() or {})["shapes"])
        buffers = {k.removeprefix("buffer:"): f.get_tensor(k) for k in f.keys() if k.startswith("buffer:")}
    return {name: source.full(name, tuple(shape)) for name, shape in shapes.items()} | buffers


class _SavedAverage:
    """The average in a checkpoint folder: one whole file, or one file per rank of a ZeRO-3 run."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.whole = os.path.join(folder, FULL_FILE)
        self.shards = sorted(glob.glob(os.path.join(folder, "ema-rank*-of-*.safetensors")))
        if not os.path.isfile(self.whole) and not self.shards:
            raise WeightAverageError(f"{folder}: the run uses EMA (loop.ema_decay) but the checkpoint holds none")
        if self.shards:
            worlds = {int(re.search(r"-of-(\d+)", s).group(1)) for s in self.shards}  # type: ignore[union-attr]
            if worlds != {len(self.shards)}:
                raise WeightAverageError(f"{folder}: EMA shard files {self.shards} do not make one set")

    def full(self, name: str, shape: torch.Size | tuple[int, ...], buffer: bool = False) -> torch.Tensor:
        numel = torch.Size(shape).numel()
        if os.path.isfile(self.whole):
            with safe_open(self.whole, "pt") as f:
                if name not in f.keys():
                    raise WeightAverageError(f"{self.whole}: no {name!r}: the model has changed")
                value = f.get_tensor(name)
        elif buffer:  # every rank's file has the buffers; the first rank's are the ones exported
            with safe_open(self.shards[0], "pt") as f:
                value = f.get_tensor(f"buffer:{name}")
        else:
            parts = []
            for shard in self.shards:
                with safe_open(shard, "pt") as f:
                    if name not in f.keys():
                        raise WeightAverageError(f"{shard}: no {name!r}: the model has changed")
                    parts.append(f.get_tensor(name))
            value = torch.cat(parts)[:numel]
        if value.numel() != numel:
            raise WeightAverageError(
                f"{self.folder}: EMA {name} has {value.numel()} values, this run's {tuple(shape)}: "
                "the model has changed"
            )
        return value.reshape(shape)


class _Shards:
    """How a sharding strategy keeps a parameter's fp32 shard, and how whole tensors map to it."""

    def local(self, p: torch.nn.Parameter) -> torch.Tensor:
        """This rank's fp32 shard: the one the optimizer updates."""
        raise NotImplementedError

    def working(self, p: torch.nn.Parameter) -> torch.Tensor:
        """This rank's shard of the weights the forward uses (swapped for the average's in evaluation)."""
        raise NotImplementedError

    def released(self, params: list[torch.nn.Parameter]) -> None:
        """After the working shards were set: drop any gathered copy, so the next forward gathers the new ones."""
        raise NotImplementedError

    def cut(self, accelerator: Accelerator, p: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the whole tensor `full`."""
        raise NotImplementedError

    def gathered(self, accelerator: Accelerator, p: torch.nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
        """The whole tensor from every rank's `shard` (a collective: every rank calls it)."""
        raise NotImplementedError

    def whole_parameter(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The parameter's whole value on the host (a collective)."""
        raise NotImplementedError


class _ZeroShards(_Shards):
    """ZeRO-3: a flat partition of ceil(numel / world) values per rank, the last one padded."""

    def local(self, p: torch.nn.Parameter) -> torch.Tensor:
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p)

    def working(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.ds_tensor  # type: ignore[attr-defined]

    def released(self, params: list[torch.nn.Parameter]) -> None:
        # Weights still gathered (those ZeRO-3 keeps whole between steps, and any left whole by the
        # last step) are released without writing back, as GatheredParameters does on exit.
        params[0].partition(param_list=params, has_been_updated=False)  # type: ignore[attr-defined]

    def cut(self, accelerator: Accelerator, p: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        world, rank = accelerator.num_processes, accelerator.process_index
        size = p.ds_tensor.numel()  # type: ignore[attr-defined]
        padded = torch.zeros(size * world, dtype=full.dtype)
        padded[: full.numel()] = full.reshape(-1)
        return padded[rank * size : (rank + 1) * size]

    def gathered(self, accelerator: Accelerator, p: torch.nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
        whole = gather(shard.to(accelerator.device)).cpu()
        return whole[: p.ds_numel].reshape(p.ds_shape)  # type: ignore[attr-defined]

    def whole_parameter(self, p: torch.nn.Parameter) -> torch.Tensor:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().cpu().clone()


class _FsdpShards(_Shards):
    """FSDP2: a DTensor per parameter whose local tensor is this rank's block of rows (fp32, also
    under a bf16 MixedPrecisionPolicy, which casts only what it gathers)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        reshard(model)  # the root's parameters, whole after a forward with no backward, sharded again

    def local(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.to_local()  # type: ignore[attr-defined]

    def working(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.to_local()  # type: ignore[attr-defined]

    def released(self, params: list[torch.nn.Parameter]) -> None:
        reshard(self.model)

    def cut(self, accelerator: Accelerator, p: torch.nn.Parameter, full: torch.Tensor) -> torch.Tensor:
        return sharded_like(p, full).to_local()

    def gathered(self, accelerator: Accelerator, p: torch.nn.Parameter, shard: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
        block = DTensor.from_local(shard, mesh, placements, shape=p.shape, stride=p.stride())
        return block.full_tensor().cpu()

    def whole_parameter(self, p: torch.nn.Parameter) -> torch.Tensor:
        return p.full_tensor().detach().cpu().clone()  # type: ignore[attr-defined]
