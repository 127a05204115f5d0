"""DMQ's learned equivalent scaling (METHODS.md §5.1) on single layers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.calib.select import CalibrationSet
from diffquant.errors import ConfigError
from diffquant.nn.layers import QuantizerSpec, QuantLayer, attach_input_scale
from diffquant.recon.cache import CalibrationCalls
from diffquant.recon.les import (
    LayerIO,
    LESOptions,
    capture_layer_io,
    dynamic_quantize,
    learn_layer_scale,
    les_forward,
    les_loss,
)


def quant_layer(module: nn.Module, wbits: int = 4, abits: int = 6, split: int | None = None) -> QuantLayer:
    return QuantLayer(module, QuantizerSpec(wbits, per_channel=True), QuantizerSpec(abits), split=split)


def outlier_data(n: int = 256, channels: int = 8, outlier: int = 3, scale: float = 40.0):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, generator=gen)
    x[:, outlier] *= scale
    return x


def test_unit_scale_is_the_identity():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 3, padding=1)
    x = torch.randn(5, 6, 8, 8)
    plain, scaled = quant_layer(conv, split=2), quant_layer(conv, split=2)
    tau = attach_input_scale(scaled)
    assert torch.equal(tau, torch.ones(6))
    for layer in (plain, scaled):
        for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
            q.init_from(w.detach())
        for q in layer.act_quantizers:
            q.set_range(x.min(), x.max())
    with torch.no_grad():
        assert torch.equal(scaled(x), plain(x))
        assert torch.equal(les_forward(scaled, x), les_forward(plain, x))
    # no iterations: τ stays 1
    io = LayerIO.from_tensors(x, conv(x).detach())
    record = learn_layer_scale(scaled, io, torch.zeros(5, dtype=torch.long), 1, LESOptions(iters=0, progress=False),
                               seed=0)
    assert torch.equal(scaled.input_scale, torch.ones(6)) and record.initial_loss == record.final_loss


def test_les_lowers_the_error_of_a_layer_with_an_outlier_channel():
    torch.manual_seed(0)
    linear = nn.Linear(8, 8)
    x = outlier_data()
    with torch.no_grad():
        y = linear(x)
    layer = quant_layer(linear, wbits=4, abits=8)
    attach_input_scale(layer)
    io = LayerIO.from_tensors(x, y)
    buckets = torch.arange(len(x)) % 4
    before = les_loss(layer, io, torch.arange(len(x)), weights=True, acts=True, device="cpu")
    options = LESOptions(iters=300, batch_size=32, lr=0.05, time_weight="focal", alpha=2.0, progress=False)
    record = learn_layer_scale(layer, io, buckets, 4, options, seed=0)
    after = les_loss(layer, io, torch.arange(len(x)), weights=True, acts=True, device="cpu")
    assert record.initial_loss == pytest.approx(before) and record.final_loss == pytest.approx(after)
    assert after < 0.5 * before
    tau = layer.input_scale
    assert not tau.requires_grad and tau.grad is None
    assert tau[3] > tau[torch.arange(8) != 3].max()  # the outlier channel is divided the most
    # the float layer is unchanged by τ
    with torch.no_grad():
        assert torch.allclose(les_forward(layer, x, weights=False, acts=False), y, atol=1e-4)


def test_dynamic_ranges_are_not_detached():
    x = torch.tensor([[-1.0, 0.3, 2.0, 0.2]], requires_grad=True)
    y = dynamic_quantize(x, 2)
    s = 3.0 / 3
    assert torch.allclose(y.detach(), torch.tensor([[-1.0, 0.0, 2.0, 0.0]]))
    assert (y.detach() - x.detach()).abs().max() <= s / 2 + 1e-6
    y.sum().backward()
    # with a detached range every element would get gradient 1 (STE); the range adds more
    assert not torch.allclose(x.grad, torch.ones_like(x))
    w = torch.randn(4, 3, requires_grad=True)
    dynamic_quantize(w, 4, channel_axis=0).pow(2).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_capture_layer_io_records_float_inputs_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.Linear(3, 2))
    xs = torch.randn(10, 4)
    calib = CalibrationSet(xs, torch.zeros(10, dtype=torch.long), None, torch.zeros(10, dtype=torch.long),
                           torch.arange(10))
    data = CalibrationCalls(calib, call=lambda m, x, t, labels: m(x))
    calls = []
    model[3].register_forward_hook(lambda *a: calls.append(1))
    ios = capture_layer_io(model, ["0", "2"], data)
    assert not calls  # the forward stopped after the last hooked layer
    with torch.no_grad():
        h = model[1](model[0](xs))
        assert torch.equal(ios["2"].inputs.read(torch.arange(10)), h)
        assert torch.equal(ios["2"].outputs.read(torch.arange(10)), model[2](h))
        assert torch.equal(ios["0"].inputs.read(torch.arange(10)), xs)


def test_bad_options():
    with pytest.raises(ConfigError, match="time_weight"):
        LESOptions(time_weight="exp")
    layer = quant_layer(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="input scale"):
        learn_layer_scale(layer, LayerIO.from_tensors(torch.ones(2, 2), torch.ones(2, 2)), torch.zeros(2), 1,
                          LESOptions(iters=1), seed=0)
