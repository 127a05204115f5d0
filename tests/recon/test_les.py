"""DMQ's learned equivalent scaling (docs/methods.md §5.1) on single layers and blocks, and the SmoothQuant
baseline that fills the same τ slot."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.calib.select import CalibrationSet
from diffquant.config import QuantConfig
from diffquant.errors import ConfigError
from diffquant.model import quantize
from diffquant.nn.layers import QuantizerSpec, QuantLayer, attach_input_scale
from diffquant.recon.cache import CalibrationCalls, build_unit_cache
from diffquant.recon.les import (
    LayerIO,
    LESOptions,
    capture_layer_io,
    dynamic_forwards,
    dynamic_quantize,
    learn_block_scales,
    learn_layer_scale,
    les_forward,
    les_layers,
    les_loss,
    les_units,
    run_les,
    run_smoothquant,
    smoothquant_scales,
)
from diffquant.recon.state import quant_state


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


def _outlier_layer():
    """A W4A8 Linear with a τ to learn, its cached float I/O on outlier-channel data, 4 buckets."""
    torch.manual_seed(0)
    linear = nn.Linear(8, 8)
    x = outlier_data()
    with torch.no_grad():
        y = linear(x)
    layer = quant_layer(linear, wbits=4, abits=8)
    attach_input_scale(layer)
    return layer, LayerIO.from_tensors(x, y), x, y, torch.arange(len(x)) % 4


def test_les_lowers_the_error_of_a_layer_with_an_outlier_channel():
    layer, io, x, y, buckets = _outlier_layer()
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


def test_les_never_ends_above_its_starting_loss():
    """From a well-learned τ, steps far too large can only make it worse: the start is kept."""
    layer, io, x, y, buckets = _outlier_layer()
    learn_layer_scale(layer, io, buckets, 4, LESOptions(iters=300, batch_size=32, lr=0.05, progress=False), seed=0)
    start = layer.input_scale.detach().clone()
    before = les_loss(layer, io, torch.arange(len(x)), weights=True, acts=True, device="cpu")
    record = learn_layer_scale(layer, io, buckets, 4, LESOptions(iters=3, batch_size=32, lr=20.0, progress=False,
                                                                      revert_if_worse=True), seed=0)
    assert record.initial_loss == pytest.approx(before)
    assert record.final_loss == record.initial_loss  # the safeguard fired
    assert torch.equal(layer.input_scale, start)
    assert les_loss(layer, io, torch.arange(len(x)), weights=True, acts=True, device="cpu") == pytest.approx(before)


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


# ---------------------------------------------------------------------- SmoothQuant baseline
class ConvLinear(nn.Module):
    """A conv whose pooled output feeds a linear: τ formulas for both kinds of layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x, t):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def conv_linear_setup(n: int = 12):
    torch.manual_seed(0)
    model = ConvLinear().eval()
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(n, 3, 6, 6, generator=gen)
    xs[:, 0] *= 30.0  # an outlier channel
    xs[:, 1] = 0.0  # a dead channel: its maximum is floored, τ stays finite and nonzero
    ts = torch.zeros(n, dtype=torch.long)
    calib = CalibrationSet(xs, ts, None, torch.zeros(n, dtype=torch.long), torch.arange(n))
    data = CalibrationCalls(calib, call=lambda m, x, t, labels: m(x, t))
    qmodel = quantize(model, QuantConfig(weight_bits=4, act_bits=8), ((xs[:2], ts[:2]), {}))
    return model, qmodel, data, xs


def smoothquant_by_hand(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    return x_max.clamp_min(1e-5) ** alpha / w_max.clamp_min(1e-5) ** (1 - alpha)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("use_fp_model", [True, False])
def test_smoothquant_scales_follow_the_formula(alpha, use_fp_model):
    model, qmodel, data, xs = conv_linear_setup()
    assert les_layers(qmodel) == ["conv", "fc"]
    with torch.no_grad():
        pooled = model.conv(xs).mean(dim=(2, 3))
    want = {
        # X: max over batch and space; W: max over output channels and kernel positions
        "conv": smoothquant_by_hand(xs.abs().amax(dim=(0, 2, 3)), model.conv.weight.abs().amax(dim=(0, 2, 3)), alpha),
        "fc": smoothquant_by_hand(pooled.abs().amax(dim=0), model.fc.weight.abs().amax(dim=0), alpha),
    }
    got = smoothquant_scales(qmodel, ["conv", "fc"], data, alpha, fp_model=model if use_fp_model else None,
                             batch_size=5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=0)
        assert bool(torch.isfinite(got[name]).all()) and bool((got[name] > 0).all())
    if 0 < alpha:
        assert got["conv"][0] > got["conv"][2]  # the outlier channel is divided the most


def test_run_smoothquant_sets_tau_and_keeps_the_float_model():
    model, qmodel, data, xs = conv_linear_setup()
    records = run_smoothquant(qmodel, data, 0.5, fp_model=model)
    assert [(r.name, r.pass_name, r.iterations) for r in records] == [("conv", "smoothquant", 0),
                                                                      ("fc", "smoothquant", 0)]
    want = smoothquant_scales(qmodel, ["conv", "fc"], data, 0.5, fp_model=model)
    layers = qmodel.layers()
    for name in ("conv", "fc"):
        tau = layers[name].input_scale
        assert tau is not None and not tau.requires_grad and torch.equal(tau, want[name])
        assert not torch.allclose(tau, torch.ones_like(tau))
    # with quantization off, Q(x/τ)·Q(W·τ) is the float layer: the model output is unchanged
    t = torch.zeros(len(xs), dtype=torch.long)
    with torch.no_grad(), quant_state(qmodel, weights=False, acts=False):
        torch.testing.assert_close(qmodel(xs, t), model(xs, t), rtol=1e-5, atol=1e-5)
        for name in ("conv", "fc"):
            x = xs if name == "conv" else model.conv(xs).mean(dim=(2, 3))
            torch.testing.assert_close(les_forward(layers[name], x, weights=False, acts=False),
                                       getattr(model, name)(x), rtol=1e-5, atol=1e-5)


def test_smoothquant_rejects_an_alpha_outside_0_1():
    model, qmodel, data, _ = conv_linear_setup()
    for alpha in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="alpha"):
            smoothquant_scales(qmodel, ["conv"], data, alpha, fp_model=model)


# ---------------------------------------------------------------------- block scope
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class BlockModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x, t):
        return self.block(x)


def block_setup(n: int = 256):
    torch.manual_seed(0)
    model = BlockModel().eval()
    xs = outlier_data(n)
    ts = (torch.arange(n) % 4) * 10
    calib = CalibrationSet(xs, ts, None, torch.arange(n) % 4, torch.arange(n))
    data = CalibrationCalls(calib, call=lambda m, x, t, labels: m(x, t))
    quant = QuantConfig(weight_bits=4, act_bits=8, block_types=["Block"])
    qmodel = quantize(model, quant, ((xs[:2], ts[:2]), {}))
    for name in les_layers(qmodel):
        attach_input_scale(qmodel.layers()[name])
    return model, qmodel, data, torch.arange(n) % 4


def test_block_units_gather_the_layers_of_a_block():
    _, qmodel, _, _ = block_setup(8)
    units = les_units(qmodel, les_layers(qmodel))
    assert [(u.name, u.kind, list(u.layers)) for u in units] == [("block", "block", ["block.fc1", "block.fc2"])]
    with pytest.raises(ConfigError, match="scope"):
        LESOptions(scope="model")


def test_block_les_lowers_the_block_error_and_unit_scales_are_the_identity():
    model, qmodel, data, buckets = block_setup()
    (unit,) = les_units(qmodel, les_layers(qmodel))
    cache = build_unit_cache(qmodel, "block", data, keep=("fp",), fp_model=model)
    xs = data.calib_set.xs
    flags_off = {n: (False, False) for n in unit.layers}
    try:
        # τ = 1 with quantizers off: exactly the float block
        with torch.no_grad(), dynamic_forwards(unit.layers, flags_off):
            assert torch.equal(unit.module(xs), model.block(xs))
        # no iterations: τ stays 1, the loss is the τ = 1 loss
        zero = learn_block_scales(unit, cache, buckets, 4, LESOptions(iters=0, progress=False), seed=0)
        assert all(torch.equal(layer.input_scale, torch.ones_like(layer.input_scale)) for layer in unit.layers.values())
        assert zero.initial_loss == zero.final_loss and zero.kind == "block" and zero.pass_name == "les"
        options = LESOptions(iters=300, batch_size=32, lr=0.05, time_weight="focal", alpha=2.0, progress=False,
                             revert_if_worse=True)
        record = learn_block_scales(unit, cache, buckets, 4, options, seed=0)
    finally:
        cache.close()
    assert record.initial_loss == pytest.approx(zero.initial_loss)
    # what the method guarantees (with revert_if_worse): never worse than τ = 1; and the
    # outlier channel makes τ worth learning: measured 0.23× the τ = 1 loss on a Xeon (AVX-512/AMX)
    # and 0.61× on an AVX2-only EPYC (training through rounding is sensitive to float order), so
    # the bound only asks for a clear gain
    assert record.final_loss <= record.initial_loss
    assert record.final_loss < 0.85 * record.initial_loss
    tau1, tau2 = (unit.layers[n].input_scale for n in ("block.fc1", "block.fc2"))
    assert not torch.equal(tau2, torch.ones_like(tau2))  # both layers' τ are learned
    assert tau1[3] > tau1[torch.arange(8) != 3].max()  # the outlier channel is divided the most
    assert not tau1.requires_grad and tau1.grad is None
    # forwards restored, and the float model is unchanged by the learned τ
    assert all("forward" not in layer.__dict__ for layer in unit.layers.values())
    with torch.no_grad():
        with dynamic_forwards(unit.layers, flags_off):
            torch.testing.assert_close(unit.module(xs), model.block(xs), rtol=1e-4, atol=1e-4)
        with quant_state(qmodel, weights=False, acts=False):
            torch.testing.assert_close(qmodel(xs, torch.zeros(len(xs))), model(xs, None), rtol=1e-4, atol=1e-4)


def test_run_les_with_block_scope_is_deterministic():
    runs = []
    for _ in range(2):
        model, qmodel, data, buckets = block_setup(64)
        options = LESOptions(iters=20, batch_size=16, lr=0.05, scope="block", progress=False)
        records = run_les(qmodel, data, buckets, 4, options, fp_model=model)
        assert [(r.name, r.kind, r.iterations) for r in records] == [("block", "block", 20)]
        assert records[0].final_loss < records[0].initial_loss
        runs.append([qmodel.layers()[n].input_scale.clone() for n in ("block.fc1", "block.fc2")])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    # without fp_model the inputs come from the model itself with quantization off: the same τ
    _, qmodel, data, buckets = block_setup(64)
    run_les(qmodel, data, buckets, 4, LESOptions(iters=20, batch_size=16, lr=0.05, scope="block", progress=False))
    for a, n in zip(runs[0], ("block.fc1", "block.fc2")):
        torch.testing.assert_close(qmodel.layers()[n].input_scale, a, rtol=1e-5, atol=1e-6)
