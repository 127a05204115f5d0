"""QuantLayer against hand-computed outputs: plain, split, weight cache, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffquant.errors import ConfigError
from diffquant.nn.layers import QuantizerSpec, QuantLayer, attach_adaround, layer_kind


def hand_quant(x, step, zero, bits):
    """s · (clamp(round(x / s) + z, 0, 2^b − 1) − z), written out independently of the library."""
    return step * (torch.clamp(torch.round(x / step) + zero, 0, 2**bits - 1) - zero)


def set_qparams(q, step, zero):
    """Hand-set one quantizer's step and zero point (row 0) and mark it initialised."""
    q.step.data[0] = torch.as_tensor(step, dtype=torch.float32).reshape(-1)
    q.zero_point.data[0] = torch.as_tensor(zero, dtype=torch.float32).reshape(-1)
    q.initialized.fill_(True)


W4 = QuantizerSpec(bits=4, per_channel=True)
A8 = QuantizerSpec(bits=8)


def make_float_layer(kind: str, c_in: int = 6, c_out: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return {
        "Conv1d": lambda: nn.Conv1d(c_in, c_out, 3, padding=1, stride=2),
        "Conv2d": lambda: nn.Conv2d(c_in, c_out, 3, padding=1, dilation=1, stride=1),
        "ConvTranspose2d": lambda: nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, output_padding=0),
        "Linear": lambda: nn.Linear(c_in, c_out),
    }[kind]()


def make_input(kind: str, c_in: int = 6, batch: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    shape = {"Conv1d": (batch, c_in, 7), "Conv2d": (batch, c_in, 5, 5),
             "ConvTranspose2d": (batch, c_in, 4, 4), "Linear": (batch, 4, c_in)}[kind]
    return torch.randn(shape, generator=gen)


def float_op(kind: str, module: nn.Module, x, w, b):
    if kind == "Linear":
        return F.linear(x, w, b)
    args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
    if kind == "Conv1d":
        return F.conv1d(x, w, b, **args)
    if kind == "Conv2d":
        return F.conv2d(x, w, b, **args)
    return F.conv_transpose2d(x, w, b, output_padding=module.output_padding, **args)


KINDS = ["Conv1d", "Conv2d", "ConvTranspose2d", "Linear"]


def test_linear_explicit_numbers():
    """A 2→1 linear layer worked out on paper (4-bit weights, 8-bit input)."""
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.26, -0.74]]))
        lin.bias.fill_(0.5)
    layer = QuantLayer(lin, W4, A8)
    set_qparams(layer.weight_quantizers[0], [0.1], [8.0])  # grid −0.8 … 0.7
    set_qparams(layer.act_quantizers[0], 0.25, 4.0)  # grid −1.0 … 62.75
    x = torch.tensor([[1.13, -3.0]])
    # Q(x) = [1.25 (round 4.52 = 5), −1.0 (clamped at q=0)]; Q(W) = [0.3, −0.7]
    expected = 1.25 * 0.3 + (-1.0) * (-0.7) + 0.5
    with torch.no_grad():
        assert layer(x).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_output_equals_float_op_of_hand_quantized_tensors(kind, device):
    module = make_float_layer(kind).to(device)
    layer = QuantLayer(module, W4, A8).to(device)
    assert layer.weight is module.weight and layer.bias is module.bias
    assert layer_kind(module) == kind == layer.kind
    wq, aq = layer.weight_quantizers[0], layer.act_quantizers[0]
    out_axis = 1 if kind == "ConvTranspose2d" else 0
    c_out = module.weight.shape[out_axis]
    assert wq.channel_axis == out_axis and wq.channels == c_out and aq.channel_axis is None

    w_step = torch.linspace(0.01, 0.05, c_out)
    w_zero = torch.arange(c_out, dtype=torch.float32) + 5
    set_qparams(wq, w_step, w_zero)
    set_qparams(aq, 0.03, 100.0)
    x = make_input(kind).to(device)

    shape = [1] * module.weight.dim()
    shape[out_axis] = c_out
    w_hand = hand_quant(module.weight.detach(), w_step.reshape(shape).to(device), w_zero.reshape(shape).to(device), 4)
    x_hand = hand_quant(x, 0.03, 100.0, 8)
    expected = float_op(kind, module, x_hand, w_hand, module.bias.detach())
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # and quantization really happened: the float layer gives something else
    assert not torch.allclose(out, module(x), atol=1e-4)


def test_conv_transpose_per_channel_axis_is_one():
    """[C_in, C_out, k, k]: the per-channel range is taken over C_out (axis 1), not C_in."""
    module = nn.ConvTranspose2d(3, 5, 2)
    layer = QuantLayer(module, W4, A8)
    wq = layer.weight_quantizers[0]
    wq.init_from(module.weight.detach())
    w = module.weight.detach()
    torch.testing.assert_close(wq.range_lo[0], w.amin(dim=(0, 2, 3)))
    torch.testing.assert_close(wq.range_hi[0], w.amax(dim=(0, 2, 3)))
    assert wq.step.shape == (1, 5)


def test_layers_without_weight_or_act_quant_are_exactly_float(device):
    module = make_float_layer("Conv2d").to(device)
    layer = QuantLayer(module, W4, A8).to(device)
    x = make_input("Conv2d").to(device)
    layer.use_weight_quant = layer.use_act_quant = False
    with torch.no_grad():
        assert torch.equal(layer(x), module(x))
    sixteen = QuantLayer(module, QuantizerSpec(bits=16, per_channel=True), QuantizerSpec(bits=16)).to(device)
    with torch.no_grad():
        assert torch.equal(sixteen(x), module(x))


# ---------------------------------------------------------------------- split layers
SPLIT_CASES = [
    # kind, c_in, split, channel axis of the input
    ("Conv2d", 6, 4, 1),
    ("Linear", 6, 2, -1),
    ("ConvTranspose2d", 6, 3, 1),
    ("Conv1d", 6, 5, 1),
]


def two_range_input(kind: str, c_in: int, split: int, axis: int) -> torch.Tensor:
    """First part in about [−0.1, 0.1], second part in about [−50, 50]."""
    x = make_input(kind, c_in)
    scale = torch.ones(c_in)
    scale[:split] = 0.05
    scale[split:] = 25.0
    shape = [1] * x.dim()
    shape[axis] = c_in
    return x * scale.reshape(shape)


@pytest.mark.parametrize("kind,c_in,split,axis", SPLIT_CASES)
def test_split_parts_see_only_their_channel_slice(kind, c_in, split, axis, device):
    module = make_float_layer(kind, c_in).to(device)
    layer = QuantLayer(module, W4, A8, split=split).to(device)
    assert len(layer.act_quantizers) == len(layer.weight_quantizers) == 2
    x = two_range_input(kind, c_in, split, axis).to(device)
    x1, x2 = torch.split(x, [split, c_in - split], dim=axis)

    for q in layer.act_quantizers:
        q.mode = "observe"
    with torch.no_grad():
        layer.use_weight_quant = False
        layer(x)
    for q, part in zip(layer.act_quantizers, (x1, x2)):
        assert q.range_lo[0].item() == pytest.approx(part.min().item())
        assert q.range_hi[0].item() == pytest.approx(part.max().item())
        q.mode = "quantize"
    assert layer.act_quantizers[0].range_hi[0] < 1.0 < 10.0 < layer.act_quantizers[1].range_hi[0]

    # weight parts: one per input-channel slice, each with its own per-output-channel range
    in_axis = 0 if kind == "ConvTranspose2d" else 1
    out_axis = 1 - in_axis
    w1, w2 = torch.split(module.weight.detach(), [split, c_in - split], dim=in_axis)
    for part, q in zip(layer.weight_parts(), layer.weight_quantizers):
        q.init_from(part.detach())
    for q, wp in zip(layer.weight_quantizers, (w1, w2)):
        dims = tuple(d for d in range(wp.dim()) if d != out_axis)
        torch.testing.assert_close(q.range_lo[0], wp.amin(dim=dims))
        torch.testing.assert_close(q.range_hi[0], wp.amax(dim=dims))

    # Q(X)Q(W) = Q1(X1)Q1'(W1) + Q2(X2)Q2'(W2)
    layer.use_weight_quant = True
    aq1, aq2 = layer.act_quantizers
    wq1, wq2 = layer.weight_quantizers
    with torch.no_grad():
        out = layer(x)
        y1 = float_op(kind, module, aq1.quantize(x1), wq1.quantize(w1), None)
        y2 = float_op(kind, module, aq2.quantize(x2), wq2.quantize(w2), None)
    torch.testing.assert_close(out, y1 + y2 + _bias(module, y1, kind), rtol=1e-5, atol=1e-4)
    # the split grid keeps the small part: one shared 8-bit grid over [−50, 50] would not
    shared = QuantLayer(module, W4, A8).to(device)
    shared.act_quantizers[0].init_from(x)
    with torch.no_grad():
        shared_first = shared.act_quantizers[0](x1)
    assert (layer.act_quantizers[0](x1) - x1).abs().max() < (shared_first - x1).abs().max() / 10


def _bias(module, y, kind):
    shape = [1] * y.dim()
    shape[-1 if kind == "Linear" else 1] = -1
    return module.bias.detach().reshape(shape)


@pytest.mark.parametrize("split", [0, 6, 7, -1])
def test_bad_split_point_is_a_config_error(split):
    with pytest.raises(ConfigError, match="split point"):
        QuantLayer(nn.Conv2d(6, 4, 1), W4, A8, split=split)


def test_split_with_groups_and_unsupported_layers_are_config_errors():
    with pytest.raises(ConfigError, match="groups"):
        QuantLayer(nn.Conv2d(6, 6, 1, groups=2), W4, A8, split=3)
    with pytest.raises(ConfigError, match="Conv3d"):
        QuantLayer(nn.Conv3d(2, 2, 1), W4, A8)
    with pytest.raises(ConfigError, match="padding_mode"):
        QuantLayer(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), W4, A8)


# ---------------------------------------------------------------------- weight cache
def calibrated_layer(device="cpu", requires_grad=False):
    module = make_float_layer("Conv2d").to(device)
    module.weight.requires_grad_(requires_grad)
    layer = QuantLayer(module, W4, A8).to(device)
    layer.weight_quantizers[0].init_from(module.weight.detach())
    layer.act_quantizers[0].init_from(make_input("Conv2d").to(device))
    return layer


def test_weight_cache_is_reused_under_no_grad(device):
    layer = calibrated_layer(device)
    x = make_input("Conv2d").to(device)
    with torch.no_grad():
        first = layer.effective_weight()
        layer(x)
        assert layer.effective_weight() is first


def test_cache_filled_in_inference_mode_is_not_used_by_autograd(device):
    layer = calibrated_layer(device)
    x = make_input("Conv2d").to(device)
    with torch.inference_mode():
        layer(x)  # a cache filled in inference mode ...
    layer.act_quantizers[0].set_learnable(step=True)
    y = layer(x.requires_grad_())  # ... is not reused where autograd records
    y.sum().backward()
    assert layer.act_quantizers[0].step.grad is not None


@pytest.mark.parametrize("change", ["step_data", "zero_point_data", "weight_no_grad", "optimizer_step", "set_range"])
def test_in_place_changes_invalidate_the_cache(change, device):
    layer = calibrated_layer(device, requires_grad=change == "optimizer_step")
    q = layer.weight_quantizers[0]
    with torch.no_grad():
        before = layer.effective_weight().clone()
        cached = layer.effective_weight()
    if change == "step_data":
        q.step.data.mul_(2)
    elif change == "zero_point_data":
        q.zero_point.data.add_(1)
    elif change == "weight_no_grad":
        with torch.no_grad():
            layer.weight.mul_(3)
    elif change == "set_range":
        q.set_range(q.range_lo[0] * 2, q.range_hi[0] * 2)
    else:
        opt = torch.optim.SGD([layer.weight], lr=1.0)
        layer.weight.grad = torch.ones_like(layer.weight)
        opt.step()
    with torch.no_grad():
        after = layer.effective_weight()
        expected = q.quantize(layer.weight)
    assert after is not cached
    assert not torch.equal(after, before)
    assert torch.equal(after, expected)


def test_learnable_step_is_not_cached_and_gets_gradients(device):
    layer = calibrated_layer(device)
    q = layer.weight_quantizers[0]
    q.set_learnable(step=True)
    x = make_input("Conv2d").to(device)
    first = layer.effective_weight()
    assert layer.effective_weight() is not first  # recomputed: autograd needs the graph
    assert layer._cache is None
    layer(x).pow(2).sum().backward()
    assert q.step.grad is not None and q.step.grad.abs().sum() > 0
    # under no_grad the same layer caches again
    with torch.no_grad():
        assert layer.effective_weight() is layer.effective_weight()


def test_switching_weight_quant_off_and_on(device):
    layer = calibrated_layer(device)
    with torch.no_grad():
        quantized = layer.effective_weight().clone()
        layer.use_weight_quant = False
        assert layer.effective_weight() is layer.weight
        layer.use_weight_quant = True
        assert torch.equal(layer.effective_weight(), quantized)
        layer.weight_quantizers[0].enabled = False
        assert torch.equal(layer.effective_weight(), layer.weight)


def test_attach_adaround_gives_each_weight_part_its_rounding():
    pytest.importorskip("diffquant.quant.adaround")
    module = nn.Conv2d(6, 4, 1)
    module.weight.requires_grad_(False)
    layer = QuantLayer(module, W4, A8, split=2)
    for part, q in zip(layer.weight_parts(), layer.weight_quantizers):
        q.init_from(part.detach())
    with torch.no_grad():
        nearest = layer.effective_weight().clone()
    modules = attach_adaround(layer)
    assert layer.adaround is modules and len(modules) == 2
    assert [tuple(r.V.shape) for r in modules] == [tuple(w.shape) for w in layer.weight_parts()]
    assert layer._cache is None

    # V initialised so that h(V) = frac(W/s); hardened, that is round-to-nearest again
    for r, part, q in zip(modules, layer.weight_parts(), layer.weight_quantizers):
        r.init_from(part, q)
    # soft mode: gradients reach V, nothing is cached
    layer.use_act_quant = False
    layer(torch.randn(2, 6, 3, 3)).sum().backward()
    assert all(r.V.grad is not None for r in modules) and layer._cache is None
    for r in modules:
        r.harden()
    with torch.no_grad():
        hard = layer.effective_weight()
        assert torch.equal(hard, nearest)
        assert layer.effective_weight() is hard  # cached once nothing is learned
    # flipping one rounding bit invalidates the cache; the result follows the hand formula
    with torch.no_grad():
        modules[0].hard_rounding[0, 0, 0, 0] ^= True
        flipped = layer.effective_weight()
    assert flipped is not hard and not torch.equal(flipped, hard)
    q, w1 = layer.weight_quantizers[0], layer.weight_parts()[0]
    s_, z_ = q.step[0].reshape(-1, 1, 1, 1), q.zero_point[0].reshape(-1, 1, 1, 1)
    bits = modules[0].hard_rounding.float()
    hand = s_ * (torch.clamp(torch.floor(w1 / s_) + bits + z_, 0, 15) - z_)
    torch.testing.assert_close(flipped[:, :2], hand)


# ---------------------------------------------------------------------- inference fast path
FAST_CASES = [
    dict(bits=8, grid="asymmetric"),
    dict(bits=4, grid="symmetric"),
    dict(bits=8, grid="unsigned"),
    dict(bits=6, grid="asymmetric", channel_axis=1, channels=6),
    dict(bits=8, grid="asymmetric", num_steps=3),
    dict(bits=8, grid="asymmetric", real_zero_point=0.37),  # MPQ-DM's real-valued zero point
]


@pytest.mark.parametrize("case", FAST_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_inference_activation_path_is_bit_identical_to_the_quantizer(case, device, monkeypatch):
    from diffquant.nn.layers import quantize_activation
    from diffquant.quant.quantizer import UniformQuantizer
    from diffquant.quant.timestep import TimestepIndex

    case = dict(case)
    zero_shift = case.pop("real_zero_point", 0.0)
    q = UniformQuantizer(**case).to(device)
    x = make_input("Conv2d").to(device) * 3 + 0.5
    if q.num_steps > 1:
        q.timestep_index = TimestepIndex([999, 500, 1])
        for k in range(3):
            q.observe(x * (k + 1), row=k)
        q.timestep_index.index = 1
    else:
        q.observe(x[:2])  # part of the data: some values get clipped
    q.zero_point.data += zero_shift
    with torch.no_grad():
        expected = q(x)
    assert not torch.equal(expected, x)

    def no_module_call(self, x):
        raise AssertionError("the quantizer module was called")

    monkeypatch.setattr(UniformQuantizer, "forward", no_module_call)
    with torch.no_grad():
        assert torch.equal(quantize_activation(q, x), expected)
    assert torch.equal(quantize_activation(q, x), expected)  # grad mode, but nothing requires grad
    # whenever autograd, observing or hooks are involved the module itself runs
    for setup in (lambda x=x: x.requires_grad_(), lambda: setattr(q, "mode", "observe"),
                  lambda: q.register_forward_hook(lambda *a: None)):
        setup()
        with pytest.raises(AssertionError, match="module was called"):
            quantize_activation(q, x)
        x = x.detach()
        q.mode = "quantize"


def test_quant_layer_output_is_the_same_with_and_without_autograd(device):
    layer = calibrated_layer(device)
    x = make_input("Conv2d").to(device)
    with torch.no_grad():
        fast = layer(x)
    slow = layer(x.clone().requires_grad_())
    assert torch.equal(fast, slow.detach())
