"""Fixtures for every test. Shared code lives in tests/helpers.py (launching and reading runs) and
tests/builders.py (tiny tasks, data sets with known faults, independent references)."""

from __future__ import annotations

import contextlib
import glob
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import TRAJECTORY, ZERO_TRAJECTORY, accelerate_config, last_launch, launch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    integration = Path(__file__).parent / "integration"
    for item in items:
        if integration in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def no_shared_memory_left_behind():
    """A DeepSpeed rank killed by a test can leave its shared-memory all-reduce buffer in /dev/shm
    (RAM, about 69 MB a rank), which a normal exit removes. The test's processes are gone when it
    ends, so what it left is removed then."""
    started = time.time()
    yield
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_mtime >= started:
                os.remove(path)


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
def ddp_reference(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank DDP run (torchrun) of TRAJECTORY: what killed, resumed, stopped and
    multi-node runs of it must reproduce bit for bit."""
    run_dir = tmp_path_factory.mktemp("ddp_reference")
    launch([*TRAJECTORY, "--output-dir", str(run_dir)], launcher="torchrun")
    run = last_launch(run_dir)
    assert (run["world_size"], run["strategy"], run["optimizer"], run["update_kernel"]) == (2, "ddp", "AdamW", "fused")
    return run_dir


@pytest.fixture(scope="session")
def zero_reference(tmp_path_factory) -> Callable[[int], Path]:
    """zero_reference(stage): an uninterrupted single-host 2-rank ZeRO run of ZERO_TRAJECTORY
    (accelerate launch with the repo's config), made once per stage."""
    made: dict[int, Path] = {}

    def reference(stage: int) -> Path:
        if stage not in made:
            run_dir = tmp_path_factory.mktemp(f"zero{stage}_reference")
            config = accelerate_config(f"deepspeed_zero{stage}.yaml")
            launch([*ZERO_TRAJECTORY, "--output-dir", str(run_dir)], launcher="accelerate", accelerate_config=config)
            made[stage] = run_dir
        return made[stage]

    return reference
