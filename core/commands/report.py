"""`shardvision report RUN_DIR [RUN_DIR ...]`: one self-contained HTML page of one or several runs.

    shardvision report runs/digits                          # runs/digits/report.html
    shardvision report runs/a runs/b --out compare.html     # curves overlaid, the config keys that differ

From each run folder's metrics.jsonl and config.yaml: a plot per training series (loss, lr,
gradient norm, images/s, MFU, memory) and per evaluation metric over optimizer steps, the last
evaluation's per-class table, each launch's run summary and, for several runs, the config keys
whose values differ. Plots are matplotlib PNGs embedded in the page, so it opens offline and
runs no script. It reads a run still in progress (a line being written is skipped) and a run
that resumed several times: a step logged by a launch and again by the launch that resumed
before it counts once, the later value (the one the run continued from).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from core.config_parsing import flat_dict
from core.entry import known_failures_exit
from core.errors import RunFolderError

TRAIN_SERIES = ("loss", "lr", "grad_norm", "images_per_sec", "tflops_per_device", "mfu", "memory_mb")
NOT_PLOTTED = {"samples", "images"}  # evaluation counts, not metrics


@dataclass
class Run:
    """What one run folder says about itself."""

    folder: str
    label: str
    series: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)  # split -> name -> step -> value
    launches: list[dict] = field(default_factory=list)  # the `run` row of each launch
    last_eval: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def read_run(folder: str, label: str | None = None) -> Run:
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        raise RunFolderError(f"{folder}: no metrics.jsonl (is it a shardvision run folder?)")
    run = Run(folder, label or os.path.basename(os.path.abspath(folder)))
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a running job is writing
            split, step = row.get("split"), row.get("step")
            if split == "run":
                run.launches.append(row)
                continue
            if split not in ("train", "eval") or step is None:
                continue
            for name, value in row.items():
                if name in ("step", "epoch", "split") or not isinstance(value, (int, float)):
                    continue
                run.series.setdefault(split, {}).setdefault(name, {})[step] = float(value)  # later launch wins
            if split == "eval":
                run.last_eval = row
    config = os.path.join(folder, "config.yaml")
    if os.path.isfile(config):
        with open(config) as f:
            run.config = flat_dict(yaml.safe_load(f) or {})
    return run


def plotted_metrics(runs: list[Run]) -> list[tuple[str, str]]:
    """(split, name) of every plot, in page order: the training series, then each evaluation metric
    (per-class values, named metric/class, go to the table instead)."""
    train = {n for r in runs for n in r.series.get("train", {})}
    evaluated = {n for r in runs for n in r.series.get("eval", {}) if "/" not in n and n not in NOT_PLOTTED}
    ordered = [("train", n) for n in TRAIN_SERIES if n in train]
    ordered += [("train", n) for n in sorted(train - set(TRAIN_SERIES))]
    return ordered + [("eval", n) for n in sorted(evaluated)]


def _plot(runs: list[Run], split: str, name: str) -> str:
    """One metric of every run over optimizer steps, as a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.0, 3.2), dpi=100)
    for run in runs:
        points = sorted(run.series.get(split, {}).get(name, {}).items())
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o" if split == "eval" or len(points) < 30 else None, label=run.label)
    axes.set_title(f"{split} / {name}")
    axes.set_xlabel("optimizer step")
    axes.grid(alpha=0.3)
    if len(runs) > 1:
        axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def differing_config(runs: list[Run]) -> list[tuple[str, list[Any]]]:
    keys = sorted({k for r in runs for k in r.config})
    missing = object()
    rows = []
    for key in keys:
        values = [r.config.get(key, missing) for r in runs]
        if any(v != values[0] for v in values[1:]):
            rows.append((key, ["(absent)" if v is missing else v for v in values]))
    return rows


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def per_class_table(evaluation: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """An evaluation row's per-class values (`<metric>/<class>`, e.g. IoU/cat, AP50/cat,
    ema_top1/cat) as a table: a row per class and a column per metric, both in logged order (the
    data's class order)."""
    metrics: dict[str, None] = {}
    values: dict[str, dict[str, Any]] = {}
    for key, value in evaluation.items():
        if "/" in key and isinstance(value, (int, float)):
            metric, name = key.split("/", 1)  # a class name may hold a "/" of its own
            metrics.setdefault(metric)
            values.setdefault(name, {})[metric] = value
    rows = [[name, *(f"{row[m]:.4g}" if m in row else "" for m in metrics)] for name, row in values.items()]
    return ["class", *metrics], rows


def render(runs: list[Run]) -> str:
    """The page, as one HTML string."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>shardvision report</title><style>"
        "body{font-family:sans-serif;margin:24px}img{margin:4px;border:1px solid #ddd}"
        ".plots{display:flex;flex-wrap:wrap}"
        "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "</style></head><body>",
        f"<h1>shardvision report: {html.escape(', '.join(r.label for r in runs))}</h1>",
    ]
    for run in runs:
        steps = max((max(s) for s in run.series.get("train", {}).values() if s), default=0)
        parts.append(f"<h2>{html.escape(run.label)}</h2><p>{html.escape(run.folder)}: {steps} optimizer steps logged, ")
        parts.append(f"{len(run.launches)} launch(es)</p>")
        if run.launches:  # a column per launch
            keys = [k for k in run.launches[-1] if k not in ("split", "epoch")]
            header = ["", *[f"launch {i + 1}" for i in range(len(run.launches))]]
            parts.append(_table(header, [[k, *[launch.get(k, "") for launch in run.launches]] for k in keys]))
        header, rows = per_class_table(run.last_eval)
        if rows:
            parts.append(f"<h3>per-class results at step {run.last_eval['step']}</h3>")
            parts.append(_table(header, rows))
    if len(runs) > 1:
        parts.append("<h2>config keys that differ</h2>")
        differing = differing_config(runs)
        parts.append(
            _table(["key", *[r.label for r in runs]], [[k, *v] for k, v in differing]) if differing else "<p>none</p>"
        )
    parts.append("<h2>curves</h2><div class='plots'>")
    for split, name in plotted_metrics(runs):
        png = _plot(runs, split, name)
        parts.append(f"<img class='plot' alt='{split}/{html.escape(name)}' src='data:image/png;base64,{png}'>")
    parts.append("</div></body></html>")
    return "".join(parts)


def report_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="shardvision report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with its metrics.jsonl)")
    parser.add_argument("--out", help="the HTML file (default <first run>/report.html)")
    args = parser.parse_args(argv)
    labels = [os.path.basename(os.path.abspath(r)) for r in args.runs]
    if len(set(labels)) < len(labels):  # runs/a/x and runs/b/x: tell them apart by their paths
        labels = list(args.runs)
    with known_failures_exit():
        runs = [read_run(folder, label) for folder, label in zip(args.runs, labels, strict=True)]
    out = args.out or os.path.join(args.runs[0], "report.html")
    with open(out, "w") as f:
        f.write(render(runs))
    print(out)
