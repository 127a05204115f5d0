"""Mixed-bit (OMQ) and power-of-two-scaled (PTS) quantizer variants."""
from __future__ import annotations

import pytest
import torch

from diffquant.errors import ConfigError
from diffquant.quant.affine import GridSpec, fake_quantize, qparams_from_range
from diffquant.quant.quantizer import UniformQuantizer
from diffquant.quant.variants import MixedBitQuantizer, PTSQuantizer, rebuild_quantizer


def test_mixed_with_uniform_tags_equals_uniform_quantizer():
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3)
    ref = UniformQuantizer(3, channel_axis=0, channels=6, init="lp_shrink")
    ref.init_from(w)
    mixed = MixedBitQuantizer(3, channel_axis=0, channels=6, init="lp_shrink")
    mixed.init_from(w)
    assert torch.equal(mixed(w), ref(w))
    assert torch.equal(mixed.step, ref.step) and torch.equal(mixed.zero_point, ref.zero_point)


def test_each_group_uses_its_own_grid_and_average_is_nominal():
    torch.manual_seed(1)
    w = torch.randn(6, 8)
    mixed = MixedBitQuantizer(3, channel_axis=0, channels=6, init="minmax")
    mixed.set_channel_bits(torch.tensor([4, 4, 3, 3, 2, 2]))
    mixed.init_from(w)
    assert mixed.average_bits == 3.0
    out = mixed(w)
    for c, b in enumerate([4, 4, 3, 3, 2, 2]):
        s, z = qparams_from_range(w[c].min(), w[c].max(), GridSpec(b, "asymmetric"))
        expected = fake_quantize(w[c], s, z, 0, 2**b - 1)
        assert torch.allclose(out[c], expected)
        assert len(torch.unique(out[c])) <= 2**b


def test_mixed_bits_are_validated():
    mixed = MixedBitQuantizer(2, channel_axis=0, channels=3)
    with pytest.raises(ConfigError):
        mixed.set_channel_bits(torch.tensor([0, 2, 3]))
    with pytest.raises(ConfigError):
        mixed.set_channel_bits(torch.tensor([2, 2]))


def test_pts_multiplier_refines_channel_steps():
    x = torch.zeros(4, 2, 3, 3)
    x[:, 0] = torch.linspace(-8, 8, 36).reshape(4, 3, 3)
    x[:, 1] = torch.linspace(-0.1, 0.1, 36).reshape(4, 3, 3)
    base = UniformQuantizer(4, init="minmax")
    base.init_from(x)
    pts = PTSQuantizer.from_quantizer(base, pts_axis=1, pts_channels=2)
    assert torch.equal(pts(x), base(x))  # multipliers start at 1
    pts.multiplier[0, 1] = 1 / 8
    y = pts(x)
    assert torch.equal(y[:, 0], base(x)[:, 0])
    assert (y[:, 1] - x[:, 1]).abs().max() < (base(x)[:, 1] - x[:, 1]).abs().max()
    s = base.step[0, 0] / 8
    assert torch.allclose(y[:, 1], fake_quantize(x[:, 1], s, base.zero_point[0, 0], 0, 15))


def test_rebuild_from_description():
    base = UniformQuantizer(4, init="minmax")
    pts = rebuild_quantizer(PTSQuantizer.from_quantizer(base, 1, 5).describe(), base)
    assert isinstance(pts, PTSQuantizer) and pts.multiplier.shape == (1, 5)
    wq = UniformQuantizer(3, channel_axis=0, channels=4)
    assert isinstance(rebuild_quantizer({"class": "MixedBitQuantizer"}, wq), MixedBitQuantizer)
    with pytest.raises(ConfigError):
        rebuild_quantizer({"class": "Nope"}, wq)


def test_pts_input_divisor_equals_quantizing_scaled_input():
    torch.manual_seed(3)
    x = torch.randn(4, 3, 5, 5) * torch.tensor([1.0, 5.0, 0.2]).reshape(1, 3, 1, 1)
    tau = torch.tensor([0.5, 4.0, 0.25])
    base = UniformQuantizer(6, init="minmax")
    base.init_from(x / tau.reshape(1, 3, 1, 1))
    pts = PTSQuantizer.from_quantizer(base, pts_axis=1, pts_channels=3)
    pts.input_divisor.copy_(tau)
    assert torch.allclose(pts(x), base(x / tau.reshape(1, 3, 1, 1)), atol=1e-6)
