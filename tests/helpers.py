"""Launching runs as a user would (a free port each, the real launchers) and reading what they wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CLASSIFY = "recipes/classification/train.py"
DIGITS = "recipes/classification/configs/digits.yaml"
# Small, quick and quiet: what every test run adds to the recipe's own config.
QUICK = ["--logging.progress_bar", "false", "--logging.trackers", "[]", "--data.num_workers", "0"]
# The digits demo with a small LayerNorm ViT at 32 px: no batch statistics, so a step does not
# depend on how its samples are spread over ranks or micro-batches.
TINY_VIT = ["--config", DIGITS, *QUICK, "--model.name", "test_vit", "--model.kwargs", "{img_size: 32}"]


# Two short epochs of the digits demo, logging every step; dropout on, so resuming must also
# restore the RNG, and random-resized-crop on, so it must also replay the augmentations.
TRAJECTORY = [
    "--config",
    DIGITS,
    *QUICK,
    "--loop.epochs",
    "2",
    "--logging.every_steps",
    "1",
    "--model.kwargs",
    "{drop_rate: 0.2}",
    "--checkpoint.at_epoch_end",
    "false",
]
ZERO_TRAJECTORY = [*TRAJECTORY, "--loop.max_steps", "13"]  # into the second epoch, shorter than DDP's


def accelerate_config(name: str) -> str:
    return str(REPO / "accelerate_configs" / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    args: list[str],
    launcher: str = "torchrun",
    nproc: int = 2,
    script: str = CLASSIFY,
    accelerate_config: str | None = None,
) -> list[str]:
    """The command line a user would type for `launcher`, with a free port of its own."""
    port = str(free_port())
    py = sys.executable
    if launcher == "torchrun":
        return [py, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port, script, *args]
    if launcher == "accelerate":
        return [
            py,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            accelerate_config,
            "--num_processes",
            str(nproc),
            "--main_process_port",
            port,
            script,
            *args,
        ]
    if launcher == "deepspeed":
        return [py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port, script, *args]
    if launcher == "python":
        return [py, script, *args]
    if launcher == "module":
        return [py, "-m", script.removesuffix(".py").replace("/", "."), *args]
    raise ValueError(launcher)


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in [k for k in env if k.startswith(("ACCELERATE_", "MASTER_", "LOCAL_RANK", "WORLD_SIZE", "RANK"))]:
        del env[key]
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch(
    args: list[str], launcher: str = "torchrun", nproc: int = 2, check: bool = True, timeout: int = 600, **kwargs
) -> subprocess.CompletedProcess:
    cmd = launch_command(args, launcher, nproc, **kwargs)
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- "
            f"stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def read_metrics(run_dir: Path, split: str) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [row for row in map(json.loads, f) if row["split"] == split]


def last_launch(run_dir: Path) -> dict:
    """The run row of the latest launch in `run_dir`: world size, strategy, steps, resumed_from..."""
    return read_metrics(run_dir, "run")[-1]


def train_losses(run_dir: Path) -> dict[int, list[float]]:
    """Each step's logged losses: one per launch that trained it (a resumed run repeats none)."""
    losses: dict[int, list[float]] = {}
    for row in read_metrics(run_dir, "train"):
        losses.setdefault(row["step"], []).append(row["loss"])
    return losses


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "final" / "model.safetensors")


def final_weights_equal(a: Path, b: Path) -> bool:
    import torch

    wa, wb = final_weights(a), final_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every rank under it, as when a node dies. (The launchers start their
    workers in sessions of their own, so killing the launcher's process group is not enough.)"""
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def rank_processes(launcher_pid: int) -> dict[int, psutil.Process]:
    """The launched ranks by their RANK, once both have started."""
    deadline = time.time() + 120
    while time.time() < deadline:
        ranks = {}
        for p in psutil.Process(launcher_pid).children(recursive=True):
            try:
                if "train.py" in " ".join(p.cmdline()) and "RANK" in p.environ():
                    ranks[int(p.environ()["RANK"])] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if len(ranks) == 2:
            return ranks
        time.sleep(0.1)
    raise AssertionError("the two ranks never started")


def run_killed_when(args: list[str], marker: Path, rank: int | None = None, **launch_kwargs) -> None:
    """Start a run and SIGKILL all its processes as soon as `marker` exists, or with `rank` only
    that rank, leaving it to the launcher to notice and stop the others."""
    cmd = launch_command(args, **launch_kwargs)
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 400
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"run ended (exit {proc.returncode}) before {marker} appeared:\n{proc.stderr.read().decode()[-4000:]}"
            )
        if time.time() > deadline:
            kill_tree(proc.pid)
            raise AssertionError(f"no {marker} within the time limit")
        time.sleep(0.005)
    if rank is not None:
        rank_processes(proc.pid)[rank].kill()
        try:
            proc.wait(timeout=120)
        finally:
            kill_tree(proc.pid)
        assert proc.returncode != 0
        return
    kill_tree(proc.pid)
    proc.wait()


def run_killed_after_checkpoint(args: list[str], run_dir: Path, step: int, **launch_kwargs) -> None:
    """Start a run, SIGKILL all its processes once checkpoint `step` is complete."""
    run_killed_when(args, run_dir / "checkpoints" / str(step) / "manifest.json", **launch_kwargs)


def assert_export_is_whole(path: Path, config_cls: type, task_cls: type, argv: list[str]) -> None:
    """The exported file loads strictly (every parameter and buffer, full shapes) into the model
    the recipe builds, unsharded, and holds finite values: a ZeRO-3 export is whole."""
    import torch
    from safetensors.torch import load_file

    from core.config_parsing import parse_args
    from core.weights import load_weights

    cfg = parse_args(config_cls, argv)
    model = task_cls(cfg).build_model()
    load_weights(model, str(path))
    tensors = load_file(str(path))
    assert len(tensors) == len(model.state_dict())
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
