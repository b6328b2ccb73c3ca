"""`shardvision report` on real (tiny, in-process) runs: one that resumed after losing steps, and
a second one to compare; opened in headless Chromium where it is installed (CI installs it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from core.commands.report import plotted_metrics, read_run, report_main
from core.distributed import reset_accelerator_state
from core.trainer import Trainer
from tests.builders import TinyTask, tiny_config


def tiny_run(folder, lr=0.05, resume_after_losing_steps=False):
    cfg = tiny_config(folder)
    cfg.optim.lr, cfg.checkpoint.every_steps, cfg.checkpoint.keep_last = lr, 3, 10
    Trainer(cfg, TinyTask(cfg)).fit()
    reset_accelerator_state()
    if resume_after_losing_steps:  # as if killed after step 16 with only checkpoint 3 kept: 4..16 trained again
        for step in os.listdir(folder / "checkpoints"):
            if step.isdigit() and int(step) > 3:
                shutil.rmtree(folder / "checkpoints" / step)
        cfg.checkpoint.resume = "auto"
        Trainer(cfg, TinyTask(cfg)).fit()
        reset_accelerator_state()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    reset_accelerator_state()
    tiny_run(root / "resumed", resume_after_losing_steps=True)
    tiny_run(root / "other", lr=0.01)
    return root


def test_a_resumed_run_has_each_step_once_with_the_value_it_continued_from(runs):
    rows = [json.loads(line) for line in open(runs / "resumed" / "metrics.jsonl")]
    logged = [r["step"] for r in rows if r["split"] == "train"]
    assert len(logged) > len(set(logged))  # steps 4..16 were logged by both launches
    last = {r["step"]: r["loss"] for r in rows if r["split"] == "train"}  # the second launch's, by file order
    run = read_run(str(runs / "resumed"))
    assert run.series["train"]["loss"] == last and sorted(last) == list(range(1, 17))
    assert len(run.launches) == 2 and run.launches[1]["resumed_from"].endswith("checkpoints/3")

    with open(runs / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 17, "epoch": 2.1, "split": "tra')  # a line a running job is writing
    assert read_run(str(runs / "resumed")).series["train"]["loss"] == last


def test_the_page_has_a_plot_per_metric_and_the_config_keys_that_differ(runs, capsys):
    out = runs / "compare.html"
    report_main([str(runs / "resumed"), str(runs / "other"), "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    expected = plotted_metrics([read_run(str(runs / "resumed")), read_run(str(runs / "other"))])
    assert ("train", "loss") in expected and ("train", "lr") in expected and ("eval", "loss") in expected
    assert len(re.findall(r"<img class='plot'", page)) == len(expected)
    assert re.search(r"<tr><td>optim\.lr</td><td>0\.05</td><td>0\.01</td></tr>", page)
    assert "http" not in page.replace("https://", "").replace("http://", "")  # nothing to fetch

    with pytest.raises(SystemExit) as stop:
        report_main([str(runs / "nothing-here")])
    assert stop.value.code == 2 and "no metrics.jsonl" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("SHARDVISION_REQUIRE_CHROMIUM"),
    reason="no chromium here (CI installs it and sets SHARDVISION_REQUIRE_CHROMIUM)",
)
def test_the_report_opens_in_headless_chromium_without_a_console_error(runs, tmp_path):
    assert CHROMIUM, "SHARDVISION_REQUIRE_CHROMIUM is set but chromium is not installed"
    page = runs / "resumed" / "report.html"
    report_main([str(runs / "resumed")])
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1280,2400",
    ]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not re.search(r"CONSOLE.*(error|Uncaught)", dom.stderr, re.I), dom.stderr[-2000:]
    assert dom.stdout.count('class="plot"') == len(plotted_metrics([read_run(str(runs / "resumed"))]))
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 2400)
    assert image.getextrema()[0] < 100  # something drawn, not a blank page
