"""Checkpoints: `accelerator.save_state` into `<output_dir>/checkpoints/<step>/`, made visible only
when complete, plus the trainer's own position so a resumed run continues where it stopped.

A checkpoint is written under `checkpoints/.tmp-<step>/` by every rank; after a barrier rank 0
adds the trainer state and a manifest of every file with its size and checksum, then renames the
folder to `checkpoints/<step>/`. A crash during a save therefore leaves at most a `.tmp-*` folder,
which is ignored and later removed; `--resume auto` only considers published checkpoints, checks
them against their manifest and falls back to the previous one if the newest is damaged. Old
checkpoints are pruned after the new one is in place, never before, and never the newest.
(accelerate's `total_limit` deletes first, and DeepSpeed writes its `latest` pointer before its
final barrier: neither is relied on.) The folder must be on a filesystem all ranks share.

The trainer state is JSON and the EMA weights are safetensors: nothing of shardvision's is pickled.
accelerate reads its own files with `weights_only=True`; DeepSpeed and FSDP checkpoints are
pickles and are loaded only from this run's own folder unless `checkpoint.allow_pickle` is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import mmap
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.utils.serialization.config as serialization_config
import xxhash
from accelerate import Accelerator
from accelerate.checkpointing import load_accelerator_state
from accelerate.utils import broadcast_object_list, gather_object

from core.background_save import HeldFiles, HostBuffers, captured_writes
from core.distributed import layout_of
from core.ema import WeightAverage, WeightAverageError
from core.optim import innermost_optimizer
from core.portable import PortableState, PortableStateError
from core.watchdog import HangWatchdog

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
EVALUATION = "evaluation.json"  # the evaluation of a checkpoint's own weights, added once it has finished
DEEPSPEED_TAG = "pytorch_model"  # the folder (DeepSpeed's checkpoint tag) accelerate saves ZeRO shards in
WRITTEN, FAILED = ".written-rank", ".failed-rank"  # an asynchronous save's markers, one per rank
PICKLED_FORMATS = {DEEPSPEED_TAG: "DeepSpeed", "pytorch_model_fsdp_0": "FSDP"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder or file at fault."""


@dataclass(frozen=True)
class Saved:
    """A save, and what it cost the training loop: its wait, and the host memory a background
    save holds until it is written."""

    path: str  # the checkpoint folder (published once the background write is done)
    stall_s: float
    held_mb: float
    background: bool


class CheckpointWriteError(RuntimeError):
    """A background save that could not be written (disk full, permissions): the run stops."""


@dataclass(frozen=True)
class ResumePlan:
    """How a run restores a checkpoint, decided before its engine exists (`CheckpointManager.plan`)
    and carried out after (`CheckpointManager.load`)."""

    path: str  # the checkpoint, verified
    saved: dict  # its trainer state
    saved_layout: str  # ddp, zero1/2/3 or fsdp
    source: str  # the folder the model and optimizer come from: `path`, or its universal form
    how: Literal["native", "universal", "portable"]  # accelerate's load, DeepSpeed's universal load, per parameter


@dataclass
class TrainerState:
    epoch: int = 0  # the epoch in progress
    batches_in_epoch: int = 0  # micro-batches of `epoch` already trained on (per rank)
    global_step: int = 0  # optimizer steps taken since the start of the run
    skipped_steps: int = 0  # optimizer steps dropped for a non-finite loss
    best_metric: float | None = None
    best_step: int | None = None
    eval_metric: float | None = None  # the primary metric of the latest evaluation
    # An epoch-end checkpoint is written before the epoch's evaluation, so that a stop during a long
    # evaluation loses nothing; a run resumed from it evaluates first, unless EVALUATION says it finished.
    evaluation_due: bool = False
    world_size: int = 1  # the geometry the position was recorded under
    micro_batch_size: int = 0
    grad_accum_steps: int = 1
    layout: str = ""  # how model and optimizer state are stored: ddp, zero1/2/3 or fsdp ("": saved before it was kept)
    optimizer: str = ""  # the optimizer's class name

    def note_evaluation(self, primary: float | None, higher_is_better: bool) -> None:
        """The evaluation at this step is done: its primary metric, and the best so far."""
        self.evaluation_due = False
        self.eval_metric = primary
        if primary is None:
            return
        if self.best_metric is None or (primary > self.best_metric if higher_is_better else primary < self.best_metric):
            self.best_metric, self.best_step = primary, self.global_step


def _checksum(path: str) -> str:
    """xxh3-64 of the file, hashed straight from the page cache through mmap (about 18 GB/s
    here, 3x a read loop): checking a checkpoint costs little next to writing it."""
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
                digest.update(view)
    return digest.hexdigest()


def _fsync_and_checksum(path: str) -> str:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return _checksum(path)


def verify(path: str) -> None:
    """Raise CheckpointError unless every file in the manifest is there, whole and unchanged."""
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        raise CheckpointError(f"{path} is not a complete shardvision checkpoint: {MANIFEST} is missing")
    with open(manifest) as f:
        files = json.load(f)["files"]
    for rel, expected in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"{path}: {rel} is listed in {MANIFEST} but missing")
        if os.path.getsize(full) != expected["bytes"]:
            raise CheckpointError(
                f"{path}: {rel} has {os.path.getsize(full)} bytes, {MANIFEST} says {expected['bytes']}"
            )
        if _checksum(full) != expected["xxh3_64"]:
            raise CheckpointError(f"{path}: {rel} is damaged (its checksum differs from {MANIFEST})")


def _evaluated_metric(path: str) -> float | None:
    """The primary metric of checkpoint `path`'s own evaluation, None if none finished."""
    try:
        with open(os.path.join(path, EVALUATION)) as f:
            return json.load(f)["primary_metric"]
    except FileNotFoundError:
        return None


def pickled_format(path: str) -> str | None:
    """'DeepSpeed' or 'FSDP' when the checkpoint's model state is stored as Python pickles."""
    return next((fmt for sub, fmt in PICKLED_FORMATS.items() if os.path.isdir(os.path.join(path, sub))), None)


class CheckpointManager:
    """Decides when to save (`maybe_save`), saves, resumes and prunes the checkpoints under `root`."""

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

    def check_shared(self) -> None:
        """Stop at the start, on every rank, if some rank cannot see what rank 0 writes in the run
        folder that holds `root`. Every rank writes its part of a checkpoint there and rank 0
        publishes it, so a folder local to each machine would otherwise end in a wait for files
        that never appear, or a checkpoint holding one machine's shards."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return
        token = [uuid.uuid4().hex]
        broadcast_object_list(token, from_process=0)
        run_folder = os.path.dirname(self.root)
        probe = os.path.join(run_folder, f".shared-{token[0]}")
        if acc.is_main_process:
            os.makedirs(run_folder, exist_ok=True)
            open(probe, "w").close()
        acc.wait_for_everyone()
        blind = gather_object([] if os.path.exists(probe) else [f"rank {acc.process_index} on {socket.gethostname()}"])
        acc.wait_for_everyone()
        if acc.is_main_process:
            os.remove(probe)
        if blind:
            raise CheckpointError(
                f"{run_folder} is not on a filesystem every rank shares: {', '.join(blind)} cannot see the file rank 0 "
                "wrote there. Every rank writes its part of each checkpoint into it and rank 0 publishes it: set "
                "--output-dir to a shared filesystem (NFS, Lustre, GPFS, ...) that every node mounts at the same path."
            )

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

    def complete(self) -> list[tuple[int, str]]:
        """(step, path) of every published checkpoint, oldest first."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name.isdigit() and os.path.isfile(os.path.join(path, MANIFEST)):
                found.append((int(name), path))
        return sorted(found)

    def resolve(self, resume: str | None) -> str | None:
        """The checkpoint folder `--resume` means, verified; None for a fresh start. Rank 0 reads
        the files and every rank gets its answer, so all ranks resume from the same folder."""
        return self._decided_on_main(lambda: self._resolve_on_main(resume))

    def _decided_on_main(self, decide: Callable[[], Any]) -> Any:
        """`decide()` run by rank 0 alone, its answer (or its CheckpointError) given to every rank."""
        answer: list = [None]
        if self.accelerator.is_main_process:
            try:
                answer[0] = ("ok", decide())
            except CheckpointError as e:
                answer[0] = ("error", str(e))
        if self.accelerator.num_processes > 1:
            broadcast_object_list(answer, from_process=0)
        status, value = answer[0]
        if status == "error":
            raise CheckpointError(value)
        return value

    def _resolve_on_main(self, resume: str | None) -> str | None:
        if resume is None:
            return None
        if resume == "auto":
            for _, path in reversed(self.complete()):
                try:
                    verify(path)
                    return path
                except CheckpointError as e:
                    logger.warning("--resume auto: skipping %s, falling back to the previous checkpoint", e)
            return None
        if os.path.isdir(os.path.join(resume, "checkpoints")):  # a run folder: take its newest
            found = CheckpointManager(self.accelerator, os.path.join(resume, "checkpoints"), 1).complete()
            if not found:
                raise CheckpointError(f"--resume {resume}: the run folder has no complete checkpoint")
            resume = found[-1][1]
        if not os.path.isdir(resume):
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        verify(resume)
        return resume

    def save(self, state: TrainerState, ema: WeightAverage | None = None) -> Saved:
        """Checkpoint `state.global_step` into `checkpoints/<step>/`. With async_save only the
        capture into host memory happens here (core/background_save.py); writing and publishing
        go on in the background, after the previous save in flight has finished."""
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
            captured_writes(tmp, self._host_buffers) if self.async_save else contextlib.nullcontext() as held,
        ):
            acc.save_state(tmp, safe_serialization=True)
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
            _write_marker(os.path.join(tmp, f"{WRITTEN}{rank}"), "")
            if acc.is_main_process:
                _wait_for_markers(tmp, world)
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
                _write_marker(os.path.join(tmp, f"{FAILED}{rank}"), f"{type(e).__name__}: {e}")
            self._write_failure = CheckpointWriteError(
                f"rank {rank}: the background save of {final} failed ({type(e).__name__}: {e}); the newest "
                "published checkpoint is still whole"
            )
            self._write_failure.__cause__ = e

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

    def _publish(self, tmp: str, final: str, trainer_state: str) -> None:
        """Rank 0, once every rank's files are on disk: the trainer state and the manifest, the
        rename that makes the checkpoint visible, then retention."""
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
            f.write(trainer_state)
        self._write_manifest(tmp)
        if os.path.exists(final):  # the same step saved again (e.g. a resumed run's epoch end)
            old = os.path.join(self.root, f".old-{os.path.basename(final)}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.root)
        self._prune(newest=final)

    def plan(self, path: str, allow_pickle: bool) -> ResumePlan:
        """How this run restores `path` (verified by `resolve`), which may differ from the run that saved it:

        - the same layout (DDP at any world size, ZeRO or FSDP at the same one): `path` itself;
        - ZeRO at another world size, same stage: its universal form (DeepSpeed's layout of one file
          per parameter and state), loaded by DeepSpeed itself (`load_universal`, set here in the
          config before the engine exists);
        - across DDP and ZeRO, or to another ZeRO stage: the DDP folder, or the universal form of the
          ZeRO one, read by `load` as portable per-parameter state (core/portable.py).

        The universal form is converted once by rank 0 into `universal-<step>/` beside the
        checkpoint, published atomically with a manifest like a save, and reused by later resumes;
        the original is never touched."""
        saved = self._saved_state(path)
        self._check_pickle_source(path, pickled_format(path), allow_pickle)
        saved_layout, layout = self._saved_layout(path, saved), layout_of(self.accelerator)
        world, saved_world = self.accelerator.num_processes, saved["world_size"]
        if saved_layout == layout and (layout == "ddp" or saved_world == world):
            return ResumePlan(path, saved, saved_layout, source=path, how="native")
        if "fsdp" in (saved_layout, layout):
            raise CheckpointError(
                f"{path} was saved under {saved_layout} on {saved_world} ranks and this run is {layout} on {world}: "
                f"FSDP checkpoints resume only as they were saved here. Resume under {saved_layout} on {saved_world} "
                f"ranks, {_or_restart_from_weights(path)}"
            )
        if saved_layout == "ddp":
            logger.info("%s was saved under DDP: loading its state into %s by parameter name", path, layout)
            return ResumePlan(path, saved, saved_layout, source=path, how="portable")
        universal = os.path.join(os.path.dirname(path), f"universal-{os.path.basename(path)}")
        self._decided_on_main(lambda: self._publish_universal(path, universal, saved_world))
        if saved_layout == layout:
            self.accelerator.state.deepspeed_plugin.deepspeed_config["checkpoint"] = {"load_universal": True}
            return ResumePlan(path, saved, saved_layout, source=universal, how="universal")
        return ResumePlan(path, saved, saved_layout, source=universal, how="portable")

    def _saved_layout(self, path: str, saved: dict) -> str:
        if saved.get("layout"):
            return saved["layout"]
        fmt = pickled_format(path)  # a checkpoint from before the layout was recorded
        layout = layout_of(self.accelerator)
        if fmt == "DeepSpeed":
            return layout if layout.startswith("zero") else "zero"
        return "fsdp" if fmt == "FSDP" else "ddp"

    def _publish_universal(self, path: str, universal: str, saved_world: int) -> None:
        try:
            verify(universal)
            logger.info("%s: reusing its universal form %s", path, universal)
            return
        except CheckpointError:
            pass  # absent, or left damaged by a crash: convert again
        tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(universal)}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        logger.info(
            "%s was saved by %d ranks, this run has %d: converting its ZeRO shards to DeepSpeed's universal "
            "checkpoint in %s (once; the original stays as it is)",
            path,
            saved_world,
            self.accelerator.num_processes,
            universal,
        )
        convert = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            os.path.join(path, DEEPSPEED_TAG),
            "--output_folder",
            os.path.join(tmp, DEEPSPEED_TAG),
            # accelerate's ZeRO-1/2 saves lack the parameter layout the converter wants; it can infer it
            "--inject_missing_state",
            "--num_extract_workers",
            "2",
            "--num_merge_workers",
            "1",
        ]
        proc = subprocess.run(convert, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"{path}: DeepSpeed's universal-checkpoint conversion failed (exit {proc.returncode}); resume on "
                f"{saved_world} ranks instead. Its output ends with:\n{proc.stderr[-2000:] or proc.stdout[-2000:]}"
            )
        for name in os.listdir(path):  # everything else accelerate and shardvision keep: RNG, trainer state, EMA
            if name not in (DEEPSPEED_TAG, MANIFEST) and os.path.isfile(os.path.join(path, name)):
                shutil.copy2(os.path.join(path, name), os.path.join(tmp, name))
        self._write_manifest(tmp)
        shutil.rmtree(universal, ignore_errors=True)
        os.replace(tmp, universal)
        _fsync_dir(os.path.dirname(universal))

    def load(
        self,
        plan: ResumePlan,
        state: TrainerState,
        ema: WeightAverage | None = None,
        optimizer_order: list[str] | None = None,
    ) -> None:
        """Carry out `plan` (from `plan()`): the model and optimizer into the accelerator, the
        position into `state`, the weight average into `ema`. `optimizer_order` names the
        optimizer's parameters (core/portable.py), for a checkpoint of another strategy."""
        path, saved = plan.path, plan.saved
        if saved.get("optimizer") and state.optimizer and saved["optimizer"] != state.optimizer:
            raise CheckpointError(
                f"{path} was saved with the {saved['optimizer']} optimizer and this run uses {state.optimizer}: "
                f"its state cannot continue in another optimizer. Use --optim.name as saved, "
                f"{_or_restart_from_weights(path)}"
            )
        geometry = dict(
            world_size=state.world_size,
            micro_batch_size=state.micro_batch_size,
            grad_accum_steps=state.grad_accum_steps,
        )
        layout, optimizer = state.layout, state.optimizer
        for key, value in saved.items():
            setattr(state, key, value)
        state.layout, state.optimizer = layout, optimizer  # what this run's own saves are
        self._remap_position(state, **geometry)

        if plan.how == "native":
            self.accelerator.load_state(path)
        elif plan.how == "universal":  # ZeRO at another world size
            with _universal_load_repaired(self.accelerator):
                self.accelerator.load_state(plan.source)
        else:  # DDP <-> ZeRO, or another ZeRO stage
            if optimizer_order is None:
                raise ValueError("a checkpoint of another strategy needs the optimizer's parameter order")
            try:
                PortableState(_model_folder(plan.source), optimizer_order).load_into(
                    self.accelerator, self.accelerator._models[0], self.accelerator._optimizers[0]
                )
            except PortableStateError as e:
                raise CheckpointError(f"{e}. Resume under {plan.saved_layout}, {_or_restart_from_weights(path)}") from e
            load_accelerator_state(plan.source, [], [], [], [], self.accelerator.process_index)  # the RNG states
            logger.info(
                "loaded the %s state of %s into %s, parameter by parameter",
                plan.saved_layout,
                path,
                layout_of(self.accelerator),
            )
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
        self.last_saved_step = state.global_step
        if state.evaluation_due and os.path.isfile(os.path.join(path, EVALUATION)):
            state.note_evaluation(_evaluated_metric(path), self.higher_is_better)
        logger.info("resumed from %s (epoch %d, step %d)", path, state.epoch, state.global_step)

    def _saved_state(self, path: str) -> dict:
        with open(os.path.join(path, TRAINER_STATE)) as f:
            saved = json.load(f)
        unknown = set(saved) - {f.name for f in dataclasses.fields(TrainerState)}
        if unknown:
            raise CheckpointError(f"{path}/{TRAINER_STATE}: unknown fields {sorted(unknown)}")
        return saved

    def _check_pickle_source(self, path: str, fmt: str | None, allow_pickle: bool) -> None:
        own = os.path.realpath(path).startswith(os.path.realpath(self.root) + os.sep)
        if fmt and not own and not allow_pickle:
            raise CheckpointError(
                f"{path} is a {fmt} checkpoint from outside this run's folder; its files are Python pickles "
                "and loading them runs code stored in them. If you trust it, set --checkpoint.allow_pickle true."
            )

    def _remap_position(
        self, state: TrainerState, world_size: int, micro_batch_size: int, grad_accum_steps: int
    ) -> None:
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

    def _check_rng_restored(self, path: str) -> None:
        """accelerate logs a failed RNG restore at INFO and carries on; make it visible."""
        rank = self.accelerator.process_index
        if not os.path.isfile(os.path.join(path, f"random_states_{rank}.pkl")):
            logger.warning(
                "rank %d: %s has no saved RNG state for this rank; it continues from the seeded state", rank, path
            )

    def _write_manifest(self, folder: str) -> None:
        paths = [os.path.join(d, name) for d, _, names in os.walk(folder) for name in names]
        # fsync and xxh3 release the GIL: overlapping them across files hides most of their cost.
        with ThreadPoolExecutor(max_workers=4) as pool:
            sums = list(pool.map(_fsync_and_checksum, paths))
        files = {
            os.path.relpath(p, folder): {"bytes": os.path.getsize(p), "xxh3_64": digest}
            for p, digest in zip(paths, sums, strict=True)
        }
        path = os.path.join(folder, MANIFEST)
        with open(path, "w") as f:
            json.dump({"files": files}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())

    def _prune(self, newest: str) -> None:
        """Unpublish what is no longer kept (a rename) and delete it in the background: deleting
        hundreds of MB costs a fifth of a save, and nothing needs to wait for it."""
        self.wait_for_pruning()
        complete = self.complete()
        keep = {path for _, path in complete[-self.keep_last :]} | {newest}
        if self.keep_best:
            scored = []
            for _, path in complete:  # ranked by the evaluation of their own weights, where one finished
                metric = _evaluated_metric(path)
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


@contextlib.contextmanager
def _universal_load_repaired(acc: Accelerator) -> Iterator[None]:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load (0.19.8): it copies the first param
    group's settings (weight decay, lr) into every group, so the no-weight-decay group (biases,
    norms) would decay like the weights; and it gives every flat partition the same `step` tensor
    object, which a fused or foreach Adam then increments once per partition on each step, so the
    bias correction runs ahead. Harmless where the load is already right (ZeRO-1/2)."""
    optimizers = [innermost_optimizer(optimizer) for optimizer in acc._optimizers]
    kept = [[{k: v for k, v in group.items() if k != "params"} for group in o.param_groups] for o in optimizers]
    yield
    for optimizer, groups in zip(optimizers, kept, strict=True):
        for group, settings in zip(optimizer.param_groups, groups, strict=True):
            group.update(settings)
        for state in optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _model_folder(folder: str) -> str:
    """Where a checkpoint keeps its model and optimizer state: DeepSpeed one level down, under its tag."""
    tagged = os.path.join(folder, DEEPSPEED_TAG)
    return tagged if os.path.isdir(tagged) else folder


def _or_restart_from_weights(path: str) -> str:
    """The way out when a checkpoint cannot be resumed here: its weights, without the optimizer."""
    return (
        f"or export its weights (`shardvision export {path} OUT --allow-pickle`) and start a new run from them "
        "with --weights OUT/model.safetensors (the optimizer state starts anew)."
    )


def _without_crc32() -> contextlib.AbstractContextManager:
    """The manifest's xxh3 sums already guard every byte, so torch.save (accelerate's optimizer
    and RNG files, DeepSpeed's shards) need not CRC-32 each record too: that CRC costs about a
    third of the save (benchmarks/checkpoint_bandwidth.py)."""
    # patch() is added to the module at import time, where mypy cannot see it.
    return serialization_config.patch({"save.compute_crc32": False})  # type: ignore[attr-defined]


def _write_marker(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _wait_for_markers(tmp: str, world: int) -> None:
    """Until every rank has written its part of an asynchronous save into `tmp` (a marker each,
    on the filesystem all ranks share); a rank's failure marker ends the wait with its reason."""
    while True:
        names = set(os.listdir(tmp))
        failed = sorted(n for n in names if n.startswith(FAILED))
        if failed:
            with open(os.path.join(tmp, failed[0])) as f:
                raise CheckpointWriteError(
                    f"rank {failed[0].removeprefix(FAILED)} could not write its part: {f.read()}"
                )
        if all(f"{WRITTEN}{r}" in names for r in range(world)):
            return
        time.sleep(0.05)


def _remove_all(paths: list[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
