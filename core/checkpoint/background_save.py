"""Checkpoint saves that do not stop training (checkpoint.async_save).

At the step boundary each rank copies what it is about to write (accelerate's model, optimizer
and RNG state, DeepSpeed's shards, the EMA) into host memory: `captured_writes` turns the
`torch.save` and safetensors `save_file` calls of `accelerator.save_state` into host copies of
their arguments (`host_copy`). Training then goes on while a thread makes those same calls on the
copies, writing the very bytes a synchronous save writes; rank 0 publishes the folder (trainer
state, manifest with every file fsynced, rename; saver.py) only once every rank has said, by a
marker file beside its own, that its part is written. A crash at any moment therefore leaves at
most an unpublished `.tmp-<step>` folder, as a synchronous save does.

Neither library offers this hook: accelerate writes through its own `save` (safetensors'
`save_file`, imported into its module) and `torch.save`, DeepSpeed's checkpoint engine through
`torch.save`, and accelerate's FSDP2 sharded state through `torch.distributed.checkpoint.save`
(DCP). The capture replaces those four names only for files under the checkpoint's own folder and
only while `save_state` runs; every other write passes through untouched.

A DCP save is collective (its plan and its metadata are agreed over the process group): the held
copy keeps each DTensor's shard with its layout, and the background thread runs `dcp.save` on it
over a gloo group of its own (`background_group`), in the order accelerate made the calls, the
same on every rank, so its collectives never meet the training's on the default group. This is
what DCP's own `async_save` does (stage to host memory, write in a thread); going through the
capture keeps one path for every strategy: at most one save in flight, published only when every
rank's part is written, a failed write stopping the run.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import os
from collections.abc import Callable, Iterator
from typing import Any

import safetensors.torch
import torch
from torch.distributed.tensor import DTensor


class HostBuffers:
    """Host memory for the copies, kept from one save to the next: allocating hundreds of MB and
    touching it for the first time costs several times the copy itself (page faults), and every
    save of a run copies the same sizes. (DCP's async_save keeps its staging memory likewise.)"""

    def __init__(self) -> None:
        self.free: dict[tuple[int, bool], list[torch.UntypedStorage]] = {}
        self.lent: list[torch.UntypedStorage] = []

    def take(self, nbytes: int, pinned: bool) -> torch.UntypedStorage:
        kept = self.free.get((nbytes, pinned))
        storage = kept.pop() if kept else torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).untyped_storage()
        self.lent.append(storage)
        return storage

    def give_back(self) -> None:
        """Every buffer lent since the last call is free for the next save."""
        for storage in self.lent:
            self.free.setdefault((storage.nbytes(), storage.is_pinned()), []).append(storage)
        self.lent = []


def host_copy(obj: Any, memo: dict[Any, Any] | None = None, buffers: HostBuffers | None = None) -> Any:
    """`obj` with every tensor copied into host memory (pinned when it comes from a GPU; from
    `buffers` if given) and everything else deep-copied, keeping which objects are shared:
    tensors that share a storage (views) share one copy laid out as the original, an object met
    twice is copied once, and attributes set on a tensor or a dict (a state dict's `_metadata`)
    come along. torch.save therefore writes the same bytes from the copy as from the original."""
    memo = {} if memo is None else memo
    buffers = HostBuffers() if buffers is None else buffers
    copy: Any
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, DTensor):  # this rank's shard, copied, in the same layout over the same mesh
        shard = obj.to_local()  # a new alias at each call: kept alive below, or the memo, keyed by
        memo[("alive", id(shard))] = shard  # id, could take the next one's reused address for it
        local = host_copy(shard, memo, buffers)
        copy = DTensor.from_local(
            local, obj.device_mesh, obj.placements, run_check=False, shape=obj.shape, stride=obj.stride()
        )
    elif isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        # empty storages all sit at address 0 but are distinct storages to torch.save
        key = ("storage", storage.data_ptr(), storage.nbytes(), str(storage.device)) if storage.nbytes() else id(obj)
        if key not in memo:
            pinned = storage.device.type == "cuda"
            memo[key] = buffers.take(storage.nbytes(), pinned).copy_(storage, non_blocking=pinned)
        copy = torch.empty(0, dtype=obj.dtype).set_(memo[key], obj.storage_offset(), obj.size(), obj.stride())
        if isinstance(obj, torch.nn.Parameter):
            copy = torch.nn.Parameter(copy, requires_grad=obj.requires_grad)
        elif obj.requires_grad:
            copy.requires_grad_()
        if obj.__dict__:
            copy.__dict__.update(host_copy(obj.__dict__, memo, buffers))
    elif isinstance(obj, dict):
        copy = type(obj)((k, host_copy(v, memo, buffers)) for k, v in obj.items())
        if getattr(obj, "__dict__", None):  # a state dict's _metadata
            copy.__dict__.update(host_copy(obj.__dict__, memo, buffers))
    elif isinstance(obj, list):
        copy = [host_copy(v, memo, buffers) for v in obj]
    elif isinstance(obj, tuple):
        items = [host_copy(v, memo, buffers) for v in obj]
        copy = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    else:
        copy = copy_module.deepcopy(obj)
    memo[id(obj)] = copy
    return copy


class HeldFiles:
    """An asynchronous save's writes, held in host memory: (writer, host copy, path, arguments)."""

    def __init__(self, buffers: HostBuffers) -> None:
        self.writes: list[tuple[Callable, Any, str, tuple, dict]] = []
        self.buffers = buffers

    @property
    def nbytes(self) -> int:
        """The host memory the copies take."""
        return sum(s.nbytes() for s in self.buffers.lent)

    def hold(self, writer: Callable, obj: Any, path: Any, args: tuple = (), kwargs: dict | None = None) -> None:
        # Objects are matched by address within one call only: between calls the libraries free
        # temporaries (DeepSpeed's clones) whose addresses the next ones reuse.
        self.writes.append((writer, host_copy(obj, {}, self.buffers), os.fspath(path), args, kwargs or {}))

    def write(self) -> None:
        """Make the held calls; the buffers then serve the next save. (Rank 0 fsyncs every file of
        the folder when it writes the manifest, as after a synchronous save.)"""
        try:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the copies into pinned memory have landed
            for writer, obj, path, args, kwargs in self.writes:
                writer(obj, path, *args, **kwargs)
        finally:
            self.writes = []
            self.buffers.give_back()


def background_group() -> Any:
    """A gloo group of every rank for the background thread's DCP collectives (a collective call:
    every rank makes it, at the same point)."""
    return torch.distributed.new_group(backend="gloo")


def _dcp_write(state_dict: dict[str, Any], path: str, group: Any) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(path), process_group=group)


@contextlib.contextmanager
def captured_writes(folder: str, buffers: HostBuffers, dcp_group: Any = None) -> Iterator[HeldFiles]:
    """While active, `torch.save`, safetensors' `save_file` and (given `dcp_group`, from
    `background_group`) `torch.distributed.checkpoint.save` calls for files under `folder` copy
    their arguments into host memory (the `HeldFiles` yielded) instead of writing."""
    import accelerate.utils.other as accelerate_io
    import torch.distributed.checkpoint as dcp  # not at the top: a run that never writes DCP never loads it

    held = HeldFiles(buffers)
    root = os.path.realpath(folder) + os.sep
    torch_save, save_file, dcp_save = torch.save, safetensors.torch.save_file, dcp.save

    def inside(f: Any) -> bool:
        return isinstance(f, (str, os.PathLike)) and os.path.realpath(f).startswith(root)

    def capture_torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if not inside(f):
            return torch_save(obj, f, *args, **kwargs)
        held.hold(torch_save, obj, f, args, kwargs)

    def capture_save_file(tensors: dict[str, torch.Tensor], filename: Any, metadata: Any = None) -> None:
        if not inside(filename):
            return save_file(tensors, filename, metadata)
        held.hold(save_file, tensors, filename, (metadata,))

    def capture_dcp_save(state_dict: dict[str, Any], *args: Any, storage_writer: Any = None, **kwargs: Any) -> Any:
        path = getattr(storage_writer, "path", None)
        if args or dcp_group is None or not inside(path):
            return dcp_save(state_dict, *args, storage_writer=storage_writer, **kwargs)
        held.hold(_dcp_write, state_dict, path, (dcp_group,))

    replaced = [(torch, "save", capture_torch_save), (safetensors.torch, "save_file", capture_save_file)]
    replaced.append((accelerate_io, "safe_save_file", capture_save_file))
    replaced.append((dcp, "save", capture_dcp_save))
    originals = [(module, name, getattr(module, name)) for module, name, _ in replaced]
    for module, name, value in replaced:
        setattr(module, name, value)
    try:
        yield held
    finally:
        for module, name, value in originals:
            setattr(module, name, value)
