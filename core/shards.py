"""Sharded data sets: tar shards in the WebDataset layout and Parquet shards (the layout of
`datasets`' `to_parquet` and of the Hugging Face Hub), their index, their samples by number, and
the order in which an epoch reads them.

A tar shard is a tar file; a sample is the run of consecutive members sharing a key (the member's
path up to the first dot of its file name: `n01/img7.jpg` and `n01/img7.cls` are sample `n01/img7`,
files `jpg` and `cls`). The shards of a split are `<split>-*.tar` in a folder, in name order.

Samples are numbered in shard order, and read by number: each member's offset in its tar is found
by one scan of the shard's headers (no data read), so reading a sample is one seek and one read per
file. That is what lets a loader worker read any sample, a resumed run start anywhere, and a rank
read only the shards it trains on, with the engine's map-style loader, sampler, bad-sample guard
and resume unchanged. (WebDataset and timm's readers stream a tar front to back and keep no
position, so their resume restarts the epoch.)

`PartitionOrder` is the order of an epoch (see its docstring): a function of (seed, epoch, number
of partitions, global batch) only, never of the number of ranks, so that a run resumed on another
number of ranks sees the same samples in the same optimizer steps.

A Parquet shard is a `.parquet` file, a sample one of its rows ({column: value}). Its row count
and row groups are in the file's footer, so the index reads no data; a row is read with its row
group, and each process keeps the row groups it read last (PARQUET_CACHE_BYTES), so that a
shuffle window's samples, spread over a few row groups, read each group once.

`<folder>/_index.json` (written by `shardvision shard`) holds each shard's sample count and the
class names; without it each rank counts a tar shard's samples by scanning its headers at start.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Sampler

from core.config import TrainConfig
from core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

INDEX_FILE = "_index.json"
INDEX_FORMAT = "shardvision-shards-1"
SHARD_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}  # data.source -> shard file suffix
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a tar sample's image, the first of these it has
PARQUET_CACHE_BYTES = 256 << 20  # row groups a process keeps decoded, per process


def split_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a member, as WebDataset splits them: at the first dot of the file name."""
    folder, _, name = member_name.rpartition("/")
    stem, dot, extension = name.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


def shard_files(root: str, split: str, suffix: str = ".tar") -> list[str]:
    """The shards of `split`, `<split>-*<suffix>`, in name order: in the folder `root`, or among the
    files a brace pattern or glob `root` names (`/data/{train,val}-{000000..000127}.tar`)."""
    if os.path.isdir(root):
        found = sorted(glob.glob(os.path.join(glob.escape(root), f"{split}-*{suffix}")))
        where = f"{root}/{split}-*{suffix}"
    else:
        from braceexpand import braceexpand

        named = {path for pattern in braceexpand(root) for path in glob.glob(pattern)}
        found = sorted(p for p in named if os.path.basename(p).startswith(f"{split}-") and p.endswith(suffix))
        where = f"{split}-*{suffix} in {root}"
    if not found:
        raise ConfigError(
            f"data.root: no shards match {where!r} (the split names are data.train_split, data.eval_split)"
        )
    return found


@dataclass(frozen=True)
class ShardSample:
    """One sample's files, each as (offset, size) in its tar."""

    key: str
    files: dict[str, tuple[int, int]]


def scan_shard(path: str) -> tuple[list[ShardSample], str | None]:
    """The samples of one tar, read from its headers, and what was wrong with it (None if nothing):
    a damaged or truncated tar keeps the samples before the damage."""
    samples: list[ShardSample] = []
    last = "its first member"
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, extension = split_key(member.name)
                if not samples or samples[-1].key != key:
                    samples.append(ShardSample(key, {}))
                samples[-1].files[extension] = (member.offset_data, member.size)
                last = member.name
            # tarfile ends quietly at a cut header; a whole tar ends with two zero blocks
            f.seek(tar.offset)
            end = f.read(2 * tarfile.BLOCKSIZE)
            if len(end) < 2 * tarfile.BLOCKSIZE or end.strip(b"\0"):
                raise tarfile.ReadError("no end-of-archive marker after its last member")
    except (tarfile.TarError, EOFError, OSError) as e:
        kept = samples[:-1]  # the sample being read when the damage came may be incomplete
        return kept, f"{path}: damaged or truncated tar after {last} ({e}); {len(kept)} samples before it are kept"
    return samples, None


class ShardIndex:
    """The shards of one split (`suffix` .tar or .parquet) and how many samples each holds."""

    def __init__(self, root: str, split: str, suffix: str = ".tar"):
        self.paths, self.parquet = shard_files(root, split, suffix), suffix == ".parquet"
        self.problems: list[str] = []
        folder = os.path.dirname(self.paths[0])
        written = read_index(folder)
        names = [os.path.basename(p) for p in self.paths]
        if written is not None and all(n in written["shards"] for n in names):
            self.counts = [int(written["shards"][n]["samples"]) for n in names]
        elif self.parquet:  # each file's footer holds its row count
            self.counts = [parquet_rows(path) for path in self.paths]
        else:  # count by scanning the headers (no image data is read)
            self.counts = []
            for path in self.paths:
                samples, problem = scan_shard(path)
                self.counts.append(len(samples))
                if problem:
                    self.problems.append(problem)
        self.classes: list[str] = list((written or {}).get("classes") or read_classes(folder))
        self.categories: list[dict] = list((written or {}).get("categories") or read_info(folder).get("categories", []))
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position in that shard) of sample `index`."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])


def parquet_rows(path: str) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def parquet_class_names(path: str, column: str) -> list[str]:
    """The names of `column` where the file's `datasets` features make it a ClassLabel, else []."""
    import datasets
    import pyarrow.parquet as pq

    feature = datasets.Features.from_arrow_schema(pq.read_schema(path)).get(column)
    return [str(name) for name in getattr(feature, "names", None) or []]


def sample_file(sample: dict, names: tuple[str, ...], hint: str = "") -> tuple[str, bytes]:
    """(name, bytes) of the first of `names` (tar extensions, or a Parquet column) that `sample`
    holds; a `datasets` Image struct gives its bytes. A DataError naming the sample if none."""
    for name in names:
        value = sample.get(name)
        value = value.get("bytes") if isinstance(value, dict) else value
        if isinstance(value, bytes):
            return name, value
    held = ", ".join(k for k in sample if not k.startswith("__")) or "nothing"
    where = f"{sample['__shard__']}: sample {sample['__key__']}"
    raise DataError(f"{where} has no {' or '.join(names)}; it has {held}" + (f" ({hint})" if hint else ""))


def read_index(folder: str) -> dict | None:
    path = os.path.join(folder, INDEX_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), dict):
        raise DataError(f"{path}: not a shard index of format {INDEX_FORMAT!r}; delete it to count by scanning")
    return index


def read_classes(folder: str) -> list[str]:
    """Class names beside the shards: classes.txt (one per line), else _info.json's "classes"."""
    text = os.path.join(folder, "classes.txt")
    if os.path.isfile(text):
        with open(text) as f:
            return [line.strip() for line in f if line.strip()]
    return list(read_info(folder).get("classes", []))


def read_info(folder: str) -> dict:
    """`_info.json` beside the shards (WebDataset's and timm's convention), else {}."""
    info = os.path.join(folder, "_info.json")
    if not os.path.isfile(info):
        return {}
    with open(info) as f:
        return json.load(f)


class ShardSamples(Dataset):
    """`dataset[i]`: sample i's files as {extension: bytes} (a tar shard) or its row as {column:
    value} (a Parquet shard), plus "__key__" and "__shard__".

    Each process (rank or loader worker) reads a shard's headers or footer when it first reads
    from it, and only then: a rank opens only the shards its samples are in."""

    def __init__(self, index: ShardIndex):
        self.index = index
        self._members: dict[int, list[ShardSample]] = {}
        self._row_groups: dict[int, np.ndarray] = {}  # shard -> its row groups' first row numbers
        self._groups_read: OrderedDict[tuple[int, int], Any] = OrderedDict()  # (shard, group) -> Table
        self._pid = os.getpid()

    @property
    def problems(self) -> list[str]:
        return self.index.problems

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.read(i)

    def read(self, i: int, only: tuple[str, ...] | None = None) -> dict:
        """Sample i, with only the files (tar extensions) named in `only` if given."""
        shard, position = self.index.locate(int(i))
        path = self.index.paths[shard]
        if self.index.parquet:
            return self._row(shard, position)
        if shard not in self._members:
            self._members[shard] = scan_shard(path)[0]
        members = self._members[shard]
        if position >= len(members):
            raise DataError(
                f"{path}: sample {position} of the {self.index.counts[shard]} the index counts is missing "
                "(the tar is truncated or damaged)"
            )
        sample = members[position]
        out: dict = {"__key__": sample.key, "__shard__": path}
        with open(path, "rb") as f:
            for extension, (offset, size) in sample.files.items():
                if only is not None and extension not in only:
                    continue
                f.seek(offset)
                out[extension] = f.read(size)
        return out

    def _row(self, shard: int, position: int) -> dict:
        import pyarrow.parquet as pq

        if self._pid != os.getpid():  # a forked loader worker keeps its own row groups
            self._row_groups, self._groups_read, self._pid = {}, OrderedDict(), os.getpid()
        path = self.index.paths[shard]
        table = None
        try:
            if shard not in self._row_groups:
                with pq.ParquetFile(path) as file:
                    rows = [file.metadata.row_group(g).num_rows for g in range(file.metadata.num_row_groups)]
                self._row_groups[shard] = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
            starts = self._row_groups[shard]
            if position >= starts[-1]:
                raise DataError(f"{path}: row {position} of the {self.index.counts[shard]} the index counts is missing")
            group = int(np.searchsorted(starts, position, side="right")) - 1
            table = self._groups_read.get((shard, group))
            if table is None:  # a file is open only while a group is read: a worker may read thousands
                with pq.ParquetFile(path) as file:
                    table = file.read_row_group(group)
        except (OSError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path}: not a readable Parquet file ({e})") from None
        self._groups_read[(shard, group)] = table
        self._groups_read.move_to_end((shard, group))
        while len(self._groups_read) > 1 and sum(t.nbytes for t in self._groups_read.values()) > PARQUET_CACHE_BYTES:
            self._groups_read.popitem(last=False)
        row = table.slice(position - int(starts[group]), 1).to_pylist()[0]
        return {**row, "__key__": str(row.get("__key__", f"row {position}")), "__shard__": path}


class PartitionOrder(Sampler[int]):
    """The order of one training epoch over sharded samples, the same on any number of ranks.

    The shards are shuffled by (seed, epoch) and laid end to end; that sequence is cut into
    `partitions` equal parts. Each optimizer step takes the next `global_batch / partitions`
    samples of every part, partition 0's first, and within a part the samples are shuffled in
    windows of `window` consecutive ones (a bounded shuffle, reseeded per window). The sequence
    this yields therefore depends only on (seed, epoch, partitions, global batch): accelerate
    hands each rank a contiguous slice of every step's `global_batch` samples, so with ranks x
    accumulation dividing `partitions`, a rank reads from the same partitions, and so the same
    few shards, every step; on any number of ranks an optimizer step trains on the same samples,
    and a run resumed on another number of ranks goes on where the first left off. An epoch has
    `len(dataset) // global_batch` steps and sees no sample twice; the few samples beyond the
    last full step (fewer than `global_batch + partitions`) change with the epoch's shuffle."""

    def __init__(self, counts: list[int], partitions: int, global_batch: int, window: int, seed: int):
        if partitions < 1 or global_batch % partitions:
            raise ConfigError(
                f"data.shard_partitions: {partitions} must divide the global batch ({global_batch} samples: "
                "micro batch x ranks x accumulation), so that every step takes as many samples from each part"
            )
        self.counts, self.partitions, self.global_batch = np.asarray(counts, dtype=np.int64), partitions, global_batch
        self.window, self.seed, self.epoch = max(1, window), seed, 0
        self.total = int(self.counts.sum())
        self.steps = self.total // global_batch
        self.part_length = self.total // partitions

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.global_batch

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.counts))
        numbers = np.concatenate([[0], np.cumsum(self.counts)])[order]  # each shuffled shard's first sample number
        laid_out = np.concatenate([[0], np.cumsum(self.counts[order])])  # where each starts in the laid-out sequence
        per_part = self.global_batch // self.partitions
        windows: dict[int, tuple[int, np.ndarray]] = {}  # partition -> (window number, its shuffle)
        for step in range(self.steps):
            for part in range(self.partitions):
                for k in range(step * per_part, (step + 1) * per_part):
                    w = k // self.window
                    if windows.get(part, (-1,))[0] != w:
                        length = min(self.window, self.part_length - w * self.window)
                        rng = np.random.default_rng([self.seed, self.epoch, part, w])
                        windows[part] = (w, rng.permutation(length))
                    position = part * self.part_length + w * self.window + int(windows[part][1][k - w * self.window])
                    shard = int(np.searchsorted(laid_out, position, side="right")) - 1
                    yield int(numbers[shard] + position - laid_out[shard])


def epoch_order(shards: ShardIndex, cfg: TrainConfig, ranks: int) -> PartitionOrder:
    """The training order of `shards` for this launch's global batch."""
    d, accumulation = cfg.data, cfg.loop.grad_accum_steps
    global_batch = d.micro_batch_size * ranks * accumulation
    order = PartitionOrder(shards.counts, d.shard_partitions, global_batch, d.shuffle_window, cfg.seed)
    if d.shard_partitions % (ranks * accumulation):
        logger.info(
            "data.shard_partitions %d is not a multiple of ranks x accumulation (%d): each rank reads from more "
            "shards than its share",
            d.shard_partitions,
            ranks * accumulation,
        )
    return order


def readable(read: Callable[[Any], Any], keys: Iterable[Any], problems: list[str]) -> Iterator[tuple[Any, Any]]:
    """(key, read(key)) for each key whose sample can be read; for `shardvision shard`, which leaves
    out what cannot be read and lists it: each DataError is appended to `problems`."""
    for key in keys:
        try:
            sample = read(key)
        except DataError as e:
            problems.append(str(e))
            continue
        yield key, sample


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """An image (or an index mask, as uint8) as a PNG file's bytes, for a source that holds no file."""
    buffer = io.BytesIO()
    (Image.fromarray(np.asarray(image, dtype=np.uint8)) if isinstance(image, np.ndarray) else image).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def image_member(image: Image.Image, path: str | None) -> tuple[str, bytes]:
    """(extension, bytes) of a shard's image: the file's own bytes where the source has an image
    file shards hold (jpg, jpeg, png, webp), else the image as PNG."""
    extension = os.path.splitext(path)[1].lower().lstrip(".") if path else ""
    if extension not in IMAGE_EXTENSIONS:
        return "png", png_bytes(image)
    with open(str(path), "rb") as f:
        return extension, f.read()


def write_shards(folder: str, split: str, samples: Iterator[tuple[str, dict[str, bytes]]], per_shard: int) -> dict:
    """`samples` ((key, {extension: bytes}) in order) as `folder/<split>-000000.tar`, ... of
    `per_shard` samples each; a tar is written beside its place and renamed into it when whole.
    Returns {shard name: {"samples": count}}, for the index."""
    os.makedirs(folder, exist_ok=True)
    written: dict[str, dict[str, int]] = {}
    tar, name = None, ""
    for i, (key, files) in enumerate(samples):
        if i % per_shard == 0:
            if tar is not None:
                _publish(tar, folder, name)
            name = f"{split}-{i // per_shard:06d}.tar"
            tar, written[name] = tarfile.open(os.path.join(folder, f".partial-{name}"), "w"), {"samples": 0}
        assert tar is not None
        for extension, data in files.items():
            member = tarfile.TarInfo(f"{key}.{extension}")
            member.size, member.mtime = len(data), 0
            tar.addfile(member, io.BytesIO(data))
        written[name]["samples"] += 1
    if tar is not None:
        _publish(tar, folder, name)
    return written


def _publish(tar: tarfile.TarFile, folder: str, name: str) -> None:
    tar.close()
    os.replace(os.path.join(folder, f".partial-{name}"), os.path.join(folder, name))


def write_index(folder: str, shards: dict, labels: dict) -> None:
    """`folder/_index.json`: every shard's sample count and `labels`, the class names ("classes")
    and for detection COCO's category table ("categories")."""
    with open(os.path.join(folder, INDEX_FILE), "w") as f:
        json.dump({"format": INDEX_FORMAT, "shards": shards, **labels}, f, indent=1)
