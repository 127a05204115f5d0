"""Reconstruction losses: L_rec^p over the channel axis and the AdaRound regulariser term."""
from __future__ import annotations

import pytest
import torch

from diffquant.errors import ConfigError
from diffquant.quant.adaround import AdaRound, BetaSchedule
from diffquant.recon.loss import channel_axis_of, lp_loss, rounding_regularizer


def test_conv_features_sum_over_channels_and_average_the_rest():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 5, generator=gen), torch.randn(2, 3, 4, 5, generator=gen)
    diff = (pred - target).abs()
    # by hand: for every (b, h, w) sum |d|^p over the 3 channels, then average the 2·4·5 positions
    for p in (2.0, 2.4):
        expected = sum(diff[b, :, h, w].pow(p).sum() for b in range(2) for h in range(4) for w in range(5)) / 40
        assert lp_loss(pred, target, p) == pytest.approx(float(expected), rel=1e-5)


def test_token_tensors_sum_over_the_last_axis():
    pred = torch.zeros(2, 5, 3)
    target = torch.zeros(2, 5, 3)
    target[0, 0] = torch.tensor([1.0, 1.0, 1.0])  # one token, all three channels off by one
    assert channel_axis_of(pred) == 2
    # one of the 2·5 (sample, token) positions has a channel sum of 3
    assert lp_loss(pred, target, 2.0) == pytest.approx(3 / 10)
    # the official sum over axis 1 (the tokens) averages over 2·3 positions instead
    assert lp_loss(pred, target, 2.0, channel_axis=1) == pytest.approx(3 / 6)


def test_linear_outputs_use_axis_one():
    pred, target = torch.zeros(4, 6), torch.ones(4, 6)
    assert channel_axis_of(pred) == 1
    assert lp_loss(pred, target, 2.4) == pytest.approx(6.0)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ConfigError, match="differ in shape"):
        lp_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_regulariser_is_off_during_warmup_then_annealed():
    torch.manual_seed(0)
    r = AdaRound((4, 3))
    r.V.data = torch.randn(4, 3)
    schedule = BetaSchedule(iters=10, warmup=0.2, start=20.0, end=2.0)
    term, beta = rounding_regularizer([r], schedule, count=1, weight=0.01)
    assert term is None and beta == 20.0
    term, beta = rounding_regularizer([r], schedule, count=2, weight=0.01)  # i = ωN: β = start
    assert beta == pytest.approx(20.0)
    assert term.item() == pytest.approx(0.01 * r.regularizer(20.0).item())
    term_end, beta_end = rounding_regularizer([r], schedule, count=10, weight=0.01)
    assert beta_end == pytest.approx(2.0)
    # a large β penalises every non-binary h(V) about equally; annealing to a small β leaves
    # only the values near 0.5 penalised, so the term shrinks for the same V
    assert term.item() > term_end.item() > 0
    # and the term carries a gradient to V
    term_end.backward()
    assert r.V.grad is not None and r.V.grad.abs().sum() > 0
