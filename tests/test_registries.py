"""Registries: stages, quantized layer kinds and quantizer variants are registered by name (no
if-chains); an unknown name is a one-line error listing what exists; a name is registered once."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffquant.errors import ConfigError
from diffquant.nn import LAYER_KINDS, SUPPORTED, QuantizerSpec, QuantLayer
from diffquant.quant.variants import QUANTIZER_VARIANTS, rebuild_quantizer
from diffquant.recipes import STAGES
from diffquant.registry import Registry


def test_every_registry_names_what_it_has():
    assert {"adaround", "les", "omq", "qalora", "select_tdac", "wrap"} <= set(STAGES)
    assert set(LAYER_KINDS) == {"Linear", "Conv1d", "Conv2d", "ConvTranspose2d"}
    assert set(SUPPORTED) == {LAYER_KINDS.get(k).module_type for k in LAYER_KINDS}
    assert {"UniformQuantizer", "MixedBitQuantizer", "PTSQuantizer"} == set(QUANTIZER_VARIANTS)
    for registry, name in ((STAGES, "adaroundd"), (LAYER_KINDS, "Conv3d"), (QUANTIZER_VARIANTS, "LogQuantizer")):
        with pytest.raises(ConfigError, match=f"unknown .*{name}.*; available: ") as err:
            registry.get(name)
        assert "\n" not in str(err.value)


def test_a_name_is_registered_once():
    registry = Registry("thing")
    registry.add("a", 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("a", 2)


@pytest.mark.parametrize("module, x", [
    (nn.Linear(6, 4), torch.randn(3, 6)),
    (nn.Conv1d(6, 4, 3, padding=1, groups=2), torch.randn(2, 6, 9)),
    (nn.Conv2d(6, 4, 3, stride=2, padding=1), torch.randn(2, 6, 8, 8)),
    (nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2), torch.randn(2, 6, 5, 5)),
])
def test_each_layer_kind_at_16_bits_is_its_float_layer(module, x):
    """The registered op, axes and call arguments reproduce the float layer (16-bit fake quant)."""
    torch.manual_seed(0)
    layer = QuantLayer(module, QuantizerSpec(bits=16, per_channel=True), QuantizerSpec(bits=16))
    layer.use_weight_quant = layer.use_act_quant = False
    assert torch.allclose(layer(x), module(x), atol=1e-6)


def test_a_variant_is_rebuilt_from_its_registered_builder():
    from diffquant.quant.quantizer import UniformQuantizer

    plain = UniformQuantizer(8, channel_axis=None)
    pts = rebuild_quantizer({"class": "PTSQuantizer", "pts_axis": 1, "pts_channels": 5}, plain)
    assert type(pts).__name__ == "PTSQuantizer" and pts.multiplier.shape[-1] == 5
    assert rebuild_quantizer({"class": "UniformQuantizer"}, plain) is plain
    with pytest.raises(ConfigError, match="back into a plain one"):
        rebuild_quantizer({"class": "UniformQuantizer"}, pts)
    assert F.linear is LAYER_KINDS.get("Linear").op
