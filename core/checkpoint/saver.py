"""Saving: when (`CheckpointSaver.maybe_save`), the save itself, its publication, and which
checkpoints are kept.

A checkpoint is written by every rank under `checkpoints/.tmp-<step>/` (`accelerator.save_state`
and the EMA's file(s)); once every rank's part is on disk, rank 0 adds the trainer state and the
manifest (core/checkpoint/files.py), then renames the folder to `checkpoints/<step>/`. With
checkpoint.async_save the state is first captured into host memory (background_save.py) and the
writing and publishing go on in a thread while training continues. Old checkpoints are pruned
after the new one is in place, never before, and never the newest. (accelerate's `total_limit`
deletes first, and DeepSpeed writes its `latest` pointer before its final barrier: neither is
relied on.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch.utils.serialization.config as serialization_config
from accelerate import Accelerator

from core.checkpoint.background_save import HeldFiles, HostBuffers, background_group, captured_writes
from core.checkpoint.files import (
    FAILED,
    WRITTEN,
    fsync_dir,
    published_checkpoints,
    wait_for_markers,
    write_manifest,
    write_marker,
)
from core.checkpoint.state import EVALUATION, TRAINER_STATE, TrainerState, evaluated_metric
from core.distributed import strategy_of
from core.ema import WeightAverage
from core.errors import CheckpointWriteError
from core.watchdog import HangWatchdog

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Saved:
    """A save, and what it cost the training loop: its wait, and the host memory a background
    save holds until it is written."""

    path: str  # the checkpoint folder (published once the background write is done)
    stall_s: float
    held_mb: float
    background: bool


class CheckpointSaver:
    """Decides when to save (`maybe_save`), saves, publishes and prunes the checkpoints under `root`."""

    def __init__(
        self,
        accelerator: Accelerator,
        root: str,
        keep_last: int,
        keep_best: int = 0,
        higher_is_better: bool = True,
        every_steps: int = 0,
        at_epoch_end: bool = True,
        watchdog: HangWatchdog | None = None,
        async_save: bool = False,
        only_trainable: bool = False,
    ):
        self.accelerator, self.root = accelerator, root
        self.keep_last, self.keep_best, self.higher_is_better = keep_last, keep_best, higher_is_better
        self.every_steps, self.at_epoch_end = every_steps, at_epoch_end
        self.watchdog = watchdog
        self.async_save = async_save
        self.last_saved_step: int | None = None
        self._pruning: threading.Thread | None = None
        self._writing: threading.Thread | None = None  # the save in flight (async_save), at most one
        self._host_buffers = HostBuffers()
        self._write_failure: BaseException | None = None
        self._background_group: Any = None
        self._save_kwargs: dict[str, Any] = {}
        if only_trainable:
            self._keep_only_trainable()

    def _keep_only_trainable(self) -> None:
        """A checkpoint holds the weights that train and not the frozen ones (a LoRA run's base,
        which the resumed run reads from model.weights again, its checksum checked:
        TrainerState.lora_base). DeepSpeed leaves them out itself; accelerate's own save is
        filtered. FSDP2's DCP shards keep every weight."""
        acc = self.accelerator
        if strategy_of(acc) == "deepspeed":
            self._save_kwargs = {"exclude_frozen_parameters": True}
            return
        if strategy_of(acc) == "fsdp":  # saved through DCP, past accelerate's hook
            return

        def drop_frozen(models: list, weights: list[dict], output_dir: str) -> None:
            for model, state_dict in zip(models, weights, strict=True):
                for name, param in model.named_parameters():
                    if not param.requires_grad:
                        state_dict.pop(name, None)

        acc.register_save_state_pre_hook(drop_frozen)

    def _dcp_group(self) -> Any:
        """FSDP2 writes its shards through DCP, whose collectives the background write makes on a
        group of their own (background_save.py); made at the first save, on every rank alike."""
        if strategy_of(self.accelerator) != "fsdp":
            return None
        if self._background_group is None:
            self._background_group = background_group()
        return self._background_group

    def resumed_at(self, step: int) -> None:
        """The run goes on from its checkpoint of `step`: that step is saved already, and the
        evaluation of its weights is recorded into it (`record_evaluation`)."""
        self.last_saved_step = step

    def due(self, step: int) -> bool:
        """checkpoint.every_steps asks for a save after this optimizer step."""
        return self.every_steps > 0 and step % self.every_steps == 0

    def maybe_save(
        self, state: TrainerState, ema: WeightAverage | None, *, epoch_end: bool = False, force: bool = False
    ) -> Saved | None:
        """Save if one is due: every `every_steps` optimizer steps, at an epoch's end (at_epoch_end),
        or when forced (a stop, the run's end: these also wait until it is published). A step
        already saved is not saved again. Called after every optimizer step, it is also where a
        background save that failed stops the run."""
        self.raise_if_write_failed()
        wanted = force or (self.at_epoch_end if epoch_end else self.due(state.global_step))
        if not wanted or self.last_saved_step == state.global_step:
            if force:
                self.wait()
            return None
        if self.watchdog is not None:
            self.watchdog.beat("checkpoint save", state.global_step)
        saved = self.save(state, ema)
        if force:
            self.wait()
        if self.watchdog is not None:
            self.watchdog.beat("train step", state.global_step)
        return saved

    def save(self, state: TrainerState, ema: WeightAverage | None = None) -> Saved:
        """Checkpoint `state.global_step` into `checkpoints/<step>/`. With async_save only the
        capture into host memory happens here (core/checkpoint/background_save.py); writing and
        publishing go on in the background, after the previous save in flight has finished."""
        self.wait()
        step = state.global_step
        final = os.path.join(self.root, str(step))
        tmp = os.path.join(self.root, f".tmp-{step}")
        acc = self.accelerator
        started = time.perf_counter()
        if acc.is_main_process:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        with (
            _without_crc32(),
            captured_writes(tmp, self._host_buffers, self._dcp_group())
            if self.async_save
            else contextlib.nullcontext() as held,
        ):
            acc.save_state(tmp, safe_serialization=True, **self._save_kwargs)
            if ema is not None:
                ema.save(tmp)
        trainer_state = json.dumps(dataclasses.asdict(state), indent=2)
        self.last_saved_step = step
        if held is None:
            acc.wait_for_everyone()  # every rank's shards are on disk before the folder is published
            if acc.is_main_process:
                self._publish(tmp, final, trainer_state)
            acc.wait_for_everyone()
            logger.info("saved checkpoint %s", final)
            return Saved(final, time.perf_counter() - started, 0.0, background=False)
        saved = Saved(final, time.perf_counter() - started, held.nbytes / 1e6, background=True)
        self._writing = threading.Thread(
            target=self._write_and_publish, args=(held, tmp, trainer_state, saved), name="checkpoint-write"
        )
        self._writing.start()
        return saved

    def _write_and_publish(self, held: HeldFiles, tmp: str, trainer_state: str, saved: Saved) -> None:
        """The background half of an asynchronous save: this rank's files, then on rank 0 the
        publish, once every rank's marker says its part is written."""
        acc, started, final = self.accelerator, time.perf_counter(), saved.path
        rank, world = acc.process_index, acc.num_processes
        try:
            with _without_crc32():  # as the capture would have written them
                held.write()
            write_marker(os.path.join(tmp, f"{WRITTEN}{rank}"), "")
            if acc.is_main_process:
                wait_for_markers(tmp, world)
                for r in range(world):
                    os.remove(os.path.join(tmp, f"{WRITTEN}{r}"))
                self._publish(tmp, final, trainer_state)
                logger.info(
                    "saved checkpoint %s in the background: training waited %.2f s, %.0f MB held in host memory, "
                    "written and published in %.2f s",
                    final,
                    saved.stall_s,
                    saved.held_mb,
                    time.perf_counter() - started,
                )
        except BaseException as e:
            with contextlib.suppress(OSError):
                write_marker(os.path.join(tmp, f"{FAILED}{rank}"), f"{type(e).__name__}: {e}")
            self._write_failure = CheckpointWriteError(
                f"rank {rank}: the background save of {final} failed ({type(e).__name__}: {e}); the newest "
                "published checkpoint is still whole"
            )
            self._write_failure.__cause__ = e

    def _publish(self, tmp: str, final: str, trainer_state: str) -> None:
        """Rank 0, once every rank's files are on disk: the trainer state and the manifest, the
        rename that makes the checkpoint visible, then retention."""
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            f.write(trainer_state)
        write_manifest(tmp)
        if os.path.exists(final):  # the same step saved again (e.g. a resumed run's epoch end)
            old = os.path.join(self.root, f".old-{os.path.basename(final)}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(self.root)
        self._prune(newest=final)

    def record_evaluation(self, step: int, primary: float | None, metrics: dict[str, float]) -> None:
        """Add the finished evaluation of checkpoint `step`'s weights to its folder (rank 0, once the
        checkpoint is published; written atomically), then apply keep_best, which ranks by it. The
        manifest does not list it: the checkpoint was whole before it, and is whole without it."""
        if self.last_saved_step != step:
            return  # the weights evaluated were not saved at this step
        self.wait()
        path = os.path.join(self.root, str(step))
        if not self.accelerator.is_main_process or not os.path.isdir(path):
            return  # (not a checkpoint of this run: resumed from another run's folder)
        tmp = os.path.join(path, f".{EVALUATION}.tmp")
        with open(tmp, "w") as f:
            json.dump({"step": step, "primary_metric": primary, "metrics": metrics}, f, indent=2)
        os.replace(tmp, os.path.join(path, EVALUATION))
        if self.keep_best:
            self._prune(newest=path)

    def raise_if_write_failed(self) -> None:
        """Stop the run if a background save has failed (checked after every optimizer step)."""
        if self._writing is not None and not self._writing.is_alive():
            self.wait()

    def wait(self) -> None:
        """Until the save in flight is published (rank 0) or this rank's part is written; raise
        CheckpointWriteError if it failed."""
        if self._writing is not None:
            self._writing.join()
            self._writing = None
        if self._write_failure is not None:
            failure, self._write_failure = self._write_failure, None
            raise failure

    def _prune(self, newest: str) -> None:
        """Unpublish what is no longer kept (a rename) and delete it in the background: deleting
        hundreds of MB costs a fifth of a save, and nothing needs to wait for it."""
        self.wait_for_pruning()
        complete = published_checkpoints(self.root)
        keep = {path for _, path in complete[-self.keep_last :]} | {newest}
        if self.keep_best:
            scored = []
            for _, path in complete:  # ranked by the evaluation of their own weights, where one finished
                metric = evaluated_metric(path)
                if metric is not None:
                    scored.append((metric, path))
            scored.sort(reverse=self.higher_is_better)
            keep |= {path for _, path in scored[: self.keep_best]}
        for step, path in complete:
            if path not in keep:
                os.replace(path, os.path.join(self.root, f".pruned-{step}"))
                universal = os.path.join(self.root, f"universal-{step}")
                if os.path.isdir(universal):
                    os.replace(universal, os.path.join(self.root, f".pruned-universal-{step}"))
        # leftovers of saves that crashed, and of deletions a crash interrupted
        doomed = [
            os.path.join(self.root, n) for n in os.listdir(self.root) if n.startswith((".tmp-", ".old-", ".pruned-"))
        ]
        if doomed:
            self._pruning = threading.Thread(target=_remove_all, args=(doomed,), name="checkpoint-prune")
            self._pruning.start()

    def close(self) -> None:
        """At the run's end, however it ends: the save in flight is finished (a failure is only
        logged here, the run is already ending) and old checkpoints are deleted."""
        try:
            self.wait()
        except CheckpointWriteError as e:
            logger.error("%s", e)
        self._host_buffers = HostBuffers()  # the memory kept for the next background save
        self.wait_for_pruning()

    def wait_for_pruning(self) -> None:
        """Block until old checkpoints are deleted (the run's end waits for it too)."""
        if self._pruning is not None:
            self._pruning.join()
            self._pruning = None


def _without_crc32() -> contextlib.AbstractContextManager:
    """The manifest's xxh3 sums already guard every byte, so torch.save (accelerate's optimizer
    and RNG files, DeepSpeed's shards) need not CRC-32 each record too: that CRC costs about a
    third of the save (benchmarks/checkpoint_bandwidth.py)."""
    # patch() is added to the module at import time, where mypy cannot see it.
    return serialization_config.patch({"save.compute_crc32": False})  # type: ignore[attr-defined]


def _remove_all(paths: list[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
