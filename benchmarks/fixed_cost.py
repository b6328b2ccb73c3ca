"""A whole run's wall time against timm's own train.py on identical work, and where shardvision's
fixed cost (start-up, per-epoch work) goes.

    python benchmarks/fixed_cost.py --timm-train PATH/train.py                  # 2 pairs, 5 epochs
    python benchmarks/fixed_cost.py --timm-train PATH/train.py --repeats 3 --epochs 15
    python benchmarks/fixed_cost.py --breakdown-only                            # no timm needed

The work: scikit-learn's digits (the demo's split, 1,437 train / 360 val) written once as an
ImageFolder of PNG files, ResNet-18 from random init at 32 px, batch 64, AdamW lr 2e-3 wd 0.05,
cosine with 1 warmup epoch (stepped per update in both), gradient clipping 1.0, the demo's
augmentation (RandomResizedCrop scale 0.7-1, ratio 0.9-1.1, no flip, no colour jitter, no
label smoothing), `--workers` loader processes, one evaluation per epoch, one process each with
the same OMP/MKL thread count. Checkpoints as each writes them by default: timm saves
last.pth.tar each epoch (model + optimizer, with checkpoint-<epoch> and model_best links);
shardvision saves its checkpoint each epoch (background write, keep_last 2) and exports
final/model.safetensors. shardvision also writes metrics.jsonl and TensorBoard events, timm
summary.csv.

timm's train.py is in timm's repository, not in its wheel, and is not copied here: pass its path
(`git show <tag>:train.py` in a clone of huggingface/pytorch-image-models, the tag of the timm
installed) with --timm-train or $TIMM_TRAIN.

Runs alternate timm, shardvision, timm, shardvision...; each wall time is printed, then the
medians and, as the last line, the ratio shardvision / timm of the medians (target <= 1.0). The
breakdown of shardvision's side: which packages its start-up imports (python -X importtime of a
1-step run, by top-level package), the time to the `run` row (built), to the first step (the
`startup` row) and each epoch's train / save stall / evaluation, from the time each metrics.jsonl
row appeared.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "recipes" / "classification" / "configs" / "digits.yaml"
WATCHED_PACKAGES = (
    "deepspeed",
    "transformers",
    "pycocotools",
    "tensorboard",
    "wandb",
    "mlflow",
    "sklearn",
    "datasets",
    "torchmetrics",
)


def write_digits_imagefolder(root: str) -> str:
    """The digits demo's two splits as root/{train,val}/<digit>/<index>.png (8x8 RGB, as the demo
    reads them); written once, atomically, and reused."""
    from core.data import folder_written_once
    from recipes.classification.data import Digits

    if os.path.isdir(root):
        return root
    with folder_written_once(root) as tmp:
        for split in ("train", "val"):
            digits = Digits(split)
            for i in range(len(digits)):
                image, label = digits[i]
                folder = os.path.join(tmp, split, str(label))
                os.makedirs(folder, exist_ok=True)
                image.save(os.path.join(folder, f"{i:04d}.png"))
    return root


def shardvision_cmd(args: argparse.Namespace, repo: str, data: str, out: str, extra: list[str] = ()) -> list[str]:
    return [
        sys.executable,
        str(Path(repo) / "recipes" / "classification" / "train.py"),
        "--config",
        str(DIGITS_CONFIG),
        "--data.source",
        "imagefolder",
        "--data.root",
        data,
        "--data.num_workers",
        str(args.workers),
        "--loop.epochs",
        str(args.epochs),
        "--output-dir",
        out,
        "--logging.progress_bar",
        "false",
        *extra,
    ]


def timm_cmd(args: argparse.Namespace, data: str, out: str) -> list[str]:
    # The digits demo's settings (recipes/classification/configs/digits.yaml) in train.py's flags.
    return [
        sys.executable,
        args.timm_train,
        *("--data-dir", data, "--train-split", "train", "--val-split", "val"),
        *("--model", "resnet18", "--num-classes", "10", "--input-size", "3", "32", "32", "--crop-pct", "1.0"),
        *("--scale", "0.7", "1.0", "--ratio", "0.9", "1.1", "--hflip", "0", "--color-jitter", "0"),
        *("--smoothing", "0", "--train-interpolation", "bilinear", "--interpolation", "bilinear"),
        *("--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"),
        *("-b", "64", "-j", str(args.workers), "--device", "cpu", "--no-prefetcher"),
        *("--opt", "adamw", "--lr", "2e-3", "--weight-decay", "0.05", "--clip-grad", "1.0"),
        *("--sched", "cosine", "--sched-on-updates", "--warmup-epochs", "1", "--warmup-lr", "2e-5", "--min-lr", "0"),
        *("--epochs", str(args.epochs), "--seed", "0", "--log-interval", "5"),
        *("--output", out, "--experiment", "run"),
    ]


def timed_run(cmd: list[str], env: dict, watch: str | None = None) -> tuple[float, list[tuple[float, str]], str]:
    """Run `cmd` to the end: its wall time, the time (from the start) each line of `watch`
    appeared, and its output. A failed run stops the benchmark."""
    rows: list[tuple[float, str]] = []
    done = threading.Event()
    start = time.perf_counter()

    def follow() -> None:
        seen = 0
        while True:
            finished = done.is_set()
            if watch and os.path.exists(watch):
                with open(watch) as f:
                    f.seek(seen)
                    chunk = f.read()
                complete = chunk[: chunk.rfind("\n") + 1]
                seen += len(complete)
                rows.extend((time.perf_counter() - start, line) for line in complete.splitlines())
            if finished:
                return
            time.sleep(0.02)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    done.set()
    follower.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return wall, rows, proc.stdout


def phases(rows: list[tuple[float, str]]) -> dict[str, object]:
    """From the time each metrics.jsonl row appeared: built (the `run` row), first step taken (the
    `startup` row), and per epoch: training, the checkpoint's stall (its own figure) and the
    evaluation (from the checkpoint row, which comes just before it, to the `eval` row)."""
    out: dict[str, object] = {"epochs": []}
    last_eval, last_ckpt = None, None
    for t, line in rows:
        row = json.loads(line)
        split = row["split"]
        if split == "run":
            out["built_s"] = t
        elif split == "startup":
            out["first_step_s"] = t
        elif split == "checkpoint":
            last_ckpt = (t, row["stall_s"])
        elif split == "eval":
            epoch_start = last_eval if last_eval is not None else out.get("built_s", 0.0)
            ckpt_t, stall = last_ckpt if last_ckpt is not None else (t, 0.0)
            out["epochs"].append({"train_s": ckpt_t - stall - epoch_start, "save_stall_s": stall, "eval_s": t - ckpt_t})
            last_eval, last_ckpt = t, None
        elif split == "final":
            out["final_s"] = t
    return out


def import_costs(args: argparse.Namespace, repo: str, data: str, env: dict, work: str) -> dict[str, float]:
    """Seconds of import per top-level package in a 1-step shardvision run (python -X importtime,
    each module's own time summed by its top-level package)."""
    out = os.path.join(work, "importtime")
    cmd = shardvision_cmd(args, repo, data, out, ["--loop.max_steps", "1"])
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=REPO, env=env, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode:
        sys.exit(f"the 1-step run failed:\n{proc.stderr[-4000:]}")
    costs: dict[str, float] = defaultdict(float)
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            costs[m.group(2).split(".")[0]] += int(m.group(1)) / 1e6
    return dict(costs)


def flop_count_seconds() -> float:
    """What the start-up FLOP count itself costs on this model (one 32 px sample)."""
    import timm
    import torch

    from core.run_log import training_flops_per_sample

    model = timm.create_model("resnet18", num_classes=10)
    sample = torch.randn(1, 3, 32, 32)
    start = time.perf_counter()
    training_flops_per_sample(model, lambda: model(sample), samples=1)
    return time.perf_counter() - start


def breakdown(args: argparse.Namespace, repo: str, data: str, env: dict, work: str, runs: list[dict]) -> None:
    costs = import_costs(args, repo, data, env, work)
    total = sum(costs.values())
    print(f"\n{repo}: start-up imports (1-step run, python -X importtime): {total:.2f} s in all")
    for name, s in sorted(costs.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {name:<24} {s:6.2f} s")
    absent = [p for p in WATCHED_PACKAGES if p not in costs]
    print("  not imported: " + (", ".join(absent) or "-"))
    print(f"start-up FLOP count (FlopCounterMode, one sample): {flop_count_seconds():.3f} s")
    for i, run in enumerate(runs):
        p = phases(run["rows"])
        epochs = p["epochs"]
        print(
            f"shardvision run {i + 1}: built {p.get('built_s', float('nan')):.1f} s, first step "
            f"{p.get('first_step_s', float('nan')):.1f} s, final export {p.get('final_s', float('nan')):.1f} s, "
            f"exit {run['wall']:.1f} s"
        )
        for e, ep in enumerate(epochs):
            print(
                f"  epoch {e}: train {ep['train_s']:.1f} s | checkpoint stall {ep['save_stall_s']:.2f} s | "
                f"evaluation {ep['eval_s']:.2f} s"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timm-train", default=os.environ.get("TIMM_TRAIN"), help="timm's train.py ($TIMM_TRAIN)")
    ap.add_argument("--repeats", type=int, default=2, help="pairs of runs (timm, shardvision)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=0, help="loader worker processes, both (the demo's 0)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="OMP/MKL threads, both")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "shardvision-digits-png"))
    ap.add_argument(
        "--repo",
        action="append",
        help="a shardvision checkout to run (repeat it to compare commits in one alternation; default: this one)",
    )
    ap.add_argument("--breakdown-only", action="store_true", help="one shardvision run and its breakdown, no timm")
    args = ap.parse_args()
    if not args.breakdown_only and not (args.timm_train and os.path.isfile(args.timm_train)):
        ap.error("--timm-train PATH (or $TIMM_TRAIN): timm's train.py, from its repository at the installed tag")

    data = write_digits_imagefolder(args.data)
    repos = [str(Path(r).resolve()) for r in args.repo or [REPO]]
    threads = str(args.threads)
    base_env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    base_env.pop("WORLD_SIZE", None)
    envs = {"timm": base_env, **{repo: {**base_env, "PYTHONPATH": repo} for repo in repos}}
    work = tempfile.mkdtemp(prefix="fixed-cost-")
    walls: dict[str, list[float]] = {name: [] for name in envs}
    ours: dict[str, list[dict]] = {repo: [] for repo in repos}
    order = repos if args.breakdown_only else list(envs)
    try:
        for repeat in range(1 if args.breakdown_only else args.repeats):
            for which in order:
                out = os.path.join(work, f"run-{repeat}")
                if which == "timm":
                    wall, _, _ = timed_run(timm_cmd(args, data, out), envs[which])
                    with open(os.path.join(out, "run", "summary.csv")) as f:
                        top1 = float(list(csv.DictReader(f))[-1]["eval_top1"])
                else:
                    cmd = shardvision_cmd(args, which, data, out)
                    wall, rows, _ = timed_run(cmd, envs[which], os.path.join(out, "metrics.jsonl"))
                    with open(os.path.join(out, "final", "metrics.json")) as f:
                        top1 = json.load(f)["top1"]
                    ours[which].append({"wall": wall, "rows": rows})
                walls[which].append(wall)
                print(f"round {repeat + 1}: {wall:7.1f} s  top-1 {top1:6.2f}%  {which}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        for repo in repos:
            breakdown(args, repo, data, envs[repo], work, ours[repo])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.breakdown_only:
        return
    medians = {k: statistics.median(v) for k, v in walls.items()}
    print(f"\nmedian wall, {args.epochs} epochs, {args.threads} threads: timm {medians['timm']:.1f} s")
    for repo in repos:
        print(f"  {repo}: {medians[repo]:.1f} s, ratio {medians[repo] / medians['timm']:.3f}")
    ratio = medians[repos[-1]] / medians["timm"]
    print(f"ratio shardvision / timm wall (median, {args.epochs} epochs): {ratio:.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
