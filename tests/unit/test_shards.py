"""Tar shards (core/shards.py): their samples read by number from shards written with tarfile
alone, damage named by shard and key, and the epoch order held to its promises through
accelerate's own per-rank slicing (prepare_data_loader) on 1, 2 and 4 ranks."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from accelerate.data_loader import prepare_data_loader
from PIL import Image
from torch.utils.data import DataLoader

from core.errors import ConfigError, DataError
from core.shards import INDEX_FILE, INDEX_FORMAT, PartitionOrder, ShardIndex, ShardSamples, split_key
from recipes.classification.data import ShardImages
from tests.builders import image_bytes, write_parquet_shards, write_tar_shards
from tests.helpers import DIGITS


def samples(n: int, start: int = 0) -> list[tuple[str, dict[str, bytes]]]:
    return [
        (f"k/{i:04d}", {"png": image_bytes(i, (8, 8)), "cls": str(i % 3).encode()}) for i in range(start, start + n)
    ]


def test_a_key_ends_at_the_first_dot_of_the_file_name():
    assert split_key("a.b/img7.seg.png") == ("a.b/img7", "seg.png")
    assert split_key("img7.JPG") == ("img7", "jpg")
    assert split_key("noext") == ("noext", "")


def test_samples_are_read_by_number_across_shards(tmp_path):
    written = samples(25)
    write_tar_shards(tmp_path, "train", written, per_shard=10)
    write_tar_shards(tmp_path, "val", samples(5), per_shard=10)
    index = ShardIndex(str(tmp_path), "train")
    assert index.counts == [10, 10, 5] and len(index) == 25 and not index.problems
    read = ShardSamples(index)
    for i in (0, 9, 10, 24):
        got = read[i]
        assert got["__key__"] == written[i][0] and got["__shard__"].endswith(f"train-{i // 10:06d}.tar")
        assert {k: v for k, v in got.items() if not k.startswith("__")} == written[i][1]


def test_a_written_index_gives_the_counts_and_classes_without_scanning(tmp_path):
    write_tar_shards(tmp_path, "train", samples(12), per_shard=5)
    shards = {f"train-{i:06d}.tar": {"samples": n} for i, n in enumerate([5, 5, 2])}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"format": INDEX_FORMAT, "shards": shards, "classes": ["a", "b"]}))
    (tmp_path / "train-000002.tar").write_bytes(b"")  # not scanned: the index is believed
    index = ShardIndex(str(tmp_path), "train")
    assert index.counts == [5, 5, 2] and index.classes == ["a", "b"]
    with pytest.raises(DataError, match=r"train-000002.tar: sample 0 of the 2 the index counts is missing"):
        ShardSamples(index)[10]


def test_brace_patterns_and_missing_shards(tmp_path):
    write_tar_shards(tmp_path, "train", samples(12), per_shard=4)
    index = ShardIndex(str(tmp_path / "train-{000000..000001}.tar"), "train")
    assert index.counts == [4, 4]
    with pytest.raises(ConfigError, match=r"no shards match .*val-\*\.tar"):
        ShardIndex(str(tmp_path), "val")


def test_a_truncated_shard_keeps_what_comes_before_the_damage_and_names_it(tmp_path):
    write_tar_shards(tmp_path, "train", samples(10), per_shard=5)
    damaged = tmp_path / "train-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:1500])
    index = ShardIndex(str(tmp_path), "train")
    assert index.counts[0] == 5 and index.counts[1] < 5
    assert len(index.problems) == 1 and "train-000001.tar: damaged or truncated tar after" in index.problems[0]


def test_bad_images_and_labels_are_named_by_shard_and_key(tmp_path):
    broken = samples(6)
    broken[1][1]["png"] = broken[1][1]["png"][:40]  # undecodable
    broken[2][1].pop("cls")
    broken[3][1]["cls"] = b"7"  # num_classes 3
    broken[4] = ("k/0004", {"json": json.dumps({"label": 2}).encode(), "jpg": broken[4][1]["png"]})
    broken[5][1].pop("png")
    write_tar_shards(tmp_path, "train", broken, per_shard=6)
    images = ShardImages(ShardIndex(str(tmp_path), "train"), num_classes=3)
    shard = str(tmp_path / "train-000000.tar")
    image, label = images[0]
    assert isinstance(image, Image.Image) and label == 0
    with pytest.raises(DataError, match=rf"{shard}: sample k/0001.png: cannot read image"):
        images[1]
    with pytest.raises(DataError, match=rf"{shard}: sample k/0002 has no label .*it has png"):
        images[2]
    with pytest.raises(DataError, match=rf"{shard}: sample k/0003: label 7 is outside 0..2"):
        images[3]
    assert images[4][1] == 2  # a json label, a jpg extension holding any image format PIL reads
    with pytest.raises(DataError, match=rf"{shard}: sample k/0005 has no jpg or jpeg or png or webp; it has cls"):
        images[5]


# --- the order of an epoch --------------------------------------------------------------------

COUNTS = [37, 50, 41, 50, 50, 29, 50, 45]  # 352 samples in 8 shards of uneven sizes


def per_rank_steps(order: PartitionOrder, ranks: int, micro: int, accumulation: int) -> list[list[list[int]]]:
    """[rank][optimizer step] -> the samples that rank trains on, as accelerate slices the order."""
    loader = DataLoader(range(order.total), batch_size=micro, sampler=order, drop_last=True)
    out = []
    for rank in range(ranks):
        sliced = prepare_data_loader(loader, num_processes=ranks, process_index=rank, put_on_device=False)
        batches = [batch.tolist() for batch in sliced]
        out.append([sum(batches[s : s + accumulation], []) for s in range(0, len(batches), accumulation)])
    return out


@pytest.mark.parametrize("ranks, accumulation", [(1, 4), (2, 2), (4, 1)])
def test_every_step_trains_on_the_same_samples_on_any_number_of_ranks(ranks, accumulation):
    """Global batch 64 (micro 16): 1 rank x accumulation 4, 2 x 2 and 4 x 1 train each step on
    the same samples; an epoch sees no sample twice, 5 steps of 64 of the 352."""
    order = PartitionOrder(COUNTS, partitions=8, global_batch=64, window=20, seed=3)
    order.set_epoch(1)
    steps = per_rank_steps(order, ranks, micro=16, accumulation=accumulation)
    per_step = [sorted(sum((steps[r][s] for r in range(ranks)), [])) for s in range(len(steps[0]))]
    reference = per_rank_steps(order, 1, micro=64, accumulation=1)[0]
    assert per_step == [sorted(s) for s in reference] and len(per_step) == 5
    seen = sum(per_step, [])
    assert len(seen) == len(set(seen)) == 5 * 64


def test_each_rank_reads_only_its_partitions_shards():
    """4 ranks over 64 shards of 25: each reads about a quarter of the shards, the same ones every
    step of the epoch, and its samples' positions in a part stay within the shuffle window."""
    counts = [25] * 64
    order = PartitionOrder(counts, partitions=8, global_batch=64, window=30, seed=0)
    starts = np.cumsum([0, *counts])
    shard_of = lambda i: int(np.searchsorted(starts, i, side="right")) - 1  # noqa: E731
    for rank_steps in per_rank_steps(order, 4, micro=16, accumulation=1):
        shards = {shard_of(i) for step in rank_steps for i in step}
        assert len(shards) <= 64 // 4 + 2, sorted(shards)


def test_the_order_changes_with_the_epoch_and_repeats_with_the_seed():
    order = PartitionOrder(COUNTS, partitions=4, global_batch=32, window=16, seed=0)
    first = list(order)
    order.set_epoch(1)
    second = list(order)
    again = PartitionOrder(COUNTS, partitions=4, global_batch=32, window=16, seed=0)
    assert first != second and list(again) == first and len(first) == len(set(first)) == len(order) == 352 // 32 * 32


def test_the_shuffle_window_bounds_how_far_a_sample_moves_within_its_part():
    counts = [100] * 4
    order = PartitionOrder(counts, partitions=4, global_batch=4, window=10, seed=0)
    # one shard per part and one sample per part and step: part p's k-th sample is within its window
    taken = np.array(list(order)).reshape(-1, 4)
    for part in range(4):
        moved = [abs(int(i) % 100 - k) for k, i in enumerate(taken[:, part])]
        assert max(moved) < 10 and len({int(i) // 100 for i in taken[:, part]}) == 1


def test_partitions_must_divide_the_global_batch():
    with pytest.raises(ConfigError, match=r"data.shard_partitions: 6 must divide the global batch \(64 samples"):
        PartitionOrder(COUNTS, partitions=6, global_batch=64, window=10, seed=0)


def test_a_damaged_image_in_a_shard_is_a_data_error_not_a_crash(tmp_path):
    """What the bad-sample guard catches (core/data.py GuardedSamples)."""
    from core.data import GuardedSamples

    written = samples(4)
    written[2][1]["png"] = b"not an image"
    write_tar_shards(tmp_path, "train", written, per_shard=4)
    guarded = GuardedSamples(ShardImages(ShardIndex(str(tmp_path), "train"), num_classes=3), "train")
    sample, problems = guarded[2]
    assert sample[1] == 0  # sample 3 stands in
    shard = tmp_path / "train-000000.tar"
    assert problems == [f"train sample 2: {shard}: sample k/0002.png: cannot read image (cannot identify image file)"]


def test_shardvision_shard_writes_the_recipes_data_with_its_index(tmp_path, capsys):
    """`shardvision shard` on the digits demo: the shards hold every sample (image and label) of
    both splits, in order, and the index their counts and the class names."""
    from core.commands.shard import shard_main
    from recipes.classification.data import Digits

    out = tmp_path / "shards"
    shard_main(["classification", str(out), "--samples-per-shard", "500", "--config", DIGITS])
    assert "train: 1437 samples in 3 shards" in capsys.readouterr().out
    index = ShardIndex(str(out), "train")
    assert index.counts == [500, 500, 437] and index.classes == [str(i) for i in range(10)]
    assert not index.problems and ShardIndex(str(out), "val").counts == [360]
    shards, digits = ShardImages(index, num_classes=10), Digits("train")
    for i in (0, 777, 1436):
        (image, label), (expected_image, expected_label) = shards[i], digits[i]
        assert label == expected_label and np.array_equal(np.asarray(image), np.asarray(expected_image))


# --- Parquet shards ---------------------------------------------------------------------------


def test_parquet_shards_hold_the_same_samples_as_tar_shards_of_the_same_data(tmp_path):
    """The digits' training split as tar shards and as Parquet shards written by `datasets`
    (ClassLabel names, Image struct, row groups of 100): sample for sample the same image and
    label, the counts from the files' footers, the class names from the Parquet schema."""
    from recipes.classification.data import Digits

    digits = Digits("train")
    rows = [digits[i] for i in range(700)]
    tar_samples = []
    for i, (image, label) in enumerate(rows):
        png = io.BytesIO()
        image.save(png, format="PNG")
        tar_samples.append((f"{i:05d}", {"png": png.getvalue(), "cls": str(label).encode()}))
    write_tar_shards(tmp_path / "tar", "train", tar_samples, per_shard=300)
    write_parquet_shards(tmp_path / "parquet", "train", rows, per_shard=300, classes=digits.classes, row_group=100)
    tar = ShardImages(ShardIndex(str(tmp_path / "tar"), "train"), num_classes=10)
    parquet_index = ShardIndex(str(tmp_path / "parquet"), "train", ".parquet")
    parquet = ShardImages(parquet_index, num_classes=10)
    assert parquet_index.counts == [300, 300, 100] and parquet.classes == [str(c) for c in digits.classes]
    for i in range(0, 700, 7):
        (image, label), (expected, expected_label) = parquet[i], tar[i]
        assert label == expected_label and np.array_equal(np.asarray(image), np.asarray(expected)), i


def test_a_parquet_row_group_is_read_once_for_the_samples_it_holds(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    rows = [(Image.new("RGB", (4, 4), (i, 0, 0)), i % 3) for i in range(40)]
    write_parquet_shards(tmp_path, "train", rows, per_shard=40, classes=["a", "b", "c"], row_group=10)
    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, g, **kw: reads.append(g) or original(self, g))
    samples = ShardSamples(ShardIndex(str(tmp_path), "train", ".parquet"))
    for i in np.random.default_rng(0).permutation(40):  # a shuffle window over four row groups
        assert samples[i]["__key__"] == f"row {i}"
    assert sorted(reads) == [0, 1, 2, 3]


def test_bad_parquet_rows_and_files_are_named(tmp_path):
    rows = [(Image.new("RGB", (4, 4)), 0), (Image.new("RGB", (4, 4)), 5), (Image.new("RGB", (4, 4)), 1)]
    write_parquet_shards(tmp_path, "train", rows, per_shard=3, classes=None, row_group=3, broken_image_at=2)
    images = ShardImages(ShardIndex(str(tmp_path), "train", ".parquet"), num_classes=3)
    shard = tmp_path / "train-00000-of-00001.parquet"
    assert images[0][1] == 0
    with pytest.raises(DataError, match=rf"{shard}: sample row 1: label 5 is outside 0..2"):
        images[1]
    with pytest.raises(DataError, match=rf"{shard}: sample row 2.image: cannot read image"):
        images[2]
    with pytest.raises(DataError, match=r"sample row 0 has no picture; it has image, label \(set data.image_column\)"):
        ShardImages(ShardIndex(str(tmp_path), "train", ".parquet"), 3, ("picture", "label"))[0]
    (tmp_path / "train-00001-of-00001.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(DataError, match=r"train-00001-of-00001.parquet: not a readable Parquet file"):
        ShardIndex(str(tmp_path), "train", ".parquet")


def test_check_data_reads_tar_and_parquet_shards_and_names_each_bad_sample(tmp_path, capsys):
    """`shardvision check-data` on shards: a truncated tar, a corrupt member and a bad Parquet row
    each named by shard and key in one report, exit code 2; clean shards pass."""
    from core.commands.cli import main

    def check(source: str, root) -> tuple[int, str]:
        argv = ["check-data", "classification", "--config", DIGITS, "--data.source", source, "--data.root", str(root)]
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--model.num_classes", "3", "--data.num_workers", "0"])
        return exit_info.value.code, capsys.readouterr().out

    tar, broken = tmp_path / "tar", samples(12)
    broken[3][1]["png"] = b"not an image"
    write_tar_shards(tar, "train", broken, per_shard=6)
    write_tar_shards(tar, "val", samples(4), per_shard=4)
    damaged = tar / "train-000001.tar"
    damaged.write_bytes(damaged.read_bytes()[:1500])
    code, out = check("webdataset", tar)
    assert code == 2 and "train sample 3: " in out and f"{tar}/train-000000.tar: sample k/0003.png: cannot read" in out
    assert f"{damaged}: damaged or truncated tar after" in out and "eval: 4 samples read, 0 problems" in out

    parquet, rows = tmp_path / "parquet", [(Image.new("RGB", (4, 4), (i, 0, 0)), i % 3) for i in range(6)]
    write_parquet_shards(parquet, "train", rows, per_shard=3, classes=None, row_group=2, broken_image_at=4)
    write_parquet_shards(parquet, "val", rows[:2], per_shard=3, classes=None, row_group=2)
    code, out = check("parquet", parquet)
    assert code == 2 and f"{parquet}/train-00001-of-00002.parquet: sample row 1.image: cannot read image" in out
    assert "train: 6 samples read, 1 problems" in out
    write_parquet_shards(parquet, "train", rows, per_shard=3, classes=None, row_group=2)
    assert check("parquet", parquet) == (0, "train: 6 samples read, 0 problems\neval: 2 samples read, 0 problems\n")


# --- segmentation shards ----------------------------------------------------------------------

SHAPES = "recipes/segmentation/configs/shapes.yaml"


def test_segmentation_shards_hold_the_sources_image_and_mask_pixel_for_pixel(tmp_path, capsys):
    """`shardvision shard segmentation` on the shapes demo (the JPEG and PNG files' own bytes), and
    the same pairs as Parquet shards written by `datasets`: read back, every image and mask is the
    VOC folder's; the training split's shards are what the engine orders (task.train_shards)."""
    import datasets

    from core.commands.shard import shard_main
    from core.config_parsing import parse_args
    from recipes.segmentation.task import SegmentationConfig, SegmentationTask

    def task(*args: str) -> SegmentationTask:
        cfg = parse_args(SegmentationConfig, ["--config", SHAPES, *args, "--data.shapes_count", "[60, 20]"])
        return SegmentationTask(cfg)

    shards = tmp_path / "tar"
    shard_main(
        [
            "segmentation",
            str(shards),
            "--samples-per-shard",
            "25",
            "--config",
            SHAPES,
            "--data.shapes_count",
            "[60, 20]",
        ]
    )
    assert "train: 60 samples in 3 shards" in capsys.readouterr().out
    assert (shards / "classes.txt").read_text().split() == ["background", "square", "circle", "triangle"]
    folder_task, shard_task = task(), task("--data.source", "webdataset", "--data.root", str(shards))
    (folder, _), (sharded, sharded_val) = folder_task.build_datasets(), shard_task.build_datasets()
    assert shard_task.train_shards.counts == [25, 25, 10] and len(sharded_val) == 20

    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    pairs = [folder.base[i] for i in range(60)]
    table = {"image": [image for image, _ in pairs], "mask": [Image.fromarray(m.astype(np.uint8)) for _, m in pairs]}
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(tmp_path / "train-0.parquet"), batch_size=16)
    parquet = task(
        "--data.source", "parquet", "--data.root", str(tmp_path / "train-0.parquet"), "--data.eval_split", "train"
    )
    from_parquet = parquet.build_datasets()[0]
    for i in range(0, 60, 3):
        image, mask = folder.base[i]
        for _, got_mask in (sharded.base[i], from_parquet.base[i]):
            assert np.array_equal(got_mask, mask), i
        assert np.array_equal(np.asarray(sharded.base[i][0]), np.asarray(image)), i  # the JPEG's own bytes
        # Parquet holds the decoded JPEG as PNG: the same pixels
        assert np.array_equal(np.asarray(from_parquet.base[i][0]), np.asarray(image)), i

    # Tar shards written again from the Parquet shards (the PNG bytes they hold): the same pairs
    again, source = tmp_path / "again", ["--data.source", "parquet", "--data.root", str(tmp_path / "train-0.parquet")]
    shard_main(["segmentation", str(again), "--config", SHAPES, *source, "--data.eval_split", "train"])
    resharded = task("--data.source", "webdataset", "--data.root", str(again), "--data.eval_split", "train")
    train_again = resharded.build_datasets()[0].base
    for i in (0, 31, 59):
        (image, mask), (expected_image, expected_mask) = train_again[i], folder.base[i]
        assert np.array_equal(np.asarray(image), np.asarray(expected_image)) and np.array_equal(mask, expected_mask)


def test_bad_segmentation_shard_samples_are_named_by_shard_and_key(tmp_path):
    from recipes.segmentation.data import ShardPairs

    def png(array) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    image, mask = png(np.zeros((8, 8, 3), np.uint8)), np.zeros((8, 8), np.uint8)
    write_tar_shards(
        tmp_path,
        "train",
        [
            ("a", {"png": image, "seg.png": png(mask)}),
            ("b", {"png": image, "seg.png": png(mask[:4])}),
            ("c", {"png": image, "seg.png": png(mask + 9)}),
            ("d", {"png": image, "seg.png": image}),
            ("e", {"png": image}),
        ],
        per_shard=5,
    )
    pairs = ShardPairs(
        ShardIndex(str(tmp_path), "train"), ("image", "mask"), num_classes=4, ignore_index=255, reduce_zero_label=False
    )
    shard = tmp_path / "train-000000.tar"
    assert pairs[0][1].shape == (8, 8)
    with pytest.raises(DataError, match=rf"{shard}: sample b.seg.png: mask is 8x4 but {shard}: sample b.png is 8x8"):
        pairs[1]
    with pytest.raises(DataError, match=rf"{shard}: sample c.seg.png: mask values \[9\] are outside 0..3"):
        pairs[2]
    with pytest.raises(DataError, match=rf"{shard}: sample d.seg.png: a mask must be a single-channel index PNG"):
        pairs[3]
    with pytest.raises(DataError, match=rf"{shard}: sample e has no seg.png or mask.png; it has png"):
        pairs[4]


# --- detection shards -------------------------------------------------------------------------

DETECTION_SHAPES = ["--config", "recipes/detection/configs/shapes.yaml", "--data.shapes_count", "[40, 10]"]


def detection_task(*args: str):
    from core.config_parsing import parse_args
    from recipes.detection.task import DetectionConfig, DetectionTask

    return DetectionTask(parse_args(DetectionConfig, [*DETECTION_SHAPES, *args]))


def test_detection_shards_hold_the_coco_sets_images_boxes_and_masks(tmp_path, capsys):
    """`shardvision shard detection` on the COCO-layout shapes: read back as tar shards, every
    image, box, label and instance mask is the COCO folder's, the evaluation index holds the same
    annotations and categories (so it scores alike), and image i is shard sample i."""
    from core.commands.shard import shard_main

    shard_main(["detection", str(tmp_path), "--samples-per-shard", "15", *DETECTION_SHAPES])
    assert "train: 40 samples in 3 shards" in capsys.readouterr().out
    masks = ["--model.name", "maskrcnn_resnet50_fpn"]
    folder, sharded = (
        detection_task(*masks),
        detection_task(*masks, "--data.source", "webdataset", "--data.root", str(tmp_path)),
    )
    (train, val), (shard_train, shard_val) = folder.build_datasets(), sharded.build_datasets()
    assert sharded.train_shards.counts == [15, 15, 10] and shard_train.base.category_names == train.base.category_names
    for i in range(0, 40, 3):
        (image, target), (got_image, got) = train.base[i], shard_train.base[i]
        assert np.array_equal(np.asarray(got_image), np.asarray(image)), i
        assert (got["boxes"], got["labels"], got["image_id"]) == (target["boxes"], target["labels"], i + 1), i
        assert np.array_equal(got["masks"], target["masks"]), i
    fields = ("bbox", "category_id", "area", "iscrowd", "segmentation")
    expected, got = (
        [[{k: a[k] for k in fields} for a in d.coco.imgToAnns.get(image_id, [])] for image_id in d.ids]
        for d in (val.base, shard_val.base)
    )
    assert got == expected and shard_val.base.coco.dataset["categories"] == val.base.coco.dataset["categories"]


def test_detection_parquet_shards_in_the_transformers_layout(tmp_path):
    """Parquet shards in hf_disk's columns (image, objects {bbox, category}, width, height), as
    `datasets` writes them: the boxes and labels are those of the COCO set they were made from."""
    import datasets

    folder = detection_task()
    train, val = (split.base for split in folder.build_datasets())
    names = train.category_names
    objects = datasets.Sequence(
        {"bbox": datasets.Sequence(datasets.Value("float32"), length=4), "category": datasets.ClassLabel(names=names)}
    )
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": objects,
        }
    )
    for split, raw in (("train", train), ("validation", val)):
        rows = {"image": [], "width": [], "height": [], "objects": []}
        for image_id in raw.ids:
            info, anns = raw.coco.imgs[image_id], raw.coco.imgToAnns.get(image_id, [])
            rows["image"].append(raw._read(image_id)[0])
            rows["width"].append(info["width"])
            rows["height"].append(info["height"])
            rows["objects"].append(
                {"bbox": [a["bbox"] for a in anns], "category": [a["category_id"] - 1 for a in anns]}
            )
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(tmp_path / f"{split}-0.parquet"), batch_size=8
        )
    sharded = detection_task("--data.source", "parquet", "--data.root", str(tmp_path))
    shard_train = sharded.build_datasets()[0].base
    assert sharded.train_shards.counts == [40] and shard_train.category_names == names
    for i in range(0, 40, 3):
        (image, target), (got_image, got) = train[i], shard_train[i]
        assert np.array_equal(np.asarray(got_image), np.asarray(image)), i
        assert np.allclose(got["boxes"], target["boxes"]) and got["labels"] == target["labels"], i


def test_a_detection_shard_sample_without_its_annotations_is_named(tmp_path):
    (tmp_path / "_info.json").write_text(json.dumps({"categories": [{"id": 1, "name": "a"}]}))
    good = json.dumps({"width": 8, "height": 8, "annotations": [{"bbox": [1, 1, 4, 4], "category_id": 1}]}).encode()
    write_tar_shards(tmp_path, "train", [("a", {"png": image_bytes(0, (8, 8)), "json": good})], per_shard=1)
    no_bbox = json.dumps({"width": 8, "height": 8, "annotations": [{"category_id": 1}]}).encode()
    for record, problem in ((b'{"width": 8}', "KeyError\\('height'\\)"), (no_bbox, "KeyError\\('bbox'\\)")):
        samples = [("b", {"png": image_bytes(1, (8, 8)), "json": record})]
        write_tar_shards(tmp_path, "validation", samples, per_shard=1)
        with pytest.raises(DataError, match=rf"validation-000000.tar: sample b.json: not a json of width, .*{problem}"):
            detection_task("--data.source", "webdataset", "--data.root", str(tmp_path)).build_datasets()
