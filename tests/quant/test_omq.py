"""OMQ (MPQ-DM §6.2): smoothing scales, kurtosis, the balanced N±1 split and its search."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.config import QuantConfig
from diffquant.errors import ConfigError
from diffquant.finetune.stage1 import Stage1Options, run_stage1
from diffquant.model import quantize
from diffquant.quant.affine import GridSpec, qparams_from_range
from diffquant.quant.omq import (
    assign_bits,
    kurtosis,
    minmax_mixed_quantize,
    search_split,
    smooth_scales,
    split_candidates,
)
from diffquant.quant.search import lp_shrink_range
from diffquant.quant.variants import MixedBitQuantizer


def test_kurtosis_matches_hand_computed_value():
    # row 0: μ = 4, deviations −3 −2 −1 0 6: mean 4th power 1394/5 = 278.8; unbiased σ² = 50/4 = 12.5
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 10.0], [1.0, -1.0, 1.0, -1.0, 0.0]])
    expected0 = 278.8 / 12.5**2
    # row 1: μ = 0, 4th powers 1,1,1,1,0 → 0.8; σ² = 4/4 = 1
    kappa = kurtosis(w)
    assert kappa[0].item() == pytest.approx(expected0, rel=1e-6)
    assert kappa[1].item() == pytest.approx(0.8, rel=1e-6)
    # conv layout: per output channel over (in, kh, kw); a ConvTranspose-style axis 1 as well
    conv = w.reshape(2, 5, 1, 1)
    assert torch.allclose(kurtosis(conv, 0), kappa)
    assert torch.allclose(kurtosis(conv.transpose(0, 1), 1), kappa)
    assert kurtosis(torch.ones(3, 4)).eq(0).all()  # constant channels: 0, not NaN


def test_smooth_scales_by_hand():
    x = torch.tensor([[[[1.0, -4.0]], [[0.5, 0.25]]]])  # [B=1, C=2, H=1, W=2]: max|X_c| = 4, 0.5
    w = torch.tensor([[[[2.0]], [[-8.0]]], [[[0.5]], [[1.0]]]])  # [out=2, in=2, 1, 1]: max|W_c| = 2, 8
    s = smooth_scales(x, w, act_axis=1, in_axis=1, alpha=0.5)
    assert torch.allclose(s, torch.tensor([(4 / 2) ** 0.5, (0.5 / 8) ** 0.5]))
    lin = smooth_scales(torch.tensor([[3.0, -1.0], [-9.0, 0.0]]), torch.tensor([[1.0, 4.0]]),
                        act_axis=-1, in_axis=1)
    assert torch.allclose(lin, torch.tensor([3.0, 0.5]))
    with pytest.raises(ConfigError):
        smooth_scales(x, w, act_axis=1, in_axis=1, alpha=1.5)


def test_assign_bits_is_balanced_and_ranked():
    scores = torch.tensor([0.1, 5.0, 3.0, 0.0, 9.0, 2.0, 1.0, 4.0])
    bits = assign_bits(scores, 2, 3)
    assert bits.dtype == torch.int8 and bits.float().mean().item() == 3.0
    assert set(torch.nonzero(bits == 4).reshape(-1).tolist()) == {4, 1}
    assert set(torch.nonzero(bits == 2).reshape(-1).tolist()) == {3, 0}
    assert assign_bits(scores, 0, 3).eq(3).all()
    with pytest.raises(ConfigError):
        assign_bits(scores, 5, 3)
    with pytest.raises(ConfigError):
        assign_bits(scores, 1, 8)  # 9 bits do not exist


def test_split_candidates():
    assert split_candidates(40, "paper") == [0, 4, 8, 12, 16, 20]
    assert split_candidates(40, "code") == [0, 4]
    assert split_candidates(64) == [0, 6, 12, 18, 24, 30]
    assert split_candidates(8) == [0]
    with pytest.raises(ConfigError):
        split_candidates(40, "all")


OUTLIERS = (3, 11, 17, 29)
DEAD = tuple(range(30, 38))


def _layer_model(out_features=40, in_features=32, outliers=(), dead=(), seed=0):
    """A linear layer with heavy-tailed ``outliers`` channels (one large weight each) and ``dead``
    all-zero channels (kurtosis 0, exact at any width), so moving bits from the dead to the
    outlier channels must lower the output error."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_features, out_features))
    with torch.no_grad():
        for c in outliers:
            model[0].weight[c, c % in_features] = 1.5
        for c in dead:
            model[0].weight[c] = 0.0
    x = torch.randn(64, in_features)
    quant = QuantConfig(weight_bits=3, act_bits=8, weight_init="lp_shrink", act_init="lp_shrink", attn_matmul=False)
    qmodel = quantize(model, quant, ((x[:2],), {}))
    return model, qmodel, x


def _stage1(qmodel, x, **options):
    return run_stage1(qmodel, lambda m: m(x), ["0"], Stage1Options(**options))


def _reference_error(layer_w, bias, x, s, bits):
    """Non-vectorised reference: quantize each channel on its own minmax grid, loop over channels."""
    w_hat = layer_w * s.reshape(1, -1)
    rows = []
    for c in range(w_hat.shape[0]):
        b = int(bits[c])
        lo, hi = min(w_hat[c].min().item(), 0.0), max(w_hat[c].max().item(), 0.0)
        step = max((hi - lo) / (2**b - 1), 1e-8)
        z = min(max(round(-lo / step), 0), 2**b - 1)
        q = torch.clamp(torch.round(w_hat[c] / step) + z, 0, 2**b - 1)
        rows.append((q - z) * step)
    y = torch.nn.functional.linear(x / s, torch.stack(rows), bias)
    return torch.mean((y - torch.nn.functional.linear(x, layer_w, bias)) ** 2).item()


def test_split_search_picks_the_lowest_error_candidate_on_outlier_channels():
    outliers = OUTLIERS
    model, qmodel, x = _layer_model(outliers=outliers, dead=DEAD)
    w, b = model[0].weight.detach(), model[0].bias.detach()
    s = smooth_scales(x, w, act_axis=-1, in_axis=1)
    res = search_split(kind="Linear", op_args={}, x=x, weight=w, bias=b, scaled_weight=w * s, input_scale=s,
                       n_bits=3, out_axis=0, act_axis=-1, candidates="paper", criterion="kurtosis")
    assert res.candidates == [0, 4, 8, 12, 16, 20]
    # every candidate's error agrees with a channel-by-channel reference computation
    for k, err in zip(res.candidates, res.errors):
        bits = assign_bits(res.scores, k, 3)
        assert err == pytest.approx(_reference_error(w, b, x, s, bits), rel=1e-4)
    best = min(range(len(res.errors)), key=res.errors.__getitem__)
    assert res.k == res.candidates[best] and res.k > 0  # splitting helps with outliers
    assert res.errors[best] < res.errors[0]
    assert all(int(res.bits[c]) == 4 for c in outliers)  # the kurtotic channels get N+1
    assert res.bits.float().mean().item() == 3.0
    # the code's candidate set is a subset; random selection ranks channels differently
    code = search_split(kind="Linear", op_args={}, x=x, weight=w, bias=b, scaled_weight=w * s, input_scale=s,
                        n_bits=3, candidates="code")
    assert code.candidates == [0, 4] and code.errors == res.errors[:2]
    rnd = search_split(kind="Linear", op_args={}, x=x, weight=w, bias=b, scaled_weight=w * s, input_scale=s,
                       n_bits=3, candidates=[4], criterion="random", seed=1)
    assert not torch.equal(rnd.bits, assign_bits(res.scores, 4, 3))


def test_minmax_mixed_quantize_uses_each_channels_bits():
    torch.manual_seed(0)
    w = torch.randn(6, 50)
    bits = torch.tensor([1, 2, 3, 4, 5, 8], dtype=torch.int8)
    q = minmax_mixed_quantize(w, bits)
    for c in range(6):
        assert torch.unique(q[c]).numel() <= 2 ** int(bits[c])
    stacked = minmax_mixed_quantize(w, torch.stack([bits, bits.flip(0)]))
    assert stacked.shape == (2, 6, 50) and torch.equal(stacked[0], q)


def test_stage1_mixed_layer_average_bits_and_own_grids():
    model, qmodel, x = _layer_model(outliers=OUTLIERS, dead=DEAD)
    records = _stage1(qmodel, x)
    layer = qmodel.layers()["0"]
    wq = layer.weight_quantizers[0]
    assert isinstance(wq, MixedBitQuantizer)
    assert wq.average_bits == 3.0 and records[0]["k"] > 0
    assert set(torch.unique(wq.channel_bits).tolist()) == {2, 3, 4}
    assert layer.input_scale is not None  # smoothing attached
    w_hat = layer.base_weight().detach()
    # each channel's (s, z) is the per-channel lp_shrink result of its own width (its group's grid)
    for bits in (2, 3, 4):
        idx = torch.nonzero(wq.channel_bits == bits).reshape(-1)
        spec = GridSpec(bits, "asymmetric")
        lo, hi = lp_shrink_range(w_hat[idx], spec, 0)
        s, z = qparams_from_range(lo, hi, spec, include_zero=False)
        assert torch.equal(wq.step[0, idx], s) and torch.equal(wq.zero_point[0, idx], z)
        assert all(torch.unique(wq(w_hat)[c]).numel() <= 2**bits for c in idx.tolist())
    assert "3 (2:" in qmodel.summary() and "/4:" in qmodel.summary()


def test_zero_split_equals_the_uniform_quantizer():
    # C_out = 8 < 10: g = 0, the only candidate is k = 0, so OMQ must equal uniform 3-bit lp_shrink
    _, with_omq, x = _layer_model(out_features=8)
    _, without, _ = _layer_model(out_features=8)
    _stage1(with_omq, x, omq=True)
    _stage1(without, x, omq=False)
    mixed = with_omq.layers()["0"].weight_quantizers[0]
    plain = without.layers()["0"].weight_quantizers[0]
    assert isinstance(mixed, MixedBitQuantizer) and not isinstance(plain, MixedBitQuantizer)
    assert mixed.channel_bits.eq(3).all()
    assert torch.equal(mixed.step, plain.step) and torch.equal(mixed.zero_point, plain.zero_point)
    with torch.no_grad():
        assert torch.equal(with_omq(x), without(x))
