"""Data plumbing every recipe shares: per-sample seeded transforms and the DataLoader settings.

Random augmentations draw from a generator seeded by (seed, epoch, sample index), not from the
global RNG or the worker's. The same sample therefore gets the same augmentation whatever the
number of workers or ranks, and a run resumed in the middle of an epoch sees exactly the images an
uninterrupted run would have seen.

The epoch lives in shared memory, so persistent DataLoader workers (started once per run, not
once per epoch) see `set_epoch` too: a new epoch's indices reach the workers only after the
loader's next `iter()`, which comes after `set_epoch`.

Bad samples (unreadable, truncated or empty files, mask values outside the classes, ...) are a
`DataError` naming the file, raised by the recipe's reader. `GuardedSamples` catches it where it
happens, inside a loader worker, and hands the trainer a `SampleReport` with the batch instead of
an exception (which the DataLoader would re-raise wrapped in a worker traceback). A bad sample's
place in the batch is taken by the next readable one, so every rank keeps the same number of
batches of the same size whatever it skips; the trainer then either stops every rank together
(`data.bad_samples: error`) or records the sample and carries on (`skip`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import multiprocessing
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from core.errors import DataError

logger = logging.getLogger(__name__)

# How many following samples may stand in for a bad one before the data set is declared broken.
MAX_SUBSTITUTES = 16


# What PIL (and `datasets`, which decodes with it) raises for a damaged or unreadable file.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def decode_failure(error: Exception) -> str:
    """The decoder's message without object addresses ('<_io.BytesIO object at 0x...>'), so the
    same damaged sample reads the same every time it is met."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(error))


def read_image(path: str | bytes, name: str = "") -> Image.Image:
    """An RGB image from a file or from a file's bytes (named `name`), or a DataError naming it:
    missing, empty, truncated or not an image."""
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
            return img.convert("RGB")
    except DECODE_ERRORS as e:
        raise DataError(f"{_named(path, name)}: cannot read image ({decode_failure(e)})") from None


def read_image_tensor(path: str | bytes, name: str = "") -> torch.Tensor:
    """read_image as a uint8 RGB tensor (C, H, W), decoded by torchvision.io (libjpeg-turbo,
    libpng, libwebp; other formats, BMP or TIFF, by PIL): a DataError naming the file or sample
    when it cannot be read."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import pil_to_tensor, to_dtype

    try:
        if isinstance(path, str):
            with open(path, "rb") as f:
                data = f.read()
        else:
            data = path
        if data[:3] != b"\xff\xd8\xff" and data[:8] != b"\x89PNG\r\n\x1a\n" and data[8:12] != b"WEBP":
            return pil_to_tensor(read_image(data, _named(path, name)))  # a format torchvision does not decode
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return image if image.dtype == torch.uint8 else to_dtype(image, torch.uint8, scale=True)  # 16-bit PNG
    except (OSError, RuntimeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        message = re.sub(r"^\w+, \S+:\d+, ", "", str(e))  # without the decoder's C++ source line
        raise DataError(f"{_named(path, name)}: cannot read image ({message})") from None


def _named(path: str | bytes, name: str) -> str:
    return name or (path if isinstance(path, str) else "an image's bytes")


class MapDataset(Protocol):
    """What the trainer needs of a data set: a length and samples by index (torch's Dataset
    does not promise the length)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


class SeededTransforms(Dataset):
    """`transform(base[i])` under RNG state derived from (seed, epoch, i)."""

    def __init__(self, base: MapDataset, transform: Callable[[Any], Any], seed: int = 0):
        self.base, self.transform, self.seed = base, transform, seed
        self._epoch = multiprocessing.RawValue("q", 0)  # shared with worker processes

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __len__(self) -> int:
        return len(self.base)

    @property
    def problems(self) -> list[str]:
        """What the underlying data set found wrong while indexing itself (see GuardedSamples)."""
        return list(getattr(self.base, "problems", []))

    def __getitem__(self, index: int) -> Any:
        sample = self.base[index]
        sample_seed = hash((self.seed, self.epoch, int(index))) % 2**63
        if get_worker_info() is not None:  # a loader worker's generators serve its samples only
            _seed_cpu_generators(sample_seed)
            return self.transform(sample)
        # In the training process the generators also serve the model (dropout) and mixup: put
        # them back. (Saving and restoring numpy's state costs more than the seeding itself.)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            _seed_cpu_generators(sample_seed)
            try:
                return self.transform(sample)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def _seed_cpu_generators(seed: int) -> None:
    """Python's, numpy's and torch's CPU generators (torch.manual_seed would also seed every
    accelerator's, which no transform draws from, at 40 times the cost)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    collate_fn: Callable,
    pin_memory: bool,
    drop_last: bool = False,
    order: Sampler | None = None,
) -> DataLoader:
    """`order`, when given, is the sequence of sample numbers an epoch reads (instead of shuffling)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and order is None,
        sampler=order,
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


def generated_data_root(root: str | None = None) -> str:
    """Where the built-in data sets are written on first use and read afterwards: `root` when the
    config names one, else ~/.cache/shardvision."""
    return root or os.path.join(os.path.expanduser("~"), ".cache", "shardvision")


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


@dataclass
class SampleReport:
    """What the loader says about one batch besides the batch itself."""

    ok: torch.Tensor  # bool per sample: False where a bad sample was replaced by the next readable one
    problems: list[str]  # one line per bad sample met, naming split, index, file and what is wrong
    fatal: str = ""  # set when no readable sample could stand in: the data set is broken


class GuardedSamples(Dataset):
    """`dataset[i]` as `(sample, problems)`: a DataError becomes a line in `problems` and the next
    readable sample stands in, so the error never escapes a loader worker (see the module doc)."""

    def __init__(self, dataset: MapDataset, split: str):
        self.dataset, self.split = dataset, split
        # Problems the data set found while indexing itself (e.g. annotations it dropped).
        self.found_at_start: list[str] = list(getattr(dataset, "problems", []))

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[Any, list[str]]:
        problems: list[str] = []
        for offset in range(MAX_SUBSTITUTES + 1):
            j = (int(index) + offset) % len(self.dataset)
            try:
                return self.dataset[j], problems
            except DataError as e:
                problems.append(f"{self.split} sample {j}: {e}")
        return None, problems


class GuardedCollate:
    """The task's collate over the samples GuardedSamples returned, plus the batch's SampleReport."""

    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, items: list[tuple[Any, list[str]]]) -> tuple[Any, SampleReport]:
        problems = [p for _, found in items for p in found]
        ok = torch.tensor([not found for _, found in items])
        if any(sample is None for sample, _ in items):
            fatal = f"{MAX_SUBSTITUTES + 1} samples in a row cannot be read, e.g. {problems[-1]}"
            return None, SampleReport(ok, problems, fatal)
        return self.collate([sample for sample, _ in items]), SampleReport(ok, problems)


def check_samples(dataset: MapDataset, split: str, num_workers: int, batch_size: int = 32) -> tuple[list[str], int]:
    """Read every sample of `dataset` once, `num_workers` processes in parallel, and return
    (every problem found, the number of samples read). Nothing stands in for a bad sample here."""
    guarded = GuardedSamples(dataset, split)
    loader = DataLoader(_EachSample(guarded), batch_size=batch_size, num_workers=num_workers, collate_fn=_problems_of)
    problems = list(guarded.found_at_start)
    for found in loader:
        problems += found
    return problems, len(dataset)


class _EachSample(Dataset):
    """A GuardedSamples that reports each sample's own problem and never substitutes."""

    def __init__(self, guarded: GuardedSamples):
        self.guarded = guarded

    def __len__(self) -> int:
        return len(self.guarded)

    def __getitem__(self, index: int) -> list[str]:
        try:
            self.guarded.dataset[index]
            return []
        except DataError as e:
            return [f"{self.guarded.split} sample {index}: {e}"]


def _problems_of(items: list[list[str]]) -> list[str]:
    return [p for found in items for p in found]


class BadSamples:
    """What the run does with bad samples (data.bad_samples), on every rank.

    Each rank notes what its loader reported (`take`). In error mode the trainer raises `error()`
    on every rank at once, when the per-step agreement or an evaluation's gathered flags say some
    rank met one. In skip mode `flush` (a collective) gathers them, and the main process appends
    each sample once to `<output_dir>/bad_samples.txt`."""

    def __init__(self, accelerator: Any, output_dir: str, policy: str):
        self.accelerator, self.skip = accelerator, policy == "skip"
        self.path = os.path.join(output_dir, "bad_samples.txt")
        self.unflushed: list[str] = []
        self.known: set[str] = set()  # the same on every rank, so every rank reports the same count

    def take(self, report: SampleReport) -> bool:
        """Note a batch's bad samples; True when the run must stop for them (error mode)."""
        if report.fatal:
            raise DataError(report.fatal)
        self.unflushed += report.problems
        return bool(report.problems) and not self.skip

    def add_found_at_start(self, *datasets: GuardedSamples) -> None:
        """Problems the data sets found while indexing themselves (only skip mode gets this far)."""
        for dataset in datasets:
            self.unflushed += dataset.found_at_start

    def flush(self) -> None:
        """Skip mode: gather every rank's new bad samples and list them (a collective)."""
        if not self.skip:
            return
        from accelerate.utils import gather_object

        gathered = gather_object(self.unflushed) if self.accelerator.num_processes > 1 else self.unflushed
        self.unflushed = []
        new = [p for p in dict.fromkeys(gathered) if p not in self.known]
        if not new:
            return
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write("".join(p + "\n" for p in new))
        self.known.update(new)
        logger.warning(
            "skipped %d bad samples so far (data.bad_samples: skip), listed in %s", len(self.known), self.path
        )

    def error(self) -> DataError:
        """The error every rank raises together once any rank met a bad sample (error mode); a
        collective, so rank 0 can name what the ranks met."""
        from accelerate.utils import gather_object

        problems = gather_object(self.unflushed) if self.accelerator.num_processes > 1 else self.unflushed
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return DataError(
            f"{problems[0]}{more}. Fix or remove the file, or set data.bad_samples: skip to train without it."
        )
