"""Training state that crosses strategies: every parameter's fp32 weight and optimizer moments, by
parameter name, plus the optimizer's step count.

Read from a DDP checkpoint (accelerate's `model.safetensors` and `optimizer.bin`), from an FSDP2
one (accelerate's torch.distributed.checkpoint folders `pytorch_model_fsdp_0` and `optimizer_0`,
already keyed by parameter name, read whole in this one process), or from the universal form of a
DeepSpeed checkpoint (DeepSpeed's layout of one file per parameter and state, whatever the ZeRO
stage or world size it was saved at), and written into the live model and optimizer of whichever
strategy this run uses: torch's own `load_state_dict` under DDP, torch's `set_model_state_dict` /
`set_optimizer_state_dict` from full tensors under FSDP2 (each rank keeps its shard), DeepSpeed's
tensor-fragment API (`safe_set_full_fp32_param`, `safe_set_full_optimizer_state`) under ZeRO-1/2/3,
which copies from each full tensor the slice this rank owns. One parameter is read at a time from a
universal folder; a DDP or FSDP checkpoint is read whole (a DCP folder is a pickle container for
its metadata: the caller has checked that it may be read, see resume.py).

The parameter order of the optimizer (`optimizer_order`) ties DDP's numbered optimizer state to
names; it is taken from the optimizer as built, before accelerate or DeepSpeed wrap it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from core.distributed import bare_module, strategy_of
from core.errors import PerParameterStateError
from core.optim import innermost_optimizer
from core.params import full_shape, sharded_like

STEP = "step"
FP32 = "fp32"
FSDP_MODEL, FSDP_OPTIMIZER = "pytorch_model_fsdp_0", "optimizer_0"  # accelerate's names for the first model's


def optimizer_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter the optimizer updates, in the order of its param groups."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


class PerParameterState:
    """Per-parameter training state, read lazily: `tensors(name)` gives {"fp32": ..., "exp_avg": ...}."""

    def __init__(self, folder: str, order: list[str]) -> None:
        self.folder, self.order = folder, order
        universal = os.path.join(folder, "zero")
        self._universal: str | None = None
        self._whole: dict[str, dict[str, torch.Tensor]] = {}
        if os.path.isdir(universal):
            self._universal = universal
            self.step = self._universal_step()
        elif os.path.isdir(os.path.join(folder, FSDP_MODEL)):
            self._whole, self.step = self._read_fsdp()
        else:
            self._whole, self.step = self._read_ddp()

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        if self._universal is None:
            if name not in self._whole:
                raise PerParameterStateError(
                    f"{self.folder}: no saved state for parameter {name!r}: the model has changed"
                )
            return self._whole[name]
        folder = os.path.join(self._universal, name)
        if not os.path.isdir(folder):
            raise PerParameterStateError(f"{self.folder}: no saved state for parameter {name!r}: the model has changed")
        out = {}
        for file in sorted(os.listdir(folder)):
            kind = file.removesuffix(".pt")
            if kind != STEP:
                saved = torch.load(os.path.join(folder, file), map_location="cpu", weights_only=True)  # noqa: TID251
                out[kind] = saved["param"] if isinstance(saved, dict) else saved
        return out

    def _read_ddp(self) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
        weights = load_file(os.path.join(self.folder, "model.safetensors"), device="cpu")
        saved = torch.load(os.path.join(self.folder, "optimizer.bin"), map_location="cpu", weights_only=True)  # noqa: TID251
        ids = [i for group in saved["param_groups"] for i in group["params"]]
        if len(ids) != len(self.order):
            raise PerParameterStateError(
                f"{self.folder}/optimizer.bin holds {len(ids)} parameters, this run's optimizer {len(self.order)}: "
                "the model or its parameter groups have changed"
            )
        for name in self.order:
            if name not in weights:
                raise PerParameterStateError(f"{self.folder}/model.safetensors has no {name!r}: the model has changed")
        moments = [saved["state"].get(i, {}) for i in ids]
        return self._by_name(weights, moments, "optimizer.bin")

    def _read_fsdp(self) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
        """accelerate's FSDP2 folders: {"model": {name: weight}} and {"optimizer": {"state": {name:
        {"step", "exp_avg", ...}}, "param_groups": ...}}, each tensor whole whatever the saving world size."""
        model = _read_dcp(os.path.join(self.folder, FSDP_MODEL))["model"]
        state = _read_dcp(os.path.join(self.folder, FSDP_OPTIMIZER))["optimizer"]["state"]
        for name in self.order:
            if name not in model:
                raise PerParameterStateError(f"{self.folder}/{FSDP_MODEL} has no {name!r}: the model has changed")
        return self._by_name(model, [state.get(name, {}) for name in self.order], FSDP_OPTIMIZER)

    def _by_name(
        self, weights: dict[str, torch.Tensor], moments: list[dict[str, Any]], optimizer_file: str
    ) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
        """Each parameter's fp32 weight and moments (`moments` in `order`), and the one step count
        they share, read out of the moments."""
        out, steps = {}, set()
        for name, saved in zip(self.order, moments, strict=True):
            state = dict(saved)
            if STEP in state:
                steps.add(float(state.pop(STEP)))
            out[name] = {FP32: weights[name].float(), **state}
        if len(steps) > 1:
            raise PerParameterStateError(f"{self.folder}/{optimizer_file}: parameters at different step counts {steps}")
        return out, steps.pop() if steps else 0.0

    def _universal_step(self) -> float:
        """ZeRO-1/2 universal folders keep a step per parameter; ZeRO-3's only in the optimizer's
        common state (a pickle of DeepSpeed's: read with its data classes allowed, nothing else)."""
        for name in self.order:
            step_file = os.path.join(self._universal or "", name, f"{STEP}.pt")
            if os.path.isfile(step_file):
                return float(torch.load(step_file, map_location="cpu", weights_only=True))  # noqa: TID251
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum]):
            common = torch.load(os.path.join(self._universal or "", "optimizer_state.pt"), weights_only=True)  # noqa: TID251
        return float(common["optimizer_state_dict"]["state"][0][STEP])

    def load_into(self, acc: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Put every parameter's weight, moments and step into this run's model and optimizer
        (as `accelerator.prepare` returned them: torch.compile's wrapper, which prefixes every
        parameter name, is looked through)."""
        bare = bare_module(acc, model)
        strategy = strategy_of(acc)
        if strategy == "deepspeed":
            self._into_deepspeed(bare, optimizer)
        elif strategy == "fsdp":
            self._into_fsdp(bare, optimizer)
        else:
            self._into_torch(bare, optimizer)

    def _into_torch(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        params = dict(model.named_parameters())
        live = optimizer.state_dict()
        ids = [i for group in live["param_groups"] for i in group["params"]]
        state = {}
        with torch.no_grad():
            for i, name in zip(ids, self.order, strict=True):
                saved = self._checked(name, params[name])
                params[name].copy_(saved.pop(FP32))
                state[i] = {STEP: torch.tensor(self.step), **saved}
        optimizer.load_state_dict({"state": state, "param_groups": live["param_groups"]})

    def _into_fsdp(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Each full tensor cut to this rank's shard (`sharded_like`: every rank holds the whole and
        keeps its part, no communication), then torch's own state-dict setters, which also create
        the optimizer's state."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        params: dict[str, Any] = dict(model.named_parameters())  # DTensors
        weights: dict[str, Any] = {}
        moments: dict[str, Any] = {}
        for name in self.order:
            p = params[name]
            saved = {kind: sharded_like(p, value.detach()) for kind, value in self._checked(name, p).items()}
            weights[name] = saved.pop(FP32)
            moments[name] = {STEP: torch.tensor(self.step), **saved}
        inner = innermost_optimizer(optimizer)
        names = iter(self.order)
        groups = [
            {**{k: v for k, v in group.items() if k != "params"}, "params": [next(names) for _ in group["params"]]}
            for group in inner.param_groups
        ]
        partial = StateDictOptions(strict=False)  # frozen parameters are not in `order`, and keep their value
        set_model_state_dict(model, weights, options=partial)
        set_optimizer_state_dict(model, inner, {"state": moments, "param_groups": groups}, options=partial)

    def _into_deepspeed(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        params = dict(model.named_parameters())
        self._create_optimizer_state(optimizer, kinds=[k for k in self.tensors(self.order[0]) if k != FP32])
        for name in self.order:
            param = params[name]
            saved = self._checked(name, param)
            fp32 = saved.pop(FP32)
            # The working copy (bf16 or fp32; under ZeRO-3 gathered, set, and partitioned again) ...
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
                param.copy_(fp32.view_as(param))
            # ... and the fp32 master and the moments, each rank its own slice.
            safe_set_full_fp32_param(param, fp32.view(-1))
            for kind, value in saved.items():
                safe_set_full_optimizer_state(param, value.view(-1), kind)
        for state in innermost_optimizer(optimizer).state.values():
            if STEP in state:
                old = state[STEP]
                state[STEP] = (
                    torch.tensor(self.step, dtype=old.dtype, device=old.device) if torch.is_tensor(old) else self.step
                )

    @staticmethod
    def _create_optimizer_state(optimizer: Any, kinds: list[str]) -> None:
        """DeepSpeed's ZeRO optimizers create the optimizer's state only at the first step (and
        ZeRO-1/2 only then link each parameter to its slice of it, which the tensor-fragment
        setters write through): create it now, zeroed, and link it the way DeepSpeed does."""
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        zero3, zero12 = "fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"
        while not hasattr(optimizer, zero3) and not hasattr(optimizer, zero12):
            optimizer = optimizer.optimizer  # accelerate's wrapper around DeepSpeed's
        inner = optimizer.optimizer

        def create(flat: torch.Tensor) -> None:
            if not inner.state[flat]:
                inner.state[flat] = {STEP: torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in kinds}}

        if hasattr(optimizer, zero3):
            for flat in optimizer.fp32_partitioned_groups_flat:
                create(flat)
            return
        for params, flat in zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups, strict=True):
            create(flat)
            lazy_init_hp_params_optimizer_state(params, flat, inner.state)

    def _checked(self, name: str, param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        saved = dict(self.tensors(name))
        shape = full_shape(param)
        for kind, value in saved.items():
            # ZeRO-3's universal form keeps every tensor flat; the others keep the parameter's shape.
            if value.shape != shape and (value.dim() != 1 or value.numel() != shape.numel()):
                raise PerParameterStateError(
                    f"{self.folder}: {name} {kind} has {tuple(value.shape)}, this run's parameter {tuple(shape)}: "
                    "the model has changed"
                )
            saved[kind] = value.reshape(shape)
        return saved


def _read_dcp(folder: str) -> dict[str, Any]:
    """A torch.distributed.checkpoint folder read whole into this process, at any saving world size."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    # torch's own format conversion (format_utils.dcp_to_torch_save) reads a folder this way.
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state
