"""Resuming: which checkpoint `--resume` means (`CheckpointResumer.resolve`), how this run can
restore it (`source_of`, before the engine exists: a `ResumeSource`), and the restore itself
(`load`: model and optimizer, the trainer's position carried over to this run's geometry, the EMA).

`--resume auto` only considers published checkpoints, checks them against their manifest and falls
back to the previous one if the newest is damaged. accelerate reads its own files with
`weights_only=True`; DeepSpeed and FSDP checkpoints are pickles and are loaded only from this
run's own folder unless `checkpoint.allow_pickle` is set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.checkpointing import load_accelerator_state
from accelerate.utils import broadcast_object_list

from core.checkpoint.files import published_checkpoints, verify
from core.checkpoint.per_parameter import PerParameterState
from core.checkpoint.state import (
    EVALUATION,
    TrainerState,
    evaluated_metric,
    model_folder,
    pickled_format,
    read_trainer_state,
)
from core.checkpoint.universal import publish_universal, universal_folder, universal_load_repaired
from core.distributed import layout_of
from core.ema import WeightAverage
from core.errors import CheckpointError, PerParameterStateError, WeightAverageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumeSource:
    """The checkpoint a run resumes from and how it restores it, decided before its engine exists
    (`CheckpointResumer.source_of`) and carried out after (`CheckpointResumer.load`)."""

    path: str  # the checkpoint, verified
    saved: dict  # its trainer state
    saved_layout: str  # ddp, zero1/2/3 or fsdp
    state_folder: str  # the folder the model and optimizer come from: `path`, or its universal form
    how: Literal["native", "universal", "per_parameter"]  # accelerate's load, DeepSpeed's universal load, per parameter


class CheckpointResumer:
    """Finds, plans and loads the checkpoint a run resumes from; `root` is this run's checkpoints folder."""

    def __init__(self, accelerator: Accelerator, root: str, higher_is_better: bool = True):
        self.accelerator, self.root, self.higher_is_better = accelerator, root, higher_is_better

    def resolve(self, resume: str | None) -> str | None:
        """The checkpoint folder `--resume` means, verified; None for a fresh start. Rank 0 reads
        the files and every rank gets its answer, so all ranks resume from the same folder."""
        return _decided_on_main(self.accelerator, lambda: self._resolve_on_main(resume))

    def _resolve_on_main(self, resume: str | None) -> str | None:
        if resume is None:
            return None
        if resume == "auto":
            for _, path in reversed(published_checkpoints(self.root)):
                try:
                    verify(path)
                    return path
                except CheckpointError as e:
                    logger.warning("--resume auto: skipping %s, falling back to the previous checkpoint", e)
            return None
        if os.path.isdir(os.path.join(resume, "checkpoints")):  # a run folder: take its newest
            found = published_checkpoints(os.path.join(resume, "checkpoints"))
            if not found:
                raise CheckpointError(f"--resume {resume}: the run folder has no complete checkpoint")
            resume = found[-1][1]
        if not os.path.isdir(resume):
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        verify(resume)
        return resume

    def source_of(self, path: str, allow_pickle: bool) -> ResumeSource:
        """How this run restores `path` (verified by `resolve`), which may differ from the run that saved it:

        - the same layout (DDP or FSDP at any world size, ZeRO at the same one): `path` itself
          (FSDP's DCP files are resharded by torch.distributed.checkpoint on load);
        - ZeRO at another world size, same stage: its universal form (universal.py), loaded by
          DeepSpeed itself (`load_universal`, set here in the config before the engine exists);
        - across DDP, FSDP and ZeRO, or to another ZeRO stage: the DDP or FSDP folder, or the
          universal form of the ZeRO one, read by `load` as per-parameter state (per_parameter.py)."""
        saved = read_trainer_state(path)
        self._check_pickle_source(path, pickled_format(path), allow_pickle)
        saved_layout, layout = self._saved_layout(path, saved), layout_of(self.accelerator)
        world, saved_world = self.accelerator.num_processes, saved["world_size"]
        # DDP keeps whole tensors and FSDP's DCP files reshard on load: both resume at any world size.
        if saved_layout == layout and (layout in ("ddp", "fsdp") or saved_world == world):
            return ResumeSource(path, saved, saved_layout, state_folder=path, how="native")
        if saved.get("lora_base"):  # holds no frozen weight, which the conversions below need
            same = "strategy and world size" if saved_layout.startswith("zero") else "strategy"
            raise CheckpointError(
                f"{path} is a LoRA checkpoint of {saved_layout} on {saved_world} ranks: resume it under that "
                f"{same}, {_or_restart_from_weights(path)}"
            )
        if saved_layout in ("ddp", "fsdp"):
            logger.info(
                "%s was saved under %s: loading its state into %s by parameter name", path, saved_layout, layout
            )
            return ResumeSource(path, saved, saved_layout, state_folder=path, how="per_parameter")
        universal = universal_folder(path)
        _decided_on_main(self.accelerator, lambda: publish_universal(path, universal, saved_world, world))
        if saved_layout == layout:
            self.accelerator.state.deepspeed_plugin.deepspeed_config["checkpoint"] = {"load_universal": True}
            return ResumeSource(path, saved, saved_layout, state_folder=universal, how="universal")
        return ResumeSource(path, saved, saved_layout, state_folder=universal, how="per_parameter")

    def _saved_layout(self, path: str, saved: dict) -> str:
        if saved.get("layout"):
            return saved["layout"]
        fmt = pickled_format(path)  # a checkpoint from before the layout was recorded
        layout = layout_of(self.accelerator)
        if fmt == "DeepSpeed":
            return layout if layout.startswith("zero") else "zero"
        return "fsdp" if fmt == "FSDP" else "ddp"

    def _check_pickle_source(self, path: str, fmt: str | None, allow_pickle: bool) -> None:
        own = os.path.realpath(path).startswith(os.path.realpath(self.root) + os.sep)
        if fmt and not own and not allow_pickle:
            raise CheckpointError(
                f"{path} is a {fmt} checkpoint from outside this run's folder; its files are Python pickles "
                "and loading them runs code stored in them. If you trust it, set --checkpoint.allow_pickle true."
            )

    def load(
        self,
        source: ResumeSource,
        state: TrainerState,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: WeightAverage | None = None,
        optimizer_order: list[str] | None = None,
    ) -> None:
        """Carry out `source` (from `source_of`): the model and optimizer (as `accelerator.prepare`
        returned them) restored, the position into `state`, the weight average into `ema`.
        `optimizer_order` names the optimizer's parameters (per_parameter.py), for a checkpoint of
        another strategy."""
        path = source.path
        _restore_position(source, state)
        self._load_model_and_optimizer(source, model, optimizer, optimizer_order)
        self._check_rng_restored(path)
        # accelerate restores its micro-batch counter, which decides where an accumulation window
        # closes (`step % grad_accum_steps`), as the saving run left it: 5 after five steps of
        # accumulation 1 would close the first window of a run resumed with accumulation 2 after one
        # micro-batch and shift every later window by one, feeding each optimizer step other
        # samples. Within an epoch, an uninterrupted run's counter is the micro-batches it has done.
        self.accelerator.step = state.batches_in_epoch
        if ema is not None:
            try:
                ema.load(path)
            except WeightAverageError as e:
                raise CheckpointError(str(e)) from e
        if state.evaluation_due and os.path.isfile(os.path.join(path, EVALUATION)):
            state.note_evaluation(evaluated_metric(path), self.higher_is_better)
        logger.info("resumed from %s (epoch %d, step %d)", path, state.epoch, state.global_step)

    def _load_model_and_optimizer(
        self,
        source: ResumeSource,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        optimizer_order: list[str] | None,
    ) -> None:
        acc = self.accelerator
        if source.how == "native":
            # A LoRA checkpoint holds what trains; the frozen base is model.weights' (checked above).
            partial = {"load_module_strict": False} if source.saved_layout.startswith("zero") else {"strict": False}
            acc.load_state(source.path, **(partial if source.saved.get("lora_base") else {}))
            return
        if source.how == "universal":  # ZeRO at another world size
            with universal_load_repaired(optimizer):
                acc.load_state(source.state_folder)
            return
        # across DDP, FSDP and ZeRO, or another ZeRO stage
        if optimizer_order is None:
            raise ValueError("a checkpoint of another strategy needs the optimizer's parameter order")
        try:
            PerParameterState(model_folder(source.state_folder), optimizer_order).load_into(acc, model, optimizer)
        except PerParameterStateError as e:
            raise CheckpointError(
                f"{e}. Resume under {source.saved_layout}, {_or_restart_from_weights(source.path)}"
            ) from e
        load_accelerator_state(source.state_folder, [], [], [], [], acc.process_index)  # the RNG states
        logger.info(
            "loaded the %s state of %s into %s, parameter by parameter",
            source.saved_layout,
            source.path,
            layout_of(acc),
        )

    def _check_rng_restored(self, path: str) -> None:
        """accelerate logs a failed RNG restore at INFO and carries on; make it visible."""
        rank = self.accelerator.process_index
        if not os.path.isfile(os.path.join(path, f"random_states_{rank}.pkl")):
            logger.warning(
                "rank %d: %s has no saved RNG state for this rank; it continues from the seeded state", rank, path
            )


def _restore_position(source: ResumeSource, state: TrainerState) -> None:
    """The saved trainer state into `state`, its position carried over to this run's geometry;
    `state`'s layout and optimizer stay this run's (what its own saves are)."""
    path, saved = source.path, source.saved
    if saved.get("optimizer") and state.optimizer and saved["optimizer"] != state.optimizer:
        raise CheckpointError(
            f"{path} was saved with the {saved['optimizer']} optimizer and this run uses {state.optimizer}: "
            f"its state cannot continue in another optimizer. Use --optim.name as saved, "
            f"{_or_restart_from_weights(path)}"
        )
    if saved.get("lora_base") or state.lora_base:
        _check_same_lora(path, saved.get("lora_base"), state.lora_base)
    geometry = dict(
        world_size=state.world_size,
        micro_batch_size=state.micro_batch_size,
        grad_accum_steps=state.grad_accum_steps,
    )
    layout, optimizer, lora_base = state.layout, state.optimizer, state.lora_base
    for key, value in saved.items():
        setattr(state, key, value)
    state.layout, state.optimizer, state.lora_base = layout, optimizer, lora_base  # what this run's own saves are
    remap_position(state, **geometry)


def _check_same_lora(path: str, saved: dict | None, own: dict | None) -> None:
    """A LoRA checkpoint holds the adapters and head only: it resumes on the same base file (its
    SHA-256; the file may have moved) with the same adapters, or not at all."""
    if saved is None:
        raise CheckpointError(
            f"{path} is a full fine-tune's checkpoint, not a LoRA run's: export its weights (`shardvision export "
            f"{path} OUT`) and start the LoRA run from them with --model.weights OUT/model.safetensors"
        )
    if own is None:
        raise CheckpointError(
            f"{path} is a LoRA run's checkpoint (adapters on {saved['path']}): resume it with that file as "
            "model.weights and the model.lora_* settings it was saved with"
        )
    differ = [
        f"{key} {saved[key]!r} (this run: {own.get(key)!r})"
        for key in saved
        if key != "path" and saved[key] != own.get(key)
    ]
    if differ:
        raise CheckpointError(
            f"{path} is a LoRA run's checkpoint on {saved['path']} whose {'; '.join(differ)} differ from this "
            "run's: resume with its base file and model.lora_* settings"
        )


def remap_position(state: TrainerState, world_size: int, micro_batch_size: int, grad_accum_steps: int) -> None:
    """Carry the position in the epoch over to another number of ranks or micro-batch size.

    The data order is one permutation per epoch, cut into micro-batches that are dealt to the
    ranks in turn, so `batches x micro x ranks` samples are consumed whatever the geometry."""
    old = (state.world_size, state.micro_batch_size, state.grad_accum_steps)
    if old == (world_size, micro_batch_size, grad_accum_steps):
        return
    old_global = old[0] * old[1] * old[2]
    new_global = world_size * micro_batch_size * grad_accum_steps
    if old_global != new_global:
        logger.warning(
            "the global batch changes from %d to %d samples: the optimizer-step count and the lr schedule "
            "continue from step %d but no longer describe the same data",
            old_global,
            new_global,
            state.global_step,
        )
    consumed = state.batches_in_epoch * old[0] * old[1]
    windows, leftover = divmod(consumed, new_global)
    state.batches_in_epoch = windows * grad_accum_steps
    if leftover:
        logger.warning(
            "%d samples of epoch %d will be trained on again: the new geometry cannot stop where the old one did",
            leftover,
            state.epoch,
        )
    logger.info(
        "resuming a %d-rank checkpoint on %d ranks: %d samples of epoch %d already done",
        old[0],
        world_size,
        consumed - leftover,
        state.epoch,
    )
    state.world_size, state.micro_batch_size, state.grad_accum_steps = (
        world_size,
        micro_batch_size,
        grad_accum_steps,
    )


def _decided_on_main(accelerator: Accelerator, decide: Callable[[], Any]) -> Any:
    """`decide()` run by rank 0 alone, its answer (or its CheckpointError) given to every rank."""
    answer: list = [None]
    if accelerator.is_main_process:
        try:
            answer[0] = ("ok", decide())
        except CheckpointError as e:
            answer[0] = ("error", str(e))
    if accelerator.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    status, value = answer[0]
    if status == "error":
        raise CheckpointError(value)
    return value


def _or_restart_from_weights(path: str) -> str:
    """The way out when a checkpoint cannot be resumed here: its weights, without the optimizer."""
    return (
        f"or export its weights (`shardvision export {path} OUT --allow-pickle`) and start a new run from them "
        "with --weights OUT/model.safetensors (the optimizer state starts anew)."
    )
