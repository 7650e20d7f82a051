"""Shared pytest fixtures (keep small: each fixture is used by several test files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Tests use tiny models: one intra-op thread is faster than two (no OpenMP hand-offs) and keeps
    timings stable when the 2-core machine is shared. The measured fast path (ldm.fastpath) is pinned to fp32
    so exact values do not depend on the machine (its own tests set it explicitly), in this process and the
    subprocesses tests start."""
    torch.set_num_threads(1)
    os.environ.setdefault("LDM_PRECISION", "fp32")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny shapes dataset: 240 train samples in 8 shards of 30, 64 val samples in 8 shards of 8 (a quarter of
    the scenes with two objects, as the tests' exact counts were written for)."""
    from ldm.data.shapes import build_shapes

    out = tmp_path_factory.mktemp("shapes")
    build_shapes(out, train=240, val=64, size=32, seed=0, shard_size=30, processes=1, two_object_fraction=0.25)
    return out
