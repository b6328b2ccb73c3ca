"""DeepSpeed's universal checkpoint: a ZeRO checkpoint rewritten as one file per parameter and
state, whatever the stage and world size that saved it, so that it resumes at another world size
(DeepSpeed's `load_universal`) or under another strategy (per_parameter.py).

It is converted once, by rank 0, with DeepSpeed's own `ds_to_universal` into `universal-<step>/`
beside the checkpoint, published as a save is (a manifest, then a rename), and reused by later
resumes; the original is never touched."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import torch

from core.checkpoint.files import MANIFEST, fsync_dir, verify, write_manifest
from core.checkpoint.state import DEEPSPEED_TAG
from core.errors import CheckpointError
from core.optim import innermost_optimizer

logger = logging.getLogger(__name__)


def universal_folder(path: str) -> str:
    """Where checkpoint `path`'s universal form is kept: `universal-<step>/` beside it."""
    return os.path.join(os.path.dirname(path), f"universal-{os.path.basename(path)}")


def publish_universal(path: str, universal: str, saved_world: int, world: int) -> None:
    """Convert ZeRO checkpoint `path` (saved by `saved_world` ranks) into `universal`, unless an
    intact conversion is there already (rank 0 alone)."""
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
        world,
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
    write_manifest(tmp)
    shutil.rmtree(universal, ignore_errors=True)
    os.replace(tmp, universal)
    fsync_dir(os.path.dirname(universal))


@contextlib.contextmanager
def universal_load_repaired(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load (0.19.8) into `optimizer`: it copies
    the first param group's settings (weight decay, lr) into every group, so the no-weight-decay
    group (biases, norms) would decay like the weights; and it gives every flat partition the same
    `step` tensor object, which a fused or foreach Adam then increments once per partition on each
    step, so the bias correction runs ahead. Harmless where the load is already right (ZeRO-1/2)."""
    inner = innermost_optimizer(optimizer)
    kept = [{k: v for k, v in group.items() if k != "params"} for group in inner.param_groups]
    yield
    for group, settings in zip(inner.param_groups, kept, strict=True):
        group.update(settings)
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()
