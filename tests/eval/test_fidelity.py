import math

import numpy as np
import pytest
import torch

from diffquant.errors import DiffquantError
from diffquant.eval.fidelity import EpsErrorRecorder, eps_mse_per_step, image_mse_psnr, per_image_mse


def test_uint8_mse_psnr_values():
    a = np.zeros((2, 28, 28), np.uint8)
    b = np.full((2, 28, 28), 10, np.uint8)
    r = image_mse_psnr(a, b)
    assert r["mse"] == 100.0
    assert r["psnr"] == pytest.approx(10 * math.log10(255**2 / 100))  # 28.13 dB
    assert r["psnr"] == pytest.approx(28.1308, abs=1e-4)
    assert r["data_range"] == 255.0


def test_uint8_does_not_wrap_around():
    a = np.array([[[0]], [[255]]], np.uint8)
    b = np.array([[[255]], [[255]]], np.uint8)
    np.testing.assert_array_equal(per_image_mse(a, b), [255.0**2, 0.0])
    r = image_mse_psnr(a, b)
    assert r["mse"] == 255.0**2 / 2
    assert r["psnr_mean_per_image"] == math.inf  # the identical pair is infinite


def test_float_images_default_range_two():
    a = torch.zeros(3, 1, 4, 4)
    b = torch.full((3, 1, 4, 4), 0.2)
    r = image_mse_psnr(a, b)
    assert r["mse"] == pytest.approx(0.04)
    assert r["psnr"] == pytest.approx(10 * math.log10(4 / 0.04))  # 20 dB
    assert image_mse_psnr(a, a)["psnr"] == math.inf


def test_mse_bad_inputs():
    with pytest.raises(DiffquantError, match="same shape"):
        image_mse_psnr(np.zeros((2, 4, 4), np.uint8), np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(DiffquantError, match="uint8"):
        image_mse_psnr(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 4), np.float32))


def fp_eps(x, t, labels):
    return x * 0.5


def make_q_eps(scale):
    def q_eps(x, t, labels):
        return x * 0.5 + scale * t.reshape(-1, 1, 1, 1).to(x.dtype)  # per-sample t
    return q_eps


def test_eps_error_recorder_per_step_and_pooling():
    rec = EpsErrorRecorder(fp_eps, make_q_eps(0.01))
    timesteps = [900, 500, 100]
    for _batch in range(2):  # two sampler batches: per-step errors pooled
        x = torch.randn(4, 1, 8, 8)
        for k, t in enumerate(timesteps):
            rec(k, torch.full((4,), t), x, None)
    curve = rec.curve()
    assert curve["step"] == [0, 1, 2]
    assert curve["timestep"] == timesteps
    np.testing.assert_allclose(curve["eps_mse"], [(0.01 * t) ** 2 for t in timesteps], rtol=1e-6)
    rec.reset()
    assert rec.curve()["step"] == []


def test_eps_error_recorder_mixed_batch_sizes_weighted_by_elements():
    rec = EpsErrorRecorder(lambda x, t, y: torch.zeros_like(x), lambda x, t, y: x)
    rec(0, 10, torch.ones(1, 1, 2, 2), None)  # squared error 1 on 4 elements
    rec(0, 10, torch.zeros(3, 1, 2, 2), None)  # 0 on 12 elements
    assert rec.curve()["eps_mse"] == [pytest.approx(4 / 16)]


def test_eps_error_recorder_passes_labels_and_checks_shapes():
    seen = []

    def fp(x, t, labels):
        seen.append(labels)
        return x

    rec = EpsErrorRecorder(fp, lambda x, t, y: x[:, :1, :1])
    with pytest.raises(DiffquantError, match="shapes differ"):
        rec(0, 5, torch.zeros(2, 1, 4, 4), torch.tensor([3, 4]))
    assert seen[0].tolist() == [3, 4]


def test_eps_mse_per_step_on_a_trajectory():
    traj = [(torch.ones(2, 1, 3, 3) * i, t, None) for i, t in enumerate([999, 666, 333])]
    curve = eps_mse_per_step(fp_eps, lambda x, t, y: x * 0.5 + 1.0, traj)
    assert curve == {"step": [0, 1, 2], "timestep": [999, 666, 333], "eps_mse": [1.0, 1.0, 1.0]}
