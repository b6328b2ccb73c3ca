"""Fixtures for every test. Shared code lives in tests/helpers.py (launching and reading runs) and
tests/builders.py (tiny tasks, data sets with known faults, independent references)."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from filelock import FileLock

from tests.helpers import (
    ELASTIC,
    REPO,
    SHORT_ZERO3,
    TRAJECTORY,
    accelerate_config,
    elastic_launch,
    last_launch,
    launch,
    read_metrics,
)

# The files holding a test of minutes (a metric run, the busy-machine runs): started first, so
# that neither of `make test`'s two workers ends the session alone on one of them.
LONGEST_FIRST = ("test_detection_runs.py", "test_segmentation_runs.py", "test_failure_runs.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    integration = Path(__file__).parent / "integration"
    for item in items:
        if integration in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
    first = {name: rank for rank, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(Path(item.fspath).name, len(first)))  # stable: the rest as collected


def pytest_configure(config: pytest.Config) -> None:
    """One compute thread per pytest worker: two workers share the two cores, and with torch's
    default of a thread per core, in-process tests ran 3 times slower while the other worker's
    runs held the cores (the detection unit tests' bf16 steps: 29 s against 10 s)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_shared_memory_left_behind():
    """A DeepSpeed rank killed by a test can leave its shared-memory all-reduce buffer in /dev/shm
    (RAM, about 69 MB a rank), which a normal exit removes. What the test's runs left is removed
    when it ends: a buffer made since it started that no process maps any more (the other pytest
    worker's run may be using its own)."""
    started = time.time()
    yield
    left = [p for p in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*") if os.stat(p).st_mtime >= started]
    if left:
        for path in set(left) - mapped_files():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def mapped_files() -> set[str]:
    """Every file some process on this machine has mapped into memory."""
    mapped = set()
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            mapped.update(m.path for m in process.memory_maps(grouped=True))
    return mapped


@pytest.fixture
def fresh_accelerate_state():
    """In-process Accelerator tests: start from and leave behind a clean accelerate singleton."""
    from core.distributed import reset_accelerator_state

    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        del os.environ[key]
    reset_accelerator_state()
    yield
    reset_accelerator_state()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def session_folder(tmp_path_factory) -> Path:
    """A folder of this test session's, the same for both of `make test`'s pytest workers
    (pytest-xdist): what one worker makes there, the other finds."""
    folder = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        folder = folder.parent  # the session's folder, above each worker's own
    (folder / "shared").mkdir(exist_ok=True)
    return folder / "shared"


@pytest.fixture(scope="session")
def uninterrupted(session_folder) -> Callable[..., Path]:
    """uninterrupted(args, **launch_kwargs): the folder of an uninterrupted launch of `args` (given
    no --output-dir), the reference that killed, resumed, stopped and otherwise laid out runs of the
    same arguments must reproduce. Launched when a test first asks for it, wherever that test comes
    in the session, and shared by every later test asking for the same arguments and launch.
    Under `make test`'s two pytest workers (pytest-xdist) it is launched once for both: the first
    worker to ask launches it under a file lock, the other waits on that lock and reads it."""

    def reference(args: list[str], **launch_kwargs) -> Path:
        key = json.dumps([args, sorted(launch_kwargs.items())])
        run_dir = session_folder / hashlib.sha256(key.encode()).hexdigest()[:16]
        with FileLock(f"{run_dir}.lock"):
            if not (run_dir / "launched.json").is_file():
                shutil.rmtree(run_dir, ignore_errors=True)  # what a launch that failed left
                launch([*args, "--output-dir", str(run_dir)], **launch_kwargs)
                (run_dir / "launched.json").write_text(key)
        return run_dir

    return reference


@pytest.fixture(scope="session")
def ddp_reference(uninterrupted) -> Path:
    """An uninterrupted 2-rank DDP run (torchrun) of TRAJECTORY: what killed, resumed, stopped and
    multi-node runs of it must reproduce bit for bit."""
    run_dir = uninterrupted(TRAJECTORY, launcher="torchrun")
    run = last_launch(run_dir)
    assert (run["world_size"], run["strategy"], run["optimizer"], run["update_kernel"]) == (2, "ddp", "AdamW", "fused")
    return run_dir


@pytest.fixture(scope="session")
def zero_configs(session_folder) -> dict[str, str]:
    """The repo's accelerate config per ZeRO stage; ZeRO-3's with a parameter persistence threshold
    of 1000 values instead of 100000, so that the tiny ViT has both kinds of ZeRO-3 parameters, as a
    large model does: weights partitioned between steps, biases and norms kept whole. Written where
    both pytest workers find it, so that their references of it are one."""
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 1000
    zero3 = (REPO / "accelerate_configs" / "deepspeed_zero3.yaml").read_text()
    assert "ds_configs/zero3.json" in zero3
    with FileLock(session_folder / "zero_configs.lock"):  # the other worker may be launching with them
        if not (session_folder / "zero3.yaml").is_file():
            (session_folder / "zero3.json").write_text(json.dumps(ds))
            zero3 = zero3.replace("ds_configs/zero3.json", str(session_folder / "zero3.json"))
            (session_folder / "zero3.yaml").write_text(zero3)
    return {"zero2": accelerate_config("deepspeed_zero2.yaml"), "zero3": str(session_folder / "zero3.yaml")}


@pytest.fixture(scope="session")
def elastic_reference(uninterrupted, zero_configs) -> Callable[[str], Path]:
    """elastic_reference(layout): the uninterrupted 2-rank run of ELASTIC under `layout` (ddp,
    zero2, zero3 with zero_configs' ZeRO-3): the trajectory and final state that resumed runs on
    other ranks, under other strategies or on two nodes must reproduce."""

    def reference(layout: str) -> Path:
        return uninterrupted(**elastic_launch(ELASTIC, layout, 2, zero_configs))

    return reference


@pytest.fixture(scope="session")
def short_zero3_run(uninterrupted, zero_configs) -> Path:
    """SHORT_ZERO3 on 2 ranks under zero_configs' ZeRO-3 (the tiny ViT's weights partitioned), its
    checkpoints written in the background (the default): the background side of the byte-for-byte
    comparison with a synchronous save, and a checkpoint to export."""
    run_dir = uninterrupted(SHORT_ZERO3, launcher="accelerate", accelerate_config=zero_configs["zero3"])
    run = last_launch(run_dir)
    assert run["zero_stage"] == 3 and run["parameters_on_this_rank"] < 0.6 * run["parameters"], run  # partitioned
    assert {row["background"] for row in read_metrics(run_dir, "checkpoint")} == {True}
    return run_dir
