"""Fixtures for every test. Shared code lives in tests/helpers.py (launching and reading runs) and
tests/builders.py (tiny tasks, data sets with known faults, independent references)."""

from __future__ import annotations

import os

import pytest


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
