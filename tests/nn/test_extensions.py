"""QuantLayer extension slots: input scale τ (LES / SmoothQuant) and low-rank weight updates."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.errors import ConfigError
from diffquant.nn.layers import QuantizerSpec, QuantLayer, attach_input_scale, attach_lora


def make(module, bits=4):
    layer = QuantLayer(module, QuantizerSpec(bits=bits, per_channel=True), QuantizerSpec(bits=8))
    return layer


@pytest.mark.parametrize("module,shape", [
    (nn.Conv2d(6, 4, 3, padding=1), (2, 6, 5, 5)),
    (nn.Linear(6, 4), (3, 6)),
    (nn.ConvTranspose2d(6, 4, 2, stride=2), (2, 6, 3, 3)),
])
def test_input_scale_is_exact_without_quantization(module, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    layer = make(module)
    layer.use_weight_quant = layer.use_act_quant = False
    ref = module(x)
    attach_input_scale(layer, torch.rand(6) + 0.5)
    assert torch.allclose(layer(x), ref, atol=1e-5)


def test_input_scale_of_ones_is_identity_with_quantization():
    torch.manual_seed(0)
    module = nn.Conv2d(6, 4, 3, padding=1)
    x = torch.randn(2, 6, 5, 5)
    layer = make(module)
    for q, t in zip(layer.weight_quantizers, layer.weight_parts()):
        q.init_from(t)
    layer.act_quantizers[0].init_from(x)
    ref = layer(x)
    attach_input_scale(layer)
    assert torch.equal(layer(x), ref)


def test_input_scale_changes_what_weight_quantizer_sees():
    module = nn.Linear(3, 2)
    layer = make(module)
    attach_input_scale(layer, torch.tensor([1.0, 2.0, 4.0]))
    (w,) = layer.weight_parts()
    assert torch.allclose(w, module.weight * torch.tensor([1.0, 2.0, 4.0]))
    with pytest.raises(ConfigError):
        attach_input_scale(layer, torch.ones(4))


def test_lora_with_zero_b_leaves_layer_unchanged_and_trains():
    torch.manual_seed(0)
    module = nn.Conv2d(4, 5, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    layer = make(module)
    layer.weight_quantizers[0].init_from(module.weight)
    layer.act_quantizers[0].init_from(x)
    ref = layer(x)
    delta = attach_lora(layer, rank=2)
    assert torch.equal(layer(x), ref)
    delta.requires_grad_(True)
    layer(x).square().sum().backward()
    assert delta.lora_B.grad is not None and delta.lora_B.grad.abs().sum() > 0


def test_lora_conv_delta_is_per_kernel_position_product():
    layer = make(nn.Conv2d(3, 4, 3))
    d = attach_lora(layer, rank=2)
    with torch.no_grad():
        d.lora_B.normal_()
    delta = d()
    assert delta.shape == layer.weight.shape
    assert torch.allclose(delta[:, :, 1, 2], d.lora_B[:, :, 1, 2] @ d.lora_A[:, :, 1, 2], atol=1e-6)
    lin = make(nn.Linear(3, 4))
    dl = attach_lora(lin, rank=1)
    with torch.no_grad():
        dl.lora_B.fill_(1.0)
    assert torch.allclose(dl(), dl.lora_B @ dl.lora_A)
