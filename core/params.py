"""What a parameter is, whatever holds it.

A model built partitioned under DeepSpeed ZeRO-3 (`deepspeed.zero.Init`) gives every parameter an
empty local tensor of shape `(0,)` and keeps its real shape aside (`ds_shape`, `ds_numel`); FSDP2's
DTensors report their full shape themselves. Whatever decides by a parameter's shape after
construction (weight decay, weights loading, the per-parameter checkpoint, the run summary) asks
here, or it sees a 1-d tensor of no values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def full_shape(tensor: torch.Tensor) -> torch.Size:
    return torch.Size(getattr(tensor, "ds_shape", tensor.shape))


def full_numel(tensor: torch.Tensor) -> int:
    return int(getattr(tensor, "ds_numel", tensor.numel()))


def sharded_like(param: torch.Tensor, full: torch.Tensor) -> DTensor:
    """`full`, which every rank holds alike, as a DTensor laid out like FSDP2's `param` (its mesh
    and placements): each rank keeps its own part and nothing is sent (no source rank)."""
    from torch.distributed.tensor import distribute_tensor

    mesh, placements = param.device_mesh, param.placements  # type: ignore[attr-defined]
    return distribute_tensor(full.to(param.dtype), mesh, placements, src_data_rank=None)
