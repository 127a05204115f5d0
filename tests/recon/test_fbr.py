"""EDA-DM's FBR pass (docs/methods.md §4.2) on a toy block: loss, QDrop, input mixing, excluded layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffquant.calib.select import CalibrationSet
from diffquant.config import QuantConfig
from diffquant.methods.stages import init_weight_quantizers, observe_activations
from diffquant.model import quantize
from diffquant.quant.adaround import rectified_sigmoid
from diffquant.recon import CalibrationCalls, EngineOptions, build_unit_cache, make_units, reconstruct
from diffquant.recon.fbr import FBRPass, fbr_layers, mix_main_input, output_layer
from diffquant.recon.state import quant_state


class ToyBlock(nn.Module):
    """Executed conv_a → skip → conv_b (conv_b produces the output); registered conv_a, conv_b, skip."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(4, 4, 3, padding=1)
        self.skip = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv_b(F.silu(self.conv_a(x)) + self.skip(x))


class ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 3, 3, padding=1)
        self.block = ToyBlock()
        self.conv_out = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x, t=None):
        return self.conv_out(self.block(self.conv_in(x)))


@pytest.fixture
def toy():
    torch.manual_seed(0)
    model = ToyNet().eval()
    quant = QuantConfig(weight_bits=4, act_bits=4, block_types=["ToyBlock"])
    x = torch.randn(2, 3, 6, 6)
    qmodel = quantize(model, quant, ((x, torch.zeros(2, dtype=torch.long)), {}))
    xs = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    calib = CalibrationSet(xs, torch.zeros(16, dtype=torch.long), None, torch.zeros(16, dtype=torch.long),
                           torch.arange(16))
    data = CalibrationCalls(calib, lambda m, x, t, c: m(x, t))
    init_weight_quantizers(qmodel)
    observe_activations(qmodel, lambda m: data.run(m, slice(0, 16)))
    unit = next(u for u in make_units(qmodel) if u.name == "block")
    return model, qmodel, data, unit


def lp(a, b):
    return ((a - b) ** 2).sum(dim=1).mean()


def test_excluded_layer_is_the_one_producing_the_block_output(toy):
    model, qmodel, data, unit = toy
    assert list(unit.layers) == ["block.conv_a", "block.skip", "block.conv_b"]  # execution order
    assert output_layer(unit, "executed") == "block.conv_b"
    assert fbr_layers(unit) == ["block.conv_a", "block.skip"]
    # conv_b's output really is the block output
    seen = {}
    handle = unit.layers["block.conv_b"].register_forward_hook(lambda m, a, out: seen.setdefault("y", out))
    with torch.no_grad():
        y = unit.module(torch.randn(2, 3, 6, 6))
    handle.remove()
    assert torch.equal(seen["y"], y)
    # the official rule takes the last *registered* layer instead
    assert output_layer(unit, "registered") == "block.skip"
    assert fbr_layers(unit, "registered") == ["block.conv_a", "block.conv_b"]


def test_official_exclusion_quirk_on_the_mnist_resblock():
    from diffquant.zoo.mnist_resunet import MnistResUNet

    model = MnistResUNet().eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 5])
    qmodel = quantize(model, QuantConfig(weight_bits=4, act_bits=8), ((x, t), {}))
    units = {u.name: u for u in make_units(qmodel)}
    identity = units["encoders.0.0.res_block"]  # 10 → 10: residual is the identity
    assert output_layer(identity, "executed").endswith("conv2")
    assert output_layer(identity, "registered").endswith("time_layer")  # registered after conv2
    projected = units["mid.res_block1"]  # 40 → 80: a 1×1 residual conv, last either way
    last = "mid.res_block1.residual_conv"
    assert output_layer(projected, "executed") == output_layer(projected, "registered") == last
    assert fbr_layers(units["conv_in"]) == []  # layer units: plain block loss


def test_fbr_loss_equals_its_hand_computed_value(toy):
    model, qmodel, data, unit = toy
    fbr = FBRPass(iters=10, add_loss=0.8, qdrop_p=1.0, input_mix=1.0, round_reg_weight=0.5, warmup=0.0)
    with quant_state(qmodel, *fbr.quant_state):
        cache = build_unit_cache(qmodel, unit.name, data, keep=fbr.keep, q_state=fbr.quant_state, fp_model=model)
        fbr.setup(unit)
        index = torch.tensor([3, 7, 1, 12])
        got = fbr.training_loss(unit, cache, index, "cpu", count=4)

        (x_q,), _ = cache.inputs(index, "q")
        (x_fp,), _ = cache.inputs(index, "fp")
        with torch.no_grad():
            y_hat = unit.module(x_q)
            a_hat, s_hat = unit.layers["block.conv_a"](x_q), unit.layers["block.skip"](x_q)
        fp = model.block
        a_fp, s_fp = fp.conv_a(x_fp), fp.skip(x_fp)
        y_fp = fp(x_fp)
        beta = 20.0 + (2.0 - 20.0) * (4 / 10)  # β at count 4 of 10, no warm-up
        reg = sum((1 - (2 * rectified_sigmoid(r.V) - 1).abs() ** beta).sum()
                  for layer in unit.layers.values() for r in layer.adaround)
        want = lp(y_hat, y_fp) + 0.8 * (lp(a_hat, a_fp) + lp(s_hat, s_fp)) + 0.5 * reg
    assert torch.allclose(cache.target(index), y_fp, atol=1e-6)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert got.requires_grad


def test_qdrop_and_input_mixing_limits(toy):
    model, qmodel, data, unit = toy
    x_q, x_fp = torch.full((2, 3, 4, 4), 1.0), torch.full((2, 3, 4, 4), -1.0)
    call = lambda x: ((x, torch.ones(2)), {})  # noqa: E731
    assert torch.equal(mix_main_input(call(x_q), call(x_fp), 1.0)[0][0], x_q)
    assert torch.equal(mix_main_input(call(x_q), call(x_fp), 0.0)[0][0], x_fp)
    torch.manual_seed(0)
    (mixed, side), _ = mix_main_input(call(x_q), call(x_fp), 0.5)
    assert set(mixed.unique().tolist()) == {-1.0, 1.0} and torch.equal(side, torch.ones(2))
    assert 0.35 < float((mixed == 1.0).float().mean()) < 0.65
    kw = mix_main_input(((), {"hidden_states": x_q}), ((), {"hidden_states": x_fp}), 0.0)[1]
    assert torch.equal(kw["hidden_states"], x_fp)

    x = torch.randn(2, 3, 6, 6)
    for p in (0.0, 1.0, 0.5):
        fbr = FBRPass(iters=1, qdrop_p=p)
        fbr.setup(unit)
        quantizers = unit.act_quantizers()
        assert quantizers and all(q.qdrop_prob == p for q in quantizers)
        q = quantizers[0]
        q.train(True)
        out = q(x)
        q.train(False)
        if p == 0.0:
            assert torch.equal(out, x)  # float
        elif p == 1.0:
            assert torch.equal(out, q.quantize(x))  # fully quantized
        else:
            assert not torch.equal(out, x) and not torch.equal(out, q.quantize(x))
        assert torch.equal(q(x), q.quantize(x))  # out of training: always quantized
        fbr.finish(unit)
        assert all(q.qdrop_prob == 1.0 for q in quantizers)


@pytest.mark.parametrize("extra, forwards", [(False, 2), (True, 3), (None, 1)])
def test_forwards_per_iteration(toy, extra, forwards):
    model, qmodel, data, unit = toy
    add_loss = 0.0 if extra is None else 0.8
    fbr = FBRPass(iters=4, batch_size=4, add_loss=add_loss, extra_forward=bool(extra))
    calls = []
    handle = unit.module.register_forward_hook(lambda *a: calls.append(1))
    with quant_state(qmodel, *fbr.quant_state):
        cache = build_unit_cache(qmodel, unit.name, data, keep=fbr.keep, q_state=fbr.quant_state)
        fbr.setup(unit)
        calls.clear()
        fbr.training_loss(unit, cache, torch.arange(4), "cpu", 1).backward()
    handle.remove()
    assert len(calls) == forwards


def test_joint_pass_learns_rounding_and_steps(toy):
    model, qmodel, data, unit = toy
    steps_before = {id(q): q.step.detach().clone() for q in unit.act_quantizers()}
    fbr = FBRPass(iters=6, batch_size=4, lr_w=0.5, lr_a=1e-2)
    optim = fbr.setup(unit)
    assert len(optim.optimizers) == 2 and len(optim.schedulers) == 2
    assert [g["lr"] for opt in optim.optimizers for g in opt.param_groups] == [0.5, 1e-2]
    fbr.finish(unit)
    records = reconstruct(qmodel, [unit], data, fbr, fp_model=model,
                          options=EngineOptions(eval_samples=8, progress=False))
    assert records[0].pass_name == "fbr" and records[0].iterations == 6
    for layer in unit.layers.values():
        assert all(r.mode == "hard" and not r.V.requires_grad for r in layer.adaround)
    changed = [not torch.equal(q.step, steps_before[id(q)]) for q in unit.act_quantizers()]
    assert any(changed) and all(not q.step.requires_grad for q in unit.act_quantizers())
    assert all(q.qdrop_prob == 1.0 for q in unit.act_quantizers())


def test_sequential_passes_learn_one_side_each(toy):
    model, qmodel, data, unit = toy
    weights = FBRPass(iters=2, learn_acts=False, name="fbr_weights")
    assert weights.name == "fbr_weights" and len(weights.setup(unit).optimizers) == 1
    assert not any(q.step.requires_grad for q in unit.act_quantizers())
    weights.finish(unit)
    acts = FBRPass(iters=2, learn_weights=False, name="fbr_acts")
    optim = acts.setup(unit)
    assert len(optim.optimizers) == 1 and all(q.step.requires_grad for q in unit.act_quantizers())
    acts.finish(unit)
    with pytest.raises(Exception, match="weights, activation steps or both"):
        FBRPass(learn_weights=False, learn_acts=False)
