import numpy as np
import pytest
import torch

from diffquant.errors import DiffquantError
from diffquant.eval.prdc import knn_radii, precision_recall


def test_identical_sets_give_full_precision_and_recall():
    x = np.random.default_rng(0).normal(size=(60, 8))
    assert precision_recall(x, x.copy()) == {"precision": 1.0, "recall": 1.0}


def test_disjoint_far_clusters_give_zero():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(50, 4))
    fake = rng.normal(size=(40, 4)) + 100.0
    assert precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}


def test_hand_checkable_1d_case():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii: 1, 1, 1, 1
    fake = np.array([[0.5], [10.0]])  # radii (k=1): 9.5, 9.5
    # precision: 0.5 lies in a real ball, 10 does not -> 1/2; recall: all reals lie within 9.5 of 0.5 -> 1
    assert precision_recall(real, fake, k=1) == {"precision": 0.5, "recall": 1.0}
    # k=2: real radii 2, 1, 1, 2 -> still only 0.5 inside; fake has 2 points so k=2 is impossible
    with pytest.raises(DiffquantError, match="k"):
        precision_recall(real, fake, k=2)


def test_partial_overlap_and_mode_dropping():
    rng = np.random.default_rng(2)
    mode_a = rng.normal(size=(40, 2)) * 0.1
    mode_b = rng.normal(size=(40, 2)) * 0.1 + 50.0
    real = np.concatenate([mode_a, mode_b])
    fake = mode_a + rng.normal(size=(40, 2)) * 0.01  # covers only mode a
    pr = precision_recall(real, fake)
    assert pr["precision"] > 0.9
    assert pr["recall"] == pytest.approx(0.5, abs=0.1)


def test_knn_radii_and_chunking_agree():
    x = torch.tensor(np.random.default_rng(3).normal(size=(33, 5)))
    full = knn_radii(x, k=3, chunk_size=1000)
    chunked = knn_radii(x, k=3, chunk_size=4)
    torch.testing.assert_close(full, chunked)
    d = torch.cdist(x, x)
    torch.testing.assert_close(full, d.sort(dim=1).values[:, 3])
    real, fake = np.random.default_rng(4).normal(size=(2, 30, 5))
    assert precision_recall(real, fake, chunk_size=7) == precision_recall(real, fake, chunk_size=1000)


def test_bad_inputs():
    with pytest.raises(DiffquantError, match="dimensions differ"):
        precision_recall(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(DiffquantError):
        precision_recall(np.zeros((5,)), np.zeros((5, 4)))
