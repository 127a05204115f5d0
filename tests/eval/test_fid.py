import json

import numpy as np
import pytest

from diffquant.data import write_idx
from diffquant.errors import DiffquantError
from diffquant.eval.fid import FeatureStats, ReferenceStats, frechet_distance, reference_stats, select_subset
from conftest import FakeExtractor


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_1d_closed_form(method):
    # 1-D: (mu1-mu2)^2 + (s1-s2)^2 with standard deviations s
    d = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]), method=method)
    assert d == pytest.approx(9.0 + (2.0 - 3.0) ** 2, abs=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_diagonal_closed_form(method):
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)  # 5 + 2
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), method=method)
    assert got == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(7.0)


def test_frechet_distance_methods_agree_on_rank_deficient_covariances():
    rng = np.random.default_rng(0)
    a = FeatureStats.from_features(rng.normal(size=(40, 96)))
    b = FeatureStats.from_features(rng.normal(loc=0.3, scale=1.5, size=(40, 96)))
    d_sqrtm, d_eigh = a.frechet_distance(b, method="sqrtm"), a.frechet_distance(b, method="eigh")
    assert d_sqrtm > 10
    assert d_sqrtm == pytest.approx(d_eigh, rel=1e-5)
    assert abs(a.frechet_distance(a, method="sqrtm")) < 1e-4
    assert abs(a.frechet_distance(a, method="eigh")) < 1e-4


def test_frechet_distance_bad_inputs():
    with pytest.raises(DiffquantError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(DiffquantError, match="unknown"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")
    with pytest.raises(DiffquantError):
        FeatureStats.from_features(np.zeros((1, 4)))


def test_feature_stats_match_numpy():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(50, 5)).astype(np.float32)
    s = FeatureStats.from_features(f, keep_features=True)
    np.testing.assert_allclose(s.mu, f.astype(np.float64).mean(0))
    np.testing.assert_allclose(s.sigma, np.cov(f.astype(np.float64), rowvar=False))
    assert s.n == 50 and s.features.shape == (50, 5)


def test_select_subset():
    np.testing.assert_array_equal(select_subset(10, 3, None), [0, 1, 2])
    a, b = select_subset(100, 10, 7), select_subset(100, 10, 7)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 10
    with pytest.raises(DiffquantError):
        select_subset(10, 11, None)


@pytest.fixture
def tiny_dataset(tmp_path):
    """A 40-image fake 'mnist' test split in IDX-gz files."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    root.mkdir()
    images = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    write_idx(root / "t10k-images-idx3-ubyte.gz", images)
    write_idx(root / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, size=40, dtype=np.uint8))
    return root, images


def test_reference_stats_computed_then_cached(tiny_dataset, tmp_path):
    root, images = tiny_dataset
    ext = FakeExtractor()
    kw = dict(extractor=ext, data_dir=root, cache_root=tmp_path / "rs", progress=False)
    ref = reference_stats("mnist", "test", 30, **kw)
    assert ext.calls == 1 and ext.images_seen == 30
    expected = FeatureStats.from_features(ext.extract(images[:30])["pool"])
    np.testing.assert_allclose(ref.pool.mu, expected.mu, rtol=1e-6)
    assert ref.pool.features.shape == (30, 16) and ref.spatial.mu.shape == (8,)
    files = sorted(p.suffix for p in (tmp_path / "rs").iterdir())
    assert files == [".json", ".safetensors"]
    meta = json.loads(next((tmp_path / "rs").glob("*.json")).read_text())
    assert meta["dataset"] == "mnist" and meta["n"] == 30 and meta["extractor"]["name"] == "fake"

    calls = ext.calls
    again = reference_stats("mnist", "test", 30, **kw)
    assert ext.calls == calls  # served from the cache
    np.testing.assert_array_equal(again.pool.sigma, ref.pool.sigma)
    np.testing.assert_array_equal(again.pool.features, ref.pool.features)
    np.testing.assert_array_equal(again.spatial.mu, ref.spatial.mu)


def test_reference_stats_cache_invalidated_by_hash_inputs(tiny_dataset, tmp_path):
    root, images = tiny_dataset
    ext = FakeExtractor()
    kw = dict(data_dir=root, cache_root=tmp_path / "rs", progress=False)
    reference_stats("mnist", "test", 30, extractor=ext, **kw)
    assert ext.calls == 1
    reference_stats("mnist", "test", 20, extractor=ext, **kw)  # other n
    assert ext.calls == 2
    reference_stats("mnist", "test", 30, extractor=ext, subset_seed=3, **kw)  # other subset
    assert ext.calls == 3
    other = FakeExtractor(tag="fake-v2")  # other extractor weights
    reference_stats("mnist", "test", 30, extractor=other, **kw)
    assert other.calls == 1
    changed = images.copy()
    changed[0, 0, 0] ^= 1  # other image bytes in the data file
    write_idx(root / "t10k-images-idx3-ubyte.gz", changed)
    reference_stats("mnist", "test", 30, extractor=ext, **kw)
    assert ext.calls == 4
    reference_stats("mnist", "test", 30, extractor=ext, **kw)
    assert ext.calls == 4


def test_reference_stats_spatial_recomputed_when_missing(tiny_dataset, tmp_path):
    root, _ = tiny_dataset
    ext = FakeExtractor()
    kw = dict(extractor=ext, data_dir=root, cache_root=tmp_path / "rs", progress=False)
    assert reference_stats("mnist", "test", 30, spatial=False, **kw).spatial is None
    assert reference_stats("mnist", "test", 30, spatial=False, **kw).spatial is None
    assert ext.calls == 1
    assert reference_stats("mnist", "test", 30, spatial=True, **kw).spatial is not None
    assert ext.calls == 2
    reference_stats("mnist", "test", 30, spatial=False, **kw)  # the spatial entry serves both
    assert ext.calls == 2


def test_reference_stats_default_cache_dir(tiny_dataset, tmp_cache):
    root, _ = tiny_dataset
    reference_stats("mnist", "test", 10, extractor=FakeExtractor(), data_dir=root, progress=False)
    assert len(list((tmp_cache / "refstats").glob("mnist-test-n10-*.safetensors"))) == 1


def test_reference_stats_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    ref = ReferenceStats(FeatureStats.from_features(rng.normal(size=(10, 4)), keep_features=True),
                         None, {"dataset": "x"})
    ref.save(tmp_path / "r")
    back = ReferenceStats.load(tmp_path / "r")
    assert back.meta["dataset"] == "x" and back.pool.n == 10 and back.spatial is None
    np.testing.assert_array_equal(back.pool.sigma, ref.pool.sigma)
    with pytest.raises(DiffquantError):
        ReferenceStats.load(tmp_path / "missing")
