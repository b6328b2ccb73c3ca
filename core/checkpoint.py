"""Checkpoints: `accelerator.save_state` into `<output_dir>/checkpoints/<step>/`, made visible only
when complete, plus the trainer's own position so a resumed run continues where it stopped.

A checkpoint is written under `checkpoints/.tmp-<step>/` by every rank, then rank 0 adds the
trainer state and a manifest of every file with its size, and only then renames the folder to
`checkpoints/<step>/`. A crash during a save therefore leaves at most a `.tmp-*` folder, which is
ignored and later removed; `--resume auto` only ever sees complete checkpoints. Old checkpoints
are pruned after the new one is in place, never before. (The folder must be on a filesystem all
ranks share, as usual for multi-node runs.)

The trainer state is JSON and the EMA weights are safetensors: nothing of shardvision's is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
EMA_WEIGHTS = "ema.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder or file at fault."""


@dataclass
class TrainerState:
    epoch: int = 0  # the epoch in progress
    batches_in_epoch: int = 0  # micro-batches of `epoch` already trained on (per rank)
    global_step: int = 0  # optimizer steps taken since the start of the run
    skipped_steps: int = 0  # optimizer steps dropped for a non-finite loss
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    world_size: int = 1  # the geometry the position was recorded under
    micro_batch_size: int = 0
    grad_accum_steps: int = 1


class CheckpointManager:
    def __init__(self, accelerator: Accelerator, root: str, keep_last: int):
        self.accelerator, self.root, self.keep_last = accelerator, root, keep_last
        self.last_saved_step: Optional[int] = None

    def complete(self) -> list[tuple[int, str]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name.isdigit() and os.path.isfile(os.path.join(path, MANIFEST)):
                found.append((int(name), path))
        return sorted(found)

    def resolve(self, resume: Optional[str]) -> Optional[str]:
        """The checkpoint folder `--resume` points at; None for a fresh start."""
        if resume is None:
            return None
        if resume == "auto":
            found = self.complete()
            return found[-1][1] if found else None
        if os.path.isdir(os.path.join(resume, "checkpoints")):  # a run folder: take its newest
            found = CheckpointManager(self.accelerator, os.path.join(resume, "checkpoints"), 1).complete()
            if not found:
                raise CheckpointError(f"--resume {resume}: the run folder has no complete checkpoint")
            return found[-1][1]
        if not os.path.isdir(resume):
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        return resume

    def save(self, state: TrainerState, ema: Optional[torch.nn.Module] = None) -> str:
        step = state.global_step
        final = os.path.join(self.root, str(step))
        tmp = os.path.join(self.root, f".tmp-{step}")
        acc = self.accelerator
        if acc.is_main_process:
            os.makedirs(self.root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(tmp, safe_serialization=True)
        acc.wait_for_everyone()  # every rank's shards are on disk before the folder is published
        if acc.is_main_process:
            with open(os.path.join(tmp, TRAINER_STATE), "w") as f:
                json.dump(dataclasses.asdict(state), f, indent=2)
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, os.path.join(tmp, EMA_WEIGHTS))
            self._write_manifest(tmp)
            if os.path.exists(final):  # the same step saved again (e.g. a resumed run's epoch end)
                old = os.path.join(self.root, f".old-{step}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune(keep=final)
        acc.wait_for_everyone()
        self.last_saved_step = step
        logger.info("saved checkpoint %s", final)
        return final

    def load(self, path: str, state: TrainerState, ema: Optional[torch.nn.Module] = None) -> None:
        self.verify(path)
        with open(os.path.join(path, TRAINER_STATE)) as f:
            saved = json.load(f)
        unknown = set(saved) - {f.name for f in dataclasses.fields(TrainerState)}
        if unknown:
            raise CheckpointError(f"{path}/{TRAINER_STATE}: unknown fields {sorted(unknown)}")
        for key, value in saved.items():
            setattr(state, key, value)
        world = self.accelerator.num_processes
        if state.world_size != world and state.batches_in_epoch > 0:
            raise CheckpointError(
                f"{path} was saved mid-epoch by {state.world_size} ranks; resuming it on {world} ranks "
                "cannot place the data position. Resume with the same number of ranks."
            )
        self.accelerator.load_state(path)
        if ema is not None:
            ema_file = os.path.join(path, EMA_WEIGHTS)
            if not os.path.isfile(ema_file):
                raise CheckpointError(f"{path}: the run uses EMA but the checkpoint has no {EMA_WEIGHTS}")
            ema.load_state_dict(load_file(ema_file, device="cpu"))
        self.last_saved_step = state.global_step
        logger.info("resumed from %s (epoch %d, step %d)", path, state.epoch, state.global_step)

    def verify(self, path: str) -> None:
        manifest = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest):
            raise CheckpointError(f"{path} is not a complete shardvision checkpoint: {MANIFEST} is missing")
        with open(manifest) as f:
            files = json.load(f)["files"]
        for rel, size in files.items():
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                raise CheckpointError(f"{path}: {rel} is listed in {MANIFEST} but missing")
            if os.path.getsize(full) != size:
                raise CheckpointError(f"{path}: {rel} has {os.path.getsize(full)} bytes, {MANIFEST} says {size}")

    def _write_manifest(self, folder: str) -> None:
        files = {}
        for dirpath, _, names in os.walk(folder):
            for name in names:
                full = os.path.join(dirpath, name)
                with open(full, "rb") as f:
                    os.fsync(f.fileno())
                files[os.path.relpath(full, folder)] = os.path.getsize(full)
        path = os.path.join(folder, MANIFEST)
        with open(path, "w") as f:
            json.dump({"files": files}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())

    def _prune(self, keep: str) -> None:
        complete = self.complete()
        for _, path in complete[: max(0, len(complete) - self.keep_last)]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.root):  # leftovers of saves that crashed
            if name.startswith((".tmp-", ".old-")) and os.path.join(self.root, name) != keep:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
