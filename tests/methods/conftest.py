"""Shared recipe-test data: FP trajectories of the tiny conditional bundle (tests/conftest.py)."""
from __future__ import annotations

import pytest

from diffquant.calib.capture import capture_trajectories


@pytest.fixture(scope="module")
def trajectories(bundle, tmp_path_factory):
    """4 trajectories × 4 DDIM steps with guidance 2 (test_edadm.py overrides it with TDAC hooks)."""
    return capture_trajectories(bundle, 4, steps=4, guidance=2.0, batch_size=4, progress=False,
                                cache_dir=tmp_path_factory.mktemp("traj"))
