"""Folding LES τ into the weights and the activation quantizers (docs/methods.md §5.1, export)."""
from __future__ import annotations

import copy

import pytest
import torch

from diffquant.config import QuantConfig
from diffquant.export import fold_input_scales, folded_float_state
from diffquant.export.codes import ExportError, layer_weight_codes
from diffquant.methods.stages import init_weight_quantizers, observe_activations
from diffquant.model import load, quantize, save
from diffquant.nn.layers import attach_input_scale
from diffquant.quant.variants import PTSQuantizer, replace_module


def calibrated(make_unet, unet_inputs, pts: bool):
    unet = make_unet()
    qmodel = quantize(unet, QuantConfig(weight_bits=8, act_bits=8, split=True, attn_matmul=False),
                      unet_inputs(2))
    gen = torch.Generator().manual_seed(1)
    for layer in qmodel.layers().values():
        attach_input_scale(layer, 0.5 + 1.5 * torch.rand(layer.in_channels, generator=gen))
    if pts:  # random power-of-two factors on every split layer's halves
        for name, layer in qmodel.layers().items():
            if layer.split is None:
                continue
            sizes = [layer.split, layer.in_channels - layer.split]
            for i, (q, c) in enumerate(zip(list(layer.act_quantizers), sizes)):
                new = PTSQuantizer.from_quantizer(q, layer.act_axis, c)
                new.multiplier[0] = 2.0 ** -torch.randint(0, 4, (c,), generator=gen).float()
                replace_module(qmodel.model, f"{name}.act_quantizers.{i}", new)
    init_weight_quantizers(qmodel)

    def loop(model):
        for seed in range(3):
            args, kwargs = unet_inputs(4, 10 + seed, seed)
            model(*args, **kwargs)

    observe_activations(qmodel, loop)
    return unet, qmodel


@pytest.mark.parametrize("pts", [False, True])
def test_folding_preserves_outputs(make_unet, unet_inputs, pts):
    _, qmodel = calibrated(make_unet, unet_inputs, pts)
    folded = fold_input_scales(qmodel)
    # x/(s·m·τ) and (x/τ)/(s·m) differ in the last float bit, which flips a code that lies on a
    # rounding boundary about once in 10^6, and a flipped code spreads through later layers
    for seed in range(4):
        args, kwargs = unet_inputs(4, 10, seed)
        with torch.no_grad():
            want = qmodel(*args, **kwargs).sample
            got = folded(*args, **kwargs).sample
        diff = (got - want).abs()
        assert diff.mean() <= 1e-3 * want.abs().max()
    # layer by layer on the same input: the quantized inputs agree except at rare flipped codes
    gen = torch.Generator().manual_seed(5)
    for name, layer in qmodel.layers().items():
        flayer = folded.layers()[name]
        shape = (64, layer.in_channels) if layer.kind == "Linear" else (8, layer.in_channels, 4, 4)
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            want_in = layer.quantize_input(layer.scale_input(x))
            got_in = flayer.quantize_input(flayer.scale_input(x))
        assert (got_in != want_in).float().mean() <= 1e-3, name
    # the original keeps its explicit τ; the copy has none and carries τ in its act quantizers
    for name, layer in qmodel.layers().items():
        flayer = folded.layers()[name]
        tau = layer.input_scale
        assert tau is not None and flayer.input_scale is None
        shape = [1] * layer.weight.dim()
        shape[layer.in_axis] = -1
        assert torch.equal(flayer.weight, layer.weight * tau.reshape(shape))
        parts = torch.split(tau, [layer.in_channels] if layer.split is None
                            else [layer.split, layer.in_channels - layer.split])
        for q, fq, part in zip(layer.act_quantizers, flayer.act_quantizers, parts):
            assert isinstance(fq, PTSQuantizer) and torch.equal(fq.input_divisor, part)
            if isinstance(q, PTSQuantizer):
                assert torch.equal(fq.multiplier, q.multiplier)
        assert torch.equal(flayer.effective_weight(), layer.effective_weight())
    if pts:
        assert any(bool((q.multiplier < 1).any()) for q in folded.quantizers("act").values()
                   if isinstance(q, PTSQuantizer))


def test_folded_manifest_round_trip(make_unet, unet_inputs, tmp_path):
    unet, qmodel = calibrated(make_unet, unet_inputs, pts=True)
    folded = fold_input_scales(qmodel)
    save(folded, tmp_path / "folded")
    float_model = copy.deepcopy(unet)
    float_model.load_state_dict(folded_float_state(folded))
    loaded = load(float_model, tmp_path / "folded")
    assert all(layer.input_scale is None for layer in loaded.layers().values())
    args, kwargs = unet_inputs(2, 11, 3)
    with torch.no_grad():
        assert torch.equal(loaded(*args, **kwargs).sample, folded(*args, **kwargs).sample)


def test_export_codes_need_the_fold(make_unet, unet_inputs):
    _, qmodel = calibrated(make_unet, unet_inputs, pts=False)
    name = "down_blocks.0.resnets.0.conv1"
    with pytest.raises(ExportError, match="fold_input_scales"):
        layer_weight_codes(qmodel.layers()[name], name)
    codes = layer_weight_codes(fold_input_scales(qmodel).layers()[name], name)
    assert torch.equal(codes[0].dequantize(), qmodel.layers()[name].effective_weight())


def test_an_unquantized_input_cannot_take_tau(make_unet, unet_inputs):
    _, qmodel = calibrated(make_unet, unet_inputs, pts=False)
    qmodel.layers()["conv_out"].use_act_quant = False
    with pytest.raises(ExportError, match="conv_out"):
        fold_input_scales(qmodel)
