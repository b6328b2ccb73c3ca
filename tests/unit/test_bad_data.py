"""Bad samples in every recipe and data source: truncated, empty and non-image files, mask values
outside the classes, boxes outside their image, labels outside the classes. In error mode a run
stops with one line naming split, sample, file and value, and exit code 2; in skip mode it trains
to the end without them and lists them in bad_samples.txt. Real files, the real readers, the real
trainer (in-process here, 1 rank; tests/integration/test_failure_runs.py runs 2 ranks)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from core.data import MAX_SUBSTITUTES, GuardedCollate, GuardedSamples, check_samples, read_image
from core.errors import DataError
from tests.builders import QUICK_RUN, SOURCES, noise_image, truncate


def run_recipe(recipe: str, args: list[str]):
    """The recipe's own entry point, in this process, as `python recipes/<recipe>/train.py ARGS`."""
    import importlib

    return importlib.import_module(f"recipes.{recipe}.train").main(args)


@pytest.mark.parametrize("source", SOURCES)
def test_error_mode_names_the_first_bad_sample_and_exits_2(source, tmp_path, capsys, fresh_accelerate_state):
    recipe, args, bad = SOURCES[source](tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(recipe, [*args, *QUICK_RUN, "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("shardvision: error:")]
    assert len(errors) == 1, errors
    # Which bad sample a shuffled epoch meets first is the data order's business: it must be one of them.
    assert any(re.search(pattern, errors[0]) for pattern in bad["train"] + bad["eval"]), errors[0]
    assert errors[0].endswith(("set data.bad_samples: skip to train without it.", "to leave such annotations out)"))


@pytest.mark.parametrize("source", SOURCES)
def test_skip_mode_trains_without_them_and_lists_each_once(source, tmp_path, fresh_accelerate_state):
    recipe, args, bad = SOURCES[source](tmp_path / "data")
    run = tmp_path / "run"
    metrics = run_recipe(recipe, [*args, *QUICK_RUN, "--data.bad_samples", "skip", "--output-dir", str(run)])
    listed = (run / "bad_samples.txt").read_text().splitlines()
    expected = bad["train"] + bad["eval"]
    assert len(listed) == len(expected), listed
    for pattern in expected:
        assert sum(bool(re.search(pattern, line)) for line in listed) == 1, (pattern, listed)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    assert train[-1]["bad_samples"] == len(bad["train"])  # every one met in training, by its last log
    eval_rows = [r for r in rows if r["split"] == "eval"]
    primary = {"classification": "top1", "segmentation": "mIoU", "detection": "AP"}[recipe]
    assert len(eval_rows) == 1 and np.isfinite(metrics[primary])
    counted = {"classification": "samples", "segmentation": "images", "detection": "images"}[recipe]
    eval_size = {"classification": 8, "segmentation": 4, "detection": 4}[recipe]
    assert eval_rows[-1][counted] == eval_size - len(bad["eval"])  # a stand-in sample is never scored


def test_read_image_names_the_file_for_each_kind_of_damage(tmp_path):
    noise_image(tmp_path / "good.jpg")
    assert read_image(str(tmp_path / "good.jpg")).size == (32, 32)
    noise_image(tmp_path / "truncated.jpg")
    truncate(tmp_path / "truncated.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    for name in ("truncated.jpg", "empty.png", "text.jpg", "missing.jpg"):
        with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / name))}: cannot read image \("):
            read_image(str(tmp_path / name))


class Flaky(torch.utils.data.Dataset):
    def __init__(self, n, bad):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise DataError(f"file{i}.jpg: cannot read image")
        return {"image": torch.full((2,), float(i))}


def test_a_bad_sample_is_replaced_by_the_next_readable_one_and_reported():
    guarded = GuardedSamples(Flaky(10, bad={3, 4, 9}), "train")
    collate = GuardedCollate(torch.utils.data.default_collate)
    batch, report = collate([guarded[i] for i in (2, 3, 4, 9)])
    assert batch["image"][:, 0].tolist() == [2, 5, 5, 0]  # 3 and 4 both stand-in'd by 5; 9 wraps to 0
    assert report.ok.tolist() == [True, False, False, False]
    assert report.problems == [
        "train sample 3: file3.jpg: cannot read image",
        "train sample 4: file4.jpg: cannot read image",
        "train sample 4: file4.jpg: cannot read image",
        "train sample 9: file9.jpg: cannot read image",
    ]
    assert not report.fatal


def test_a_run_of_unreadable_samples_is_fatal():
    guarded = GuardedSamples(Flaky(40, bad=range(5, 5 + MAX_SUBSTITUTES + 1)), "eval")
    batch, report = GuardedCollate(torch.utils.data.default_collate)([guarded[5]])
    assert batch is None and report.fatal.startswith(
        f"{MAX_SUBSTITUTES + 1} samples in a row cannot be read, e.g. eval sample {5 + MAX_SUBSTITUTES}"
    )


def test_check_samples_reads_everything_in_parallel_and_reports_every_problem():
    problems, read = check_samples(Flaky(50, bad={3, 4, 17, 49}), "train", num_workers=2, batch_size=8)
    assert read == 50
    assert problems == [f"train sample {i}: file{i}.jpg: cannot read image" for i in (3, 4, 17, 49)]
