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
from export_testing import (
    float64_copy, model_dtype, MIXED_RULE_REASONS, TIMESTEPS, assert_matches_fake_quant, catnet_inputs, mixed_rules,
    saturating_case,
)

pytestmark = pytest.mark.skipif(not int8_kernels_available(), reason="no oneDNN int8 kernels in this PyTorch")


def _call(model, unet_inputs, t=10, seed=7):
    (x, ts), kw = unet_inputs(batch=3, t=t, seed=seed)
    with torch.no_grad():
        return model((x * (1 + t / 250)).to(model_dtype(model)), ts, **kw).sample


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
    assert_matches_fake_quant(_call(int8, unet_inputs), _call(qmodel, unet_inputs), _call(unet, unet_inputs),
                              fake64=_call(float64_copy(qmodel), unet_inputs))
    # the original model is left alone
    assert not any(isinstance(m, Int8Layer) for m in qmodel.modules())


def test_per_timestep_rows_are_read_at_call_time(calibrated_unet, unet_inputs):
    unet, qmodel = calibrated_unet(8, 8, timesteps=TIMESTEPS)
    int8 = to_int8(qmodel)
    for t in TIMESTEPS:
        assert_matches_fake_quant(_call(int8, unet_inputs, t), _call(qmodel, unet_inputs, t), _call(unet, unet_inputs, t),
                              fake64=_call(float64_copy(qmodel), unet_inputs, t))


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
        assert_matches_fake_quant(int8(x), qmodel(x), net(x), fake64=float64_copy(qmodel)(x.double()))


def test_layers_left_in_float_by_rules_stay_fake_quant(calibrated_unet, unet_inputs):
    unet, qmodel = calibrated_unet(4, 8, rules=mixed_rules())
    int8 = to_int8(qmodel)
    assert {k: v for k, v in int8.int8_report.fake_quant.items() if "matmuls" not in k} == MIXED_RULE_REASONS
    assert_matches_fake_quant(_call(int8, unet_inputs), _call(qmodel, unet_inputs), _call(unet, unet_inputs),
                              fake64=_call(float64_copy(qmodel), unet_inputs))


def test_sampling_with_the_int8_model(calibrated_unet):
    from diffquant.diffusion.sampling import sample
    from diffquant.bundle import CALL_DIFFUSERS, DiffusionBundle, linear_ddpm_config

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


# ----------------------------------------------------------------- exact products without VNNI/AMX
@pytest.mark.parametrize("saturating", [None, True])
@pytest.mark.parametrize("weight_grid", ["symmetric", "asymmetric"])
def test_products_beyond_int16_stay_exact(saturating, weight_grid):
    """None: the kernels as probed on this CPU; True: the path for CPUs without VNNI/AMX, forced."""
    qmodel, x = saturating_case(weight_grid)
    int8 = to_int8(qmodel, saturating=saturating)
    report = int8.int8_report
    if saturating:
        assert report.saturating and report.split_products == ["conv", "lin"]
        assert "activation codes split at 127" in report.summary()
    codes = qmodel.layers()["conv"].act_quantizers[0]
    assert int(torch.round(x / codes.step[0]).max()) >= 250  # really near 255
    with torch.no_grad():
        fake, got = qmodel(x), int8(x)
    for f, g in zip(fake, got):
        torch.testing.assert_close(g, f, rtol=0, atol=1e-5 * float(f.abs().max()))


def test_products_that_fit_int16_take_one_kernel_call():
    """W4 codes (|w| ≤ 15): 2·255·15 fits int16, so even the saturating path needs no split."""
    qmodel, x = saturating_case("symmetric", weight_bits=4)
    int8 = to_int8(qmodel, saturating=True)
    assert int8.int8_report.saturating and int8.int8_report.split_products == []
    with torch.no_grad():
        for f, g in zip(qmodel(x), int8(x)):
            torch.testing.assert_close(g, f, rtol=0, atol=1e-5 * float(f.abs().max()))


def test_trusting_saturating_kernels_would_be_caught(tmp_path):
    """With oneDNN capped at AVX2 (no VNNI, as on AVX2-only CPUs) the probe reports saturation and
    the unsplit kernels really return wrong sums — the case the split path exists for."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import torch, sys
        sys.path.insert(0, %r)
        from export_testing import saturating_case
        from diffquant.export.int8_backend import int8_products_saturate, to_int8
        qmodel, x = saturating_case()
        with torch.no_grad():
            fake = qmodel(x)[0]
            wrong = to_int8(qmodel, saturating=False)(x)[0]
            right = to_int8(qmodel)(x)[0]
        print(int8_products_saturate(), float((wrong - fake).abs().max() / fake.abs().max()),
              float((right - fake).abs().max() / fake.abs().max()))
    """) % str(__import__("pathlib").Path(__file__).parent)
    env = dict(__import__("os").environ, ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    probed, wrong, right = out.stdout.split()
    assert probed == "True"
    assert float(wrong) > 1e-2 and float(right) < 1e-5


@pytest.mark.slow
def test_int8_suite_passes_on_kernels_without_vnni():
    """This file's exactness tests, rerun with oneDNN capped at AVX2 (its kernels without VNNI)."""
    import os
    import subprocess
    import sys

    if os.environ.get("ONEDNN_MAX_CPU_ISA"):
        pytest.skip("already running with a capped oneDNN ISA")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "not kernels_without_vnni and not compiled and not would_be_caught"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:]


def test_every_tiny_unet_layer_matches_fake_quant_to_float_rounding(calibrated_unet, unet_inputs):
    """Teacher-forced: each int8 layer gets the fake-quant layer's own input — conv_in, the
    time-embedding linears, attention projections, shortcut and split convs included."""
    unet, qmodel = calibrated_unet(8, 8, timesteps=TIMESTEPS)
    for saturating in (None, True):
        int8 = to_int8(qmodel, saturating=saturating)
        inputs = {}
        hooks = [layer.register_forward_hook(lambda m, i, o, n=n, store=inputs: store.__setitem__(n, (i[0].clone(), o.clone())))
                 for n, layer in qmodel.layers().items()]
        try:
            _call(qmodel, unet_inputs, t=TIMESTEPS[1])
        finally:
            for h in hooks:
                h.remove()
        assert {"conv_in", "time_embedding.linear_1", "time_embedding.linear_2"} <= set(inputs)
        assert any(n.endswith("to_out.0") for n in inputs) and any(n.endswith("to_q") for n in inputs)
        _call(int8, unet_inputs, t=TIMESTEPS[1])  # selects that timestep's row of the int8 model's tables
        assert int8.timestep_index.index == qmodel.timestep_index.index == 1
        with torch.no_grad():
            for name, (inp, out) in inputs.items():
                got = int8.model.get_submodule(name)(inp)
                torch.testing.assert_close(got, out, rtol=0, atol=2e-6 * float(out.abs().max()), msg=name)


def test_converting_nothing_says_so():
    net = nn.Sequential(nn.ConvTranspose2d(3, 4, 2)).eval()
    x = torch.randn(2, 3, 4, 4)
    qmodel = quantize(net, QuantConfig(weight_bits=8, act_bits=8), example_inputs=((x,), {}))
    run_naive(qmodel, lambda m: m(x))
    with pytest.warns(UserWarning, match="no layer could run on int8 kernels.*ConvTranspose2d"):
        int8 = to_int8(qmodel)
    assert int8.int8_report.int8 == []
