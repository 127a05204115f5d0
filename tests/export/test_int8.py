"""The native PyTorch int8 backend (oneDNN int8 conv/linear kernels with fp32 output).

Tolerance (measured): single layers match the fake-quant layer to float rounding (≤ 1e-5
relative); whole models to about 4e-7 absolute on the tiny UNet unless an activation lands on a
rounding boundary (see test_onnx.py), so models are checked with the relative-RMS criterion.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.config import QuantConfig
from diffquant.errors import ConfigError
from diffquant.export.int8_backend import Int8Layer, int8_kernels_available, to_int8
from diffquant.methods.naive import run_naive
from diffquant.model import quantize
from export_testing import MIXED_RULE_REASONS, TIMESTEPS, assert_matches_fake_quant, catnet_inputs, mixed_rules

pytestmark = pytest.mark.skipif(not int8_kernels_available(), reason="no oneDNN int8 kernels in this PyTorch")


def _call(model, unet_inputs, t=10, seed=7):
    (x, ts), kw = unet_inputs(batch=3, t=t, seed=seed)
    with torch.no_grad():
        return model(x * (1 + t / 250), ts, **kw).sample


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 16, 3, padding=1, stride=2)
        self.lin = nn.Linear(16, 24)

    def forward(self, x):
        return self.lin(self.conv(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("weight_bits, grid", [(8, "asymmetric"), (8, "symmetric"), (4, "asymmetric"), (2, "asymmetric")])
@pytest.mark.parametrize("act_bits", [8, 5])
def test_single_layers_match_fake_quant_to_float_rounding(weight_bits, grid, act_bits):
    """Conv2d and Linear, including 8-bit asymmetric weights (the q − 128 correction path)."""
    torch.manual_seed(0)
    net = TwoLayers().eval()
    x = torch.randn(4, 6, 10, 10)
    qmodel = quantize(net, QuantConfig(weight_bits=weight_bits, act_bits=act_bits, weight_grid=grid),
                      example_inputs=((x,), {}))
    run_naive(qmodel, lambda m: m(x))
    int8 = to_int8(qmodel)
    assert int8.int8_report.int8 == ["conv", "lin"] and int8.int8_report.fake_quant == {}
    for name in ("conv", "lin"):
        fake_layer, int_layer = qmodel.model.get_submodule(name), int8.model.get_submodule(name)
        assert isinstance(int_layer, Int8Layer)
        # 8-bit asymmetric codes centred on z need 9 bits: those layers take the correction path
        assert (int_layer.weights[0].correction is not None) == (weight_bits == 8 and grid == "asymmetric")
        inp = x if name == "conv" else torch.randn(5, 16) * 2
        with torch.no_grad():
            fake, got = fake_layer(inp), int_layer(inp)
        torch.testing.assert_close(got, fake, rtol=0, atol=1e-5 * float(fake.abs().max()))


@pytest.mark.parametrize("bits", [(8, 8), (4, 8), (4, 6)])
def test_tiny_unet_on_int8_kernels(bits, calibrated_unet, unet_inputs):
    unet, qmodel = calibrated_unet(*bits)
    int8 = to_int8(qmodel)
    report = int8.int8_report
    assert sorted(report.int8) == sorted(lp.name for lp in qmodel.plan.layers)  # every conv and linear
    assert set(report.fake_quant) == {f"{n} (matmuls)" for n in qmodel.plan.attention}
    assert any(isinstance(m, Int8Layer) and m.split for m in int8.modules())
    assert_matches_fake_quant(_call(int8, unet_inputs), _call(qmodel, unet_inputs), _call(unet, unet_inputs))
    # the original model is left alone
    assert not any(isinstance(m, Int8Layer) for m in qmodel.modules())


def test_per_timestep_rows_are_read_at_call_time(calibrated_unet, unet_inputs):
    unet, qmodel = calibrated_unet(8, 8, timesteps=TIMESTEPS)
    int8 = to_int8(qmodel)
    for t in TIMESTEPS:
        assert_matches_fake_quant(_call(int8, unet_inputs, t), _call(qmodel, unet_inputs, t), _call(unet, unet_inputs, t))


def test_layers_without_a_kernel_stay_fake_quant(calibrated_catnet):
    net, qmodel = calibrated_catnet(weight_bits=4, act_bits=8)
    qmodel.layers()["head"].use_act_quant = False
    int8 = to_int8(qmodel)
    assert sorted(int8.int8_report.int8) == ["a", "b", "fuse"]
    assert int8.int8_report.fake_quant == {"up": "no oneDNN int8 kernel for ConvTranspose2d",
                                           "head": "input not quantized"}
    assert "ConvTranspose2d" in int8.int8_report.summary()
    (x,), _ = catnet_inputs(3, batch=4)
    with torch.no_grad():
        assert_matches_fake_quant(int8(x), qmodel(x), net(x))


def test_layers_left_in_float_by_rules_stay_fake_quant(calibrated_unet, unet_inputs):
    unet, qmodel = calibrated_unet(4, 8, rules=mixed_rules())
    int8 = to_int8(qmodel)
    assert {k: v for k, v in int8.int8_report.fake_quant.items() if "matmuls" not in k} == MIXED_RULE_REASONS
    assert_matches_fake_quant(_call(int8, unet_inputs), _call(qmodel, unet_inputs), _call(unet, unet_inputs))


def test_sampling_with_the_int8_model(calibrated_unet):
    from diffquant.diffusion.sampling import sample
    from diffquant.zoo.registry import CALL_DIFFUSERS, DiffusionBundle, linear_ddpm_config

    unet, qmodel = calibrated_unet(8, 8)
    bundle = DiffusionBundle("tiny", unet, linear_ddpm_config(), (3, 8, 8), num_classes=2, null_class=2,
                             call_convention=CALL_DIFFUSERS)
    kwargs = dict(n=2, steps=3, batch_size=2, progress=False, guidance=1.0)
    fake = sample(bundle.with_unet(qmodel), **kwargs).samples
    got = sample(bundle.with_unet(to_int8(qmodel)), **kwargs).samples
    assert got.shape == fake.shape and torch.isfinite(got).all()
    assert (got - fake).abs().max() < 0.05


def test_bad_input_is_refused(make_unet):
    with pytest.raises(ConfigError, match="QuantModel"):
        to_int8(make_unet())


def test_compiled_int8_model_matches_eager():
    """torch.compile (inductor, weight freezing) of an int8 model gives the eager int8 outputs."""
    from diffquant.export.int8_backend import compile_int8

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(6, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()
    x = torch.randn(4, 6, 10, 10)
    qmodel = quantize(net, QuantConfig(weight_bits=8, act_bits=8), example_inputs=((x,), {}))
    run_naive(qmodel, lambda m: m(x))
    int8 = to_int8(qmodel)
    compiled = compile_int8(int8)
    with torch.no_grad():
        eager, got = int8(x), compiled(x)
    assert compiled.compiled_ok is True
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))
    with pytest.raises(ConfigError):
        compile_int8(qmodel)  # only models from to_int8()


def test_compiled_int8_falls_back_to_eager_when_inductor_fails(calibrated_unet, unet_inputs):
    from diffquant.export.int8_backend import compile_int8

    _, qmodel = calibrated_unet(8, 8)
    int8 = to_int8(qmodel)
    compiled = compile_int8(int8)

    def broken(*args, **kwargs):
        raise RuntimeError("lowering failed")

    compiled.__dict__["_compiled"] = broken
    with pytest.warns(UserWarning, match="running it eagerly"):
        got = _call(compiled, unet_inputs)
    assert compiled.compiled_ok is False
    assert torch.equal(got, _call(int8, unet_inputs))
