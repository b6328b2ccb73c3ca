"""Launching runs as a user would (a free port each, the real launchers) and reading what they wrote."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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


# The transformers ViT of the digits, three steps under ZeRO-3 (the model built whole, then
# partitioned; its export gathered): a fine-tune's starting weights and a transformers final/.
HF_VIT = ["--config", "recipes/classification/configs/digits_hf_vit.yaml", *QUICK]
HF_VIT_3_STEPS = [*HF_VIT, "--loop.max_steps", "3"]
ZERO3_LAUNCH = dict(launcher="accelerate", accelerate_config=str(REPO / "accelerate_configs" / "deepspeed_zero3.yaml"))

# Six steps of 32-sample micro-batches, each step logged, one checkpoint at step 3: a run to stop
# there and resume. Step 3 is odd, so a 2-rank run's micro-batch count does not fall on a window
# of 2 micro-batches (1 rank, accumulation 2).
STOPPED_AT_3_OF_6 = [
    "--data.micro_batch_size",
    "32",
    "--loop.max_steps",
    "6",
    "--logging.every_steps",
    "1",
    "--logging.count_flops",
    "false",
    "--checkpoint.every_steps",
    "3",
    "--checkpoint.at_epoch_end",
    "false",
]

# Two short epochs of the digits demo on the tiny ViT, logging every step; dropout on, so resuming
# must also restore the RNG, and random-resized-crop on, so it must also replay the augmentations.
# (resnet18 took 16.7 s a launch here, the tiny ViT 9.3 s; test_background_saves keeps resnet18.)
TRAJECTORY = [
    "--config",
    DIGITS,
    *QUICK,
    "--model.name",
    "test_vit",
    "--model.kwargs",
    "{img_size: 32, drop_rate: 0.2}",
    "--loop.epochs",
    "2",
    "--logging.every_steps",
    "1",
    "--checkpoint.at_epoch_end",
    "false",
]

# Two steps of the tiny ViT with an EMA of its weights: under ZeRO-3 (conftest's short_zero3_run)
# its last checkpoint holds DeepSpeed's shards and the EMA's per-rank files.
SHORT_ZERO3 = [*TINY_VIT, "--loop.max_steps", "2", "--loop.ema_decay", "0.9", "--logging.count_flops", "false"]

# The tiny ViT without dropout, AdamW with an EMA of the weights, 8 steps, a checkpoint at step 4:
# the moments and the average are what a resume must keep. No batch statistics (which would differ
# between 1x64 and 2x32 samples per rank), so ZeRO and DDP runs of any world size follow one
# trajectory, to float noise (measured below), and are held to the uninterrupted 2-rank DDP run.
ELASTIC = [
    *TINY_VIT,
    "--optim.name",
    "adamw",
    "--optim.lr",
    "0.003",
    "--loop.max_steps",
    "8",
    "--logging.every_steps",
    "1",
    "--checkpoint.every_steps",
    "4",
    "--checkpoint.at_epoch_end",
    "false",
    "--loop.ema_decay",
    "0.9",
    "--logging.count_flops",
    "false",  # a forward at start-up, in every launch, that no test reads
]
ELASTIC_MICRO = {1: "64", 2: "32", 4: "16"}  # a global batch of 64 at any world size
# ZeRO against DDP, both fp32: the same seed, samples and global batch, the gradients reduced in
# another order. Measured on ELASTIC's ZeRO runs, the references and the resumed ones
# (2026-12-05): losses 2.2e-7 relative apart at most; every weight and averaged weight 1.4e-7 apart
# (2e-6 relative), but the attention key bias, moved by normalised noise (it has no gradient in
# exact arithmetic, so Adam moves it by normalised rounding): up to 8.9e-6 apart in the weights,
# 2e-6 in their average.
DDP_LOSS_TOLERANCE = 1e-5  # relative
DDP_WEIGHT_TOLERANCE = dict(rtol=1e-5, atol=1e-6)
DDP_KEY_BIAS_TOLERANCE = dict(rtol=0.0, atol=1e-4)


def accelerate_config(name: str) -> str:
    return str(REPO / "accelerate_configs" / name)


def elastic_launch(args: list[str], layout: str, nproc: int, configs: dict[str, str]) -> dict:
    """`launch` arguments for `args` under `layout` (ddp: torchrun; zero2/zero3: accelerate with
    `configs`) on `nproc` ranks, with the micro-batch that keeps ELASTIC's global batch at 64."""
    args = [*args, "--data.micro_batch_size", ELASTIC_MICRO[nproc]]
    if layout == "ddp":
        return dict(args=args, launcher="torchrun", nproc=nproc)
    return dict(args=args, launcher="accelerate", accelerate_config=configs[layout], nproc=nproc)


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


def logged_step(run_dir: Path) -> int:
    """The latest train step `run_dir`'s metrics.jsonl holds (0 before the first)."""
    if not (run_dir / "metrics.jsonl").exists():
        return 0
    return max((row["step"] for row in read_metrics(run_dir, "train")), default=0)


def wait_until(
    done: Callable[[], bool],
    what: str,
    processes: Sequence[subprocess.Popen] = (),
    output: Callable[[], str] = str,
    timeout: float = 400,
    poll: float = 0.05,
) -> None:
    """Poll `done` (a file, a logged step, a process state) every `poll` seconds until it holds.
    Fails, with `output()` (the runs' stderr or logs), as soon as one of `processes` has ended
    first, or after `timeout` seconds, killing them: a wait never outlives its run, nor hangs the
    suite. (A file to act on the moment it appears, a kill at a checkpoint: poll=0.005; a check
    that parses metrics.jsonl keeps the default, not to take the runs' CPU.)"""
    deadline = time.monotonic() + timeout
    while not done():
        ended = [p for p in processes if p.poll() is not None]
        if ended or time.monotonic() > deadline:
            for p in processes:
                kill_tree(p.pid)
            why = f"a run ended (exit {ended[0].returncode})" if ended else f"{timeout:.0f} s passed"
            raise AssertionError(f"{why} before {what}\n{output()[-4000:]}")
        time.sleep(poll)


class BackgroundRun:
    """A launch running while the test acts on it (kills, signals, freezes). Its stderr goes to a
    file, never a pipe that could fill and block it, and is in every failure message."""

    def __init__(self, cmd: list[str], **popen_kwargs) -> None:
        fd, name = tempfile.mkstemp(prefix="shardvision-stderr-", suffix=".log")
        os.close(fd)
        self.stderr_path = Path(name)
        with open(self.stderr_path, "ab") as err:  # append mode: the ranks' writes never overlap
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=run_env(), stdout=subprocess.DEVNULL, stderr=err, **popen_kwargs
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_until(self, done: Callable[[], bool], what: str, timeout: float = 400, poll: float = 0.05) -> None:
        wait_until(done, what, [self.proc], self.stderr, timeout, poll)

    def wait_for_file(self, path: Path, timeout: float = 400) -> None:
        self.wait_until(path.exists, str(path), timeout, poll=0.005)

    def wait_for_step(self, run_dir: Path, step: int, timeout: float = 300) -> None:
        self.wait_until(lambda: logged_step(run_dir) >= step, f"train step {step} in {run_dir}", timeout)

    def wait_for_exit(self, timeout: float = 300) -> str:
        """The run's exit, within `timeout` seconds; returns its stderr."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            raise AssertionError(f"the run did not end within {timeout:.0f} s\n{self.stderr()[-4000:]}") from None
        return self.stderr()

    def __enter__(self) -> BackgroundRun:
        return self

    def __exit__(self, *exc) -> None:
        kill_tree(self.proc.pid)  # whatever the test left running, as when it failed half-way
        self.proc.wait()
        self.stderr_path.unlink(missing_ok=True)


def start(args: list[str], launcher: str = "torchrun", nproc: int = 2, **kwargs) -> BackgroundRun:
    """`launch`, in the background: use it as a context manager, which ends every process it left."""
    return BackgroundRun(launch_command(args, launcher, nproc, **kwargs))


def rank_processes(launcher_pid: int) -> dict[int, psutil.Process]:
    """The launched ranks by their RANK, once both have started."""
    ranks: dict[int, psutil.Process] = {}

    def both_started() -> bool:
        ranks.clear()
        for p in psutil.Process(launcher_pid).children(recursive=True):
            try:
                if "train.py" in " ".join(p.cmdline()) and "RANK" in p.environ():
                    ranks[int(p.environ()["RANK"])] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return len(ranks) == 2

    wait_until(both_started, "the two ranks started", timeout=120)
    return ranks


def run_killed_when(args: list[str], marker: Path, rank: int | None = None, **launch_kwargs) -> None:
    """Start a run and SIGKILL all its processes as soon as `marker` exists, or with `rank` only
    that rank, leaving it to the launcher to notice and stop the others."""
    with start(args, **launch_kwargs) as run:
        run.wait_for_file(marker)
        if rank is None:
            return  # leaving the block kills every process
        rank_processes(run.pid)[rank].kill()
        run.wait_for_exit(timeout=120)
        assert run.returncode != 0


def run_killed_after_checkpoint(args: list[str], run_dir: Path, step: int, **launch_kwargs) -> None:
    """Start a run, SIGKILL all its processes once checkpoint `step` is complete."""
    run_killed_when(args, run_dir / "checkpoints" / str(step) / "manifest.json", **launch_kwargs)


def rows_of_the_last_launch(run_dir: Path, split: str) -> list[dict]:
    """The `split` rows metrics.jsonl holds from its last `run` row on: the latest launch's."""
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    start = max(i for i, row in enumerate(rows) if row["split"] == "run")
    return [row for row in rows[start:] if row["split"] == split]


def assert_resumed_exactly(run_dir: Path, reference: Path, checkpoint: int) -> None:
    """The last launch resumed from `checkpoint` (a launch that started afresh by mistake would also
    end on the reference: the same seed) and trained each later step once, with the reference's
    loss; every row the launches before logged is the reference's too; the final weights are the
    reference's, bit for bit."""
    assert last_launch(run_dir)["resumed_from"] == str(run_dir / "checkpoints" / str(checkpoint))
    expected = train_losses(reference)
    resumed = [(row["step"], row["loss"]) for row in rows_of_the_last_launch(run_dir, "train")]
    assert resumed == [(step, expected[step][0]) for step in range(checkpoint + 1, max(expected) + 1)], resumed
    got = train_losses(run_dir)
    assert sorted(got) == sorted(expected)
    assert all(loss == expected[step][0] for step, losses in got.items() for loss in losses), got
    assert final_weights_equal(reference, run_dir)


def assert_follows_ddp(ddp_run: Path, run_dir: Path) -> None:
    """A run of ELASTIC that ends under ZeRO (resumed on other ranks, from another strategy, or on
    two nodes), held to the uninterrupted 2-rank DDP run: every loss it logged, by any of its
    launches, its final weights and their average, to the measured float noise. The Adam moments
    are held to DDP's through these: a moment lost or misplaced changes every later update of its
    weight, and a reset optimizer moves the loss by far more than the tolerance within one step."""
    import pytest
    import torch
    from safetensors.torch import load_file

    expected, got = train_losses(ddp_run), train_losses(run_dir)
    assert set(range(5, 9)) <= set(got) <= set(expected)
    for step, losses in got.items():
        assert losses == pytest.approx([expected[step][0]] * len(losses), rel=DDP_LOSS_TOLERANCE), (step, expected)
    for file in ("model.safetensors", "model_ema.safetensors"):
        ddp, zero = (load_file(run / "final" / file) for run in (ddp_run, run_dir))
        assert ddp.keys() == zero.keys(), file
        for name, value in ddp.items():
            resumed, what = zero[name], f"{file} {name}, against DDP"
            if name.endswith("attn.qkv.bias"):  # [query | key | value]: the key third on its own
                third = value.numel() // 3
                key = slice(third, 2 * third)
                torch.testing.assert_close(resumed[key], value[key], **DDP_KEY_BIAS_TOLERANCE, msg=f"{what} (key)")
                resumed, value = (torch.cat([t[:third], t[2 * third :]]) for t in (resumed, value))
            torch.testing.assert_close(resumed, value, **DDP_WEIGHT_TOLERANCE, msg=what)


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


def samples_per_step(run_dir: Path, tag: str, ranks: int, accumulation: int, first_step: int) -> dict[int, list[int]]:
    """The sorted sample numbers each optimizer step (numbered from `first_step` + 1) of launch
    `tag` trained on, from every rank's record of its micro-batches (tests/recording_train.py)."""
    steps: dict[int, list[int]] = {}
    for rank in range(ranks):
        lines = (run_dir / f"samples-{tag}-rank{rank}.jsonl").read_text().splitlines()
        for i, line in enumerate(lines):
            steps.setdefault(first_step + i // accumulation + 1, []).extend(json.loads(line))
    return {step: sorted(numbers) for step, numbers in steps.items()}


def without_shardvision(script: str, *args: str, cwd: Path) -> dict:
    """What `script` prints as JSON on its last line, run by `python -c` in a process that must
    not import shardvision (a user of the model's own library alone)."""
    check = '\nimport sys\nassert not {"core", "recipes"} & set(sys.modules), "shardvision was imported"\n'
    proc = subprocess.run(
        [sys.executable, "-c", script + check, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def docs_snippet(doc: str, name: str) -> str:
    """The python block after `<!-- loading snippet: NAME -->` in docs/DOC, with its first line
    `folder, image_file = "...", "..."` made to read both from the command line: the docs' code,
    run as printed."""
    text = (REPO / "docs" / doc).read_text()
    block = text.split(f"<!-- loading snippet: {name} -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    code, count = re.subn(r'^folder, image_file = ".*", ".*"$', "folder, image_file = sys.argv[1:3]", block, flags=re.M)
    assert count == 1, f"docs/{doc}: the {name} snippet sets folder, image_file once"
    return "import sys\n" + code
