"""DMQ's adaptive timestep weighting (docs/methods.md §5.2) on hand-made losses."""
from __future__ import annotations

import pytest
import torch

from diffquant.errors import ConfigError
from diffquant.recon.time_weight import TimestepWeighting, calibration_schedule, per_sample_loss, timestep_buckets


def test_focal_weights_and_loss_exact_numbers():
    w = TimestepWeighting(2, "focal", alpha=1.0, momentum=0.95)
    losses = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    buckets = torch.tensor([0, 1, 0])
    loss = w(losses, buckets)
    # Λ = 0.05·[1+3, 2] = [0.2, 0.1] (updated before use), w = 1 − Λ[k]/ΣΛ
    assert w.running.tolist() == pytest.approx([0.2, 0.1])
    assert w.weights(buckets).tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 3])
    assert loss.item() == pytest.approx((1 / 3 * 1 + 2 / 3 * 2 + 1 / 3 * 3) / 3)
    loss.backward()  # the weights carry no gradient: d loss / d ℓ_i = w_i / n
    assert losses.grad.tolist() == pytest.approx([1 / 9, 2 / 9, 1 / 9])
    # second step: every bucket decays, bucket 1 receives the sum of its losses
    w(torch.tensor([3.0]), torch.tensor([1]))
    assert w.running.tolist() == pytest.approx([0.19, 0.095 + 0.15])
    total = 0.19 + 0.245
    assert w.weights(torch.tensor([0, 1])).tolist() == pytest.approx([1 - 0.19 / total, 1 - 0.245 / total])


def test_focal_exponent_and_uniform_modes():
    buckets = torch.tensor([0, 1, 0])
    losses = torch.tensor([1.0, 2.0, 3.0])
    w = TimestepWeighting(2, "focal", alpha=20.0)
    w.update(losses, buckets)
    assert w.weights(buckets).tolist() == pytest.approx([(1 / 3) ** 20, (2 / 3) ** 20, (1 / 3) ** 20])
    assert TimestepWeighting(2, "uniform")(losses, buckets).item() == pytest.approx(2.0)
    assert TimestepWeighting(2, "focal", alpha=0.0)(losses, buckets).item() == pytest.approx(2.0)


def test_zero_losses_give_unit_weights():
    w = TimestepWeighting(3, "focal")
    assert w(torch.zeros(4), torch.tensor([0, 1, 2, 0])).item() == 0.0
    assert w.weights(torch.tensor([0, 2])).tolist() == [1.0, 1.0]


def test_linear_and_quadratic_early_first_weights():
    k = torch.tensor([0, 2, 3])
    assert TimestepWeighting(4, "linear", alpha=2.0).weights(k).tolist() == pytest.approx([3.0, 2.0, 1.5])
    assert TimestepWeighting(4, "quadratic", alpha=2.0).weights(k).tolist() == pytest.approx([3.0, 1.5, 1.125])


def test_bad_settings_and_buckets():
    with pytest.raises(ConfigError, match="time_weight"):
        TimestepWeighting(4, "exponential")
    with pytest.raises(ConfigError, match="buckets"):
        TimestepWeighting(2)(torch.ones(1), torch.tensor([2]))


def test_per_sample_loss_sums_channels_and_averages_the_rest():
    pred = torch.zeros(2, 3, 2, 2)
    target = torch.zeros(2, 3, 2, 2)
    target[0, :, 0, 0] = 1.0  # sample 0: 3 channels of error 1 at one of 4 positions
    target[1, 1] = 2.0  # sample 1: one channel of error 4 everywhere
    assert per_sample_loss(pred, target).tolist() == pytest.approx([3 / 4, 4.0])
    tokens = torch.zeros(1, 5, 4)  # [B, L, C]: channels are the last axis
    assert per_sample_loss(tokens, torch.ones(1, 5, 4)).tolist() == pytest.approx([4.0])


def test_buckets_come_from_the_schedule_for_any_number_of_steps():
    ts = torch.tensor([999, 857, 714, 571, 428, 285, 142, 999, 142])  # K = 7, not the 20-step grid
    steps = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 6])
    schedule = calibration_schedule(ts, steps)
    assert schedule == [999, 857, 714, 571, 428, 285, 142]
    assert timestep_buckets(ts, schedule).tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 6]
    assert calibration_schedule(torch.tensor([1, 51, 1])) == [51, 1]  # no steps: decreasing t
    with pytest.raises(ConfigError, match="not in the calibration schedule"):
        timestep_buckets(torch.tensor([500]), schedule)
