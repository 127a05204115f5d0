"""Export of activation quantizers carrying a folded input scale τ (DMQ LES in deployment form):
ONNX (qdq and integer) and the native int8 backend apply x·(1/τ) before quantizing and match the
fake-quant model."""
from __future__ import annotations

import pytest
import torch

from diffquant.export.codes import ExportError, input_divisor_of
from diffquant.export.int8_backend import to_int8
from diffquant.export.onnx_export import export_onnx
from diffquant.export.onnx_runtime import OnnxDenoiser
from diffquant.quant.variants import PTSQuantizer, replace_module
from export_testing import float64_copy, model_dtype, assert_matches_fake_quant


def _call(model, unet_inputs, batch=3, t=10, seed=7):
    (x, ts), kw = unet_inputs(batch=batch, t=t, seed=seed)
    with torch.no_grad():
        out = model((x * (1 + t / 250)).to(model_dtype(model)), ts, **kw)
    return out if isinstance(out, torch.Tensor) else out.sample


def _with_divisors(qmodel):
    gen = torch.Generator().manual_seed(0)
    count = 0
    for name, layer in qmodel.layers().items():
        if not layer.use_act_quant:
            continue
        for i, q in enumerate(layer.act_quantizers):
            channels = layer.in_channels if layer.split is None else (layer.split if i == 0 else layer.in_channels - layer.split)
            new = PTSQuantizer.from_quantizer(q, layer.act_axis, channels)
            new.input_divisor.copy_(torch.rand(channels, generator=gen) * 1.5 + 0.5)
            replace_module(qmodel.model, f"{name}.act_quantizers.{i}", new)
            count += 1
    assert count > 0
    return qmodel


@pytest.mark.parametrize("mode", ["qdq", "integer"])
def test_onnx_applies_folded_divisors(mode, calibrated_unet, unet_inputs, tmp_path):
    unet, qmodel = calibrated_unet(8, 8)
    before = _call(qmodel, unet_inputs)
    _with_divisors(qmodel)
    fake = _call(qmodel, unet_inputs)
    assert not torch.allclose(fake, before)  # the divisors change the model
    result = export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "u.onnx", mode=mode)
    got = _call(OnnxDenoiser(result.paths[0], threads=1), unet_inputs)
    assert_matches_fake_quant(got, fake, _call(unet, unet_inputs), fake64=_call(float64_copy(qmodel), unet_inputs))


def test_int8_backend_applies_folded_divisors(calibrated_unet, unet_inputs):
    unet, qmodel = calibrated_unet(8, 8)
    _with_divisors(qmodel)
    assert_matches_fake_quant(_call(to_int8(qmodel), unet_inputs), _call(qmodel, unet_inputs), _call(unet, unet_inputs),
                              fake64=_call(float64_copy(qmodel), unet_inputs))


@pytest.mark.parametrize("mode", ["qdq", "integer"])
def test_pts_factors_export_as_per_channel_qdq(mode, calibrated_unet, unet_inputs, tmp_path):
    """Power-of-two step factors (DMQ PTS) on top of a folded τ: x·(1/m) → Q/DQ → ·m, exact;
    integer graphs keep that layer on Q/DQ and say so. A factor that is not a power of two is refused."""
    unet, qmodel = calibrated_unet(8, 8)
    _with_divisors(qmodel)
    name, layer = next((n, m) for n, m in qmodel.layers().items() if m.use_act_quant and m.kind == "Conv2d")
    assert input_divisor_of(layer.act_quantizers[0]) is not None
    before = _call(qmodel, unet_inputs)
    layer.act_quantizers[0].multiplier[0, 0] = 0.5
    layer.act_quantizers[0].multiplier[0, 1] = 4.0
    fake = _call(qmodel, unet_inputs)
    assert not torch.equal(fake, before)
    result = export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "u.onnx", mode=mode)
    if mode == "integer":
        assert "DMQ PTS" in result.not_integer[name]
    got = _call(OnnxDenoiser(result.paths[0], threads=1), unet_inputs)
    assert_matches_fake_quant(got, fake, _call(unet, unet_inputs), fake64=_call(float64_copy(qmodel), unet_inputs))
    layer.act_quantizers[0].multiplier[0, 0] = 0.3
    with pytest.raises(ExportError, match="power-of-two"):
        export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "v.onnx")
    layer.act_quantizers[0].multiplier[0, 0] = 1.0
    linear = next(m for m in qmodel.layers().values() if m.use_act_quant and m.kind == "Linear")
    linear.act_quantizers[0].multiplier[0, 0] = 2.0  # PTS on a Linear input: refused, not exported wrong
    with pytest.raises(ExportError, match="power-of-two"):
        export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "w.onnx")


def test_packed_file_keeps_folded_divisors(calibrated_unet, make_unet, unet_inputs, tmp_path):
    from diffquant.export.pack import load_packed, save_packed

    _, qmodel = calibrated_unet(4, 8)
    _with_divisors(qmodel)
    expected = _call(qmodel, unet_inputs)
    loaded = load_packed(make_unet(), save_packed(qmodel, tmp_path / "m.safetensors"))
    assert any(isinstance(q, PTSQuantizer) for q in loaded.quantizers("act").values())
    assert torch.equal(_call(loaded, unet_inputs), expected)
