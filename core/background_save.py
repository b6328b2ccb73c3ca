"""Checkpoint saves that do not stop training (checkpoint.async_save).

At the step boundary each rank copies what it is about to write (accelerate's model, optimizer
and RNG state, DeepSpeed's shards, the EMA) into host memory: `captured_writes` turns the
`torch.save` and safetensors `save_file` calls of `accelerator.save_state` into host copies of
their arguments (`host_copy`). Training then goes on while a thread makes those same calls on the
copies, writing the very bytes a synchronous save writes, and fsyncs them; rank 0 publishes the
folder (trainer state, manifest, rename; core/checkpoint.py) only once every rank has said, by a
marker file beside its own, that its part is on disk. A crash at any moment therefore leaves at
most an unpublished `.tmp-<step>` folder, as a synchronous save does.

Neither library offers this hook: accelerate writes through its own `save` (safetensors'
`save_file`, imported into its module) and `torch.save`, DeepSpeed's checkpoint engine through
`torch.save`. The capture replaces those three names only for files under the checkpoint's own
folder and only while `save_state` runs; every other write passes through untouched.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import os
from collections.abc import Callable, Iterator
from typing import Any

import safetensors.torch
import torch


def host_copy(obj: Any, memo: dict[Any, Any] | None = None) -> Any:
    """`obj` with every tensor copied into host memory (pinned when it comes from a GPU) and
    everything else deep-copied, keeping which objects are shared: tensors that share a storage
    (views) share one copy laid out as the original, an object met twice is copied once, and
    attributes set on a tensor or a dict (a state dict's `_metadata`) come along. torch.save
    therefore writes the same bytes from the copy as from the original."""
    memo = {} if memo is None else memo
    copy: Any
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        # empty storages all sit at address 0 but are distinct storages to torch.save
        key = ("storage", storage.data_ptr(), storage.nbytes(), str(storage.device)) if storage.nbytes() else id(obj)
        if key not in memo:
            pinned = storage.device.type == "cuda"
            host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pinned)
            host.copy_(torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage), non_blocking=pinned)
            memo[key] = host.untyped_storage()
        copy = torch.empty(0, dtype=obj.dtype).set_(memo[key], obj.storage_offset(), obj.size(), obj.stride())
        if isinstance(obj, torch.nn.Parameter):
            copy = torch.nn.Parameter(copy, requires_grad=obj.requires_grad)
        elif obj.requires_grad:
            copy.requires_grad_()
        if obj.__dict__:
            copy.__dict__.update(host_copy(obj.__dict__, memo))
    elif isinstance(obj, dict):
        copy = type(obj)((k, host_copy(v, memo)) for k, v in obj.items())
        if getattr(obj, "__dict__", None):  # a state dict's _metadata
            copy.__dict__.update(host_copy(obj.__dict__, memo))
    elif isinstance(obj, list):
        copy = [host_copy(v, memo) for v in obj]
    elif isinstance(obj, tuple):
        items = [host_copy(v, memo) for v in obj]
        copy = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    else:
        copy = copy_module.deepcopy(obj)
    memo[id(obj)] = copy
    return copy


def copied_bytes(memo: dict[Any, Any]) -> int:
    """The host memory `host_copy` took for the tensors it copied with `memo`."""
    return sum(v.nbytes() for v in memo.values() if isinstance(v, torch.UntypedStorage))


class HeldFiles:
    """An asynchronous save's writes, held in host memory: (writer, host copy, path, arguments)."""

    def __init__(self) -> None:
        self.writes: list[tuple[Callable, Any, str, tuple, dict]] = []
        self.nbytes = 0  # the host memory the copies take

    def hold(self, writer: Callable, obj: Any, path: Any, args: tuple = (), kwargs: dict | None = None) -> None:
        # Objects are matched by address within one call only: between calls the libraries free
        # temporaries (DeepSpeed's clones) whose addresses the next ones reuse.
        memo: dict[Any, Any] = {}
        self.writes.append((writer, host_copy(obj, memo), os.fspath(path), args, kwargs or {}))
        self.nbytes += copied_bytes(memo)

    def write(self) -> None:
        """Make the held calls, fsync each file, then let go of the memory."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the copies into pinned memory have landed
        for writer, obj, path, args, kwargs in self.writes:
            writer(obj, path, *args, **kwargs)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        self.writes = []


@contextlib.contextmanager
def captured_writes(folder: str) -> Iterator[HeldFiles]:
    """While active, `torch.save` and safetensors' `save_file` calls for files under `folder`
    copy their arguments into host memory (the `HeldFiles` yielded) instead of writing."""
    import accelerate.utils.other as accelerate_io

    held = HeldFiles()
    root = os.path.realpath(folder) + os.sep
    torch_save, save_file = torch.save, safetensors.torch.save_file

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

    replaced = [(torch, "save", capture_torch_save), (safetensors.torch, "save_file", capture_save_file)]
    replaced.append((accelerate_io, "safe_save_file", capture_save_file))
    originals = [(module, name, getattr(module, name)) for module, name, _ in replaced]
    for module, name, value in replaced:
        setattr(module, name, value)
    try:
        yield held
    finally:
        for module, name, value in originals:
            setattr(module, name, value)
