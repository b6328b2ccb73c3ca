"""Data plumbing every recipe shares: per-sample seeded transforms and the DataLoader settings.

Random augmentations draw from a generator seeded by (seed, epoch, sample index), not from the
global RNG or the worker's. The same sample therefore gets the same augmentation whatever the
number of workers or ranks, and a run resumed in the middle of an epoch sees exactly the images an
uninterrupted run would have seen.

The epoch lives in shared memory, so persistent DataLoader workers (started once per run, not
once per epoch) see `set_epoch` too: a new epoch's indices reach the workers only after the
loader's next `iter()`, which comes after `set_epoch`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import shutil
import tempfile
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


class SeededTransforms(Dataset):
    """`transform(base[i])` under RNG state derived from (seed, epoch, i)."""

    def __init__(self, base: Dataset, transform: Callable[[Any], Any], seed: int = 0):
        self.base, self.transform, self.seed = base, transform, seed
        self._epoch = multiprocessing.RawValue("q", 0)  # shared with worker processes

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        sample = self.base[index]
        sample_seed = hash((self.seed, self.epoch, int(index))) % 2**63
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            torch.manual_seed(sample_seed)
            try:
                return self.transform(sample)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    collate_fn: Callable,
    pin_memory: bool,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory and torch.cuda.is_available(),
        drop_last=drop_last,
        # Workers live for the whole run: SeededTransforms shares its epoch with them.
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # A private generator: creating an iterator must not draw from the global RNG, or a
        # resumed run's dropout would drift from the uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )


@contextlib.contextmanager
def folder_written_once(root: str) -> Iterator[str]:
    """Yield a temporary folder beside `root`, renamed to `root` when the block succeeds.

    For generated data sets that every rank may build at the same moment: each writes its own
    copy, the first rename wins and the others are discarded, and a reader never sees a
    half-written `root`."""
    parent = os.path.dirname(root) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, root)
    except OSError:  # another rank published the same folder first
        shutil.rmtree(tmp, ignore_errors=True)
