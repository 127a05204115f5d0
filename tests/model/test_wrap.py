"""quantize()/build(): coverage, split points, unit order, exactness at 16 bits, rules, switches."""
from __future__ import annotations

import fnmatch

import pytest
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from diffquant.config import DEFAULT_BLOCK_TYPES, LayerRule, QuantConfig
from diffquant.errors import ConfigError
from diffquant.model import QuantModel, quantize
from diffquant.model.adapters import example_inputs_for
from diffquant.nn.attention import QuantAttnProcessor
from diffquant.nn.layers import QuantLayer

W16A16 = dict(weight_bits=16, act_bits=16)


def float_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]


def output(model, args, kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out.sample if hasattr(out, "sample") else out


def execution_order(model: nn.Module, args, kwargs) -> dict[str, int]:
    order: dict[str, int] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, inp, name=name: None if name in order else order.update({name: len(order)}))
        for name, m in model.named_modules() if name
    ]
    output(model, args, kwargs)
    for h in handles:
        h.remove()
    return order


def calibrate_all(qmodel: QuantModel, args, kwargs) -> None:
    """Minimal calibration for switch tests: weights from themselves, activations from one batch."""
    for layer in qmodel.layers().values():
        for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
            q.init_from(w.detach())
    qmodel.set_act_mode("observe")
    output(qmodel, args, kwargs)
    qmodel.set_act_mode("quantize")


def test_every_conv_and_linear_is_wrapped(any_tiny_model, device):
    model = any_tiny_model(device)
    expected = float_layers(model)
    n_attention = sum(isinstance(m, Attention) for m in model.modules())
    qmodel = quantize(model, QuantConfig(split=True))
    assert sorted(qmodel.layers()) == sorted(expected)
    assert sum(isinstance(m, QuantLayer) for m in qmodel.modules()) == len(expected)
    assert float_layers(qmodel.model) == []  # no float Conv/Linear left behind
    assert len(qmodel.plan.attention) == n_attention > 0
    assert all(isinstance(p, QuantAttnProcessor) for p in qmodel.attention_processors().values())
    for layer in qmodel.layers().values():
        assert layer.weight.device.type == layer.weight_quantizers[0].step.device.type == torch.device(device).type


def test_w16a16_reproduces_the_float_model_exactly(any_tiny_model, device):
    model = any_tiny_model(device)
    args, kwargs = example_inputs_for(model, batch=3)
    reference = output(model, args, kwargs)
    qmodel = quantize(model, QuantConfig(**W16A16, split=True))
    assert torch.equal(output(qmodel, args, kwargs), reference)


def test_the_users_model_is_untouched(make_unet):
    model = make_unet()
    args, kwargs = example_inputs_for(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    processors = {n: type(m.processor) for n, m in model.named_modules() if isinstance(m, Attention)}
    reference = output(model, args, kwargs)
    qmodel = quantize(model, QuantConfig(weight_bits=4, split=True))
    calibrate_all(qmodel, args, kwargs)
    assert not torch.equal(output(qmodel, args, kwargs), reference)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: type(m.processor) for n, m in model.named_modules() if isinstance(m, Attention)} == processors
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(output(model, args, kwargs), reference)
    # the copy owns its weights (no sharing with the user's model)
    assert qmodel.model.conv_in.weight.data_ptr() != model.conv_in.weight.data_ptr()


def test_inplace_wraps_the_given_model(make_unet):
    model = make_unet()
    qmodel = quantize(model, QuantConfig(), inplace=True)
    assert qmodel.model is model and isinstance(model.conv_in, QuantLayer)


def test_split_points_are_exactly_the_up_block_shortcuts(make_unet, make_cond_unet):
    for make in (make_unet, make_cond_unet):
        model = make()
        qmodel = quantize(model, QuantConfig(split=True))
        splits = {lp.name: lp.split for lp in qmodel.plan.layers if lp.split is not None}
        shortcuts = {
            f"up_blocks.{i}.resnets.{j}.conv_shortcut": r.conv_shortcut.in_channels - skip
            for i, block in enumerate(model.up_blocks)
            for j, (r, skip) in enumerate(zip(block.resnets, _skip_channels(model, i)))
        }
        assert splits == shortcuts
        for name, split in splits.items():
            layer = qmodel.model.get_submodule(name)
            assert layer.split == split and len(layer.act_quantizers) == 2
        # without split=True nothing is split
        plain = quantize(model, QuantConfig())
        assert all(lp.split is None for lp in plain.plan.layers)


def test_time_embedding_and_dit_layers_are_never_split(make_unet, make_dit):
    """Their inputs are sinusoidal [sin, cos] concatenations, not skip concatenations."""
    for make in (make_unet, make_dit):
        qmodel = quantize(make(), QuantConfig(split=True))
        te = [lp for lp in qmodel.plan.layers if "time_embedding" in lp.roles]
        assert te and all(lp.split is None for lp in te)
    assert all(lp.split is None for lp in qmodel.plan.layers)  # the DiT has no skip concatenation


def _skip_channels(model, i: int) -> list[int]:
    """Channels of the skips that up block ``i`` pops, recorded in a float forward."""
    seen = {}
    block = model.up_blocks[i]

    def hook(mod, a, kw):
        seen["skips"] = kw.get("res_hidden_states_tuple", a[1] if len(a) > 1 else None)

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    args, kwargs = example_inputs_for(model)
    output(model, args, kwargs)
    h.remove()
    return [t.shape[1] for t in reversed(seen["skips"])]


def test_units_and_layers_follow_execution_order(any_tiny_model):
    model = any_tiny_model()
    args, kwargs = example_inputs_for(model)
    order = execution_order(model, args, kwargs)
    qmodel = quantize(model, QuantConfig())
    unit_names = [u.name for u in qmodel.plan.units]
    assert unit_names == sorted(unit_names, key=order.__getitem__)
    layer_names = [lp.name for lp in qmodel.plan.layers]
    assert layer_names == sorted(layer_names, key=order.__getitem__)
    # every layer and attention module belongs to exactly one unit
    in_units = [n for u in qmodel.plan.units for n in u.layers]
    assert sorted(in_units) == sorted(layer_names)
    assert sorted(n for u in qmodel.plan.units for n in u.attention) == sorted(qmodel.plan.attention)
    # blocks are of the configured types and contain their layers
    for unit in qmodel.plan.units:
        if unit.kind == "block":
            assert unit.module_type in DEFAULT_BLOCK_TYPES  # found from the graph: the known families' blocks
            assert all(n == unit.name or n.startswith(unit.name + ".") for n in unit.layers + unit.attention)
        else:
            assert unit.layers == [unit.name]
    assert {u.module_type for u in qmodel.plan.units if u.kind == "block"} >= {"ResnetBlock2D"} or \
        type(model).__name__ == "DiTTransformer2DModel"


@pytest.mark.parametrize("include,exclude", [
    (["down_blocks.*"], []),
    (["*"], ["*.attentions.*", "*time_emb*"]),
    (["up_blocks.*", "conv_out"], ["*.conv_shortcut"]),
])
def test_name_filters(make_unet, include, exclude):
    model = make_unet()
    qmodel = quantize(model, QuantConfig(include=include, exclude=exclude))
    expected = [
        n for n in float_layers(model)
        if any(fnmatch.fnmatchcase(n, p) for p in include) and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]
    assert sorted(qmodel.layers()) == sorted(expected)
    left_float = {n for n, m in qmodel.model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    assert left_float == set(float_layers(model)) - set(expected)


def test_a_filter_that_matches_nothing_is_a_config_error(make_unet):
    with pytest.raises(ConfigError, match="nothing to quantize"):
        quantize(make_unet(), QuantConfig(include=["no_such_layer"], attn_matmul=False))


def bits(qmodel: QuantModel) -> dict[str, tuple[int, int]]:
    return {lp.name: (lp.weight_bits, lp.act_bits) for lp in qmodel.plan.layers}


@pytest.mark.parametrize("mode,expected", [("quantize", (4, 6)), ("8bit", (8, 8)), ("fp", (32, 32))])
def test_first_last_rule(make_unet, mode, expected):
    model = make_unet()
    qmodel = quantize(model, QuantConfig(weight_bits=4, act_bits=6, first_last=mode))
    order = list(qmodel.plan.layers)
    first, last = order[0].name, order[-1].name
    assert "first" in order[0].roles and "last" in order[-1].roles
    assert last == "conv_out"
    table = bits(qmodel)
    assert table[first] == table[last] == expected
    assert all(v == (4, 6) for n, v in table.items() if n not in (first, last))
    layer = qmodel.model.get_submodule(last)
    assert layer.weight_quantizers[0].bits == expected[0] and layer.act_quantizers[0].bits == expected[1]
    assert layer.weight_quantizers[0].is_float == (mode == "fp")


def test_time_embedding_rule(make_unet, make_dit):
    for make, prefix in ((make_unet, "time_embedding."), (make_dit, "transformer_blocks.0.norm1.emb.timestep_embedder.")):
        qmodel = quantize(make(), QuantConfig(weight_bits=4, act_bits=8, time_embedding="fp"))
        table = bits(qmodel)
        te = [n for n in table if "time_embedding" in qmodel.plan.layer(n).roles]
        assert te and any(n.startswith(prefix) for n in te)
        assert all(table[n] == (32, 32) for n in te)
        assert all(table[n] == (4, 8) for n in table if n not in te and not set(qmodel.plan.layer(n).roles) & {"first", "last"})


def test_layer_rules(make_unet, unet_inputs):
    rules = [
        LayerRule("@first", weight_bits=8),
        {"pattern": "up_blocks.*.conv_shortcut", "act_bits": 16},
        LayerRule("conv_out", quantize_input=False),
        LayerRule("down_blocks.0.downsamplers.*", skip=True),
    ]
    model = make_unet()
    qmodel = quantize(model, QuantConfig(weight_bits=4, act_bits=8, rules=rules, split=True))
    table = bits(qmodel)
    first = qmodel.plan.layers[0].name
    assert table[first] == (8, 8)
    shortcuts = [n for n in table if fnmatch.fnmatchcase(n, "up_blocks.*.conv_shortcut")]
    assert shortcuts and all(table[n] == (4, 16) for n in shortcuts)
    assert all(q.is_float for n in shortcuts for q in qmodel.model.get_submodule(n).act_quantizers)
    assert "down_blocks.0.downsamplers.0.conv" not in table
    assert type(qmodel.model.down_blocks[0].downsamplers[0].conv) is nn.Conv2d
    assert qmodel.plan.layer("conv_out").quantize_input is False

    # quantize_input=False survives the global switches and calibration
    args, kwargs = unet_inputs()
    calibrate_all(qmodel, args, kwargs)
    qmodel.set_quant_state(weights=True, acts=True)
    conv_out = qmodel.model.conv_out
    assert conv_out.use_act_quant is False and conv_out.use_weight_quant is True
    seen = []
    conv_out.act_quantizers[0].register_forward_pre_hook(lambda m, i: seen.append(1))
    output(qmodel, args, kwargs)
    assert seen == []


def test_set_quant_state_switches(make_unet, unet_inputs):
    model = make_unet()
    args, kwargs = unet_inputs()
    reference = output(model, args, kwargs)
    qmodel = quantize(model, QuantConfig(weight_bits=4, act_bits=8))
    calibrate_all(qmodel, args, kwargs)
    both = output(qmodel, args, kwargs)
    qmodel.set_quant_state(weights=False, acts=False)
    assert all(not (la.use_weight_quant or la.use_act_quant) for la in qmodel.layers().values())
    assert all(not p.use_act_quant for p in qmodel.attention_processors().values())
    assert torch.equal(output(qmodel, args, kwargs), reference)
    qmodel.set_quant_state(weights=True)
    w_only = output(qmodel, args, kwargs)
    assert all(la.use_weight_quant and not la.use_act_quant for la in qmodel.layers().values())
    qmodel.set_quant_state(weights=False, acts=True)
    a_only = output(qmodel, args, kwargs)
    assert all(p.use_act_quant for p in qmodel.attention_processors().values())
    qmodel.set_quant_state(weights=True)
    assert torch.equal(output(qmodel, args, kwargs), both)
    outs = [reference, w_only, a_only, both]
    assert all(not torch.equal(a, b) for i, a in enumerate(outs) for b in outs[i + 1:])


def test_summary_lists_every_layer(make_unet):
    qmodel = quantize(make_unet(), QuantConfig(weight_bits=4, act_bits=8, split=True, first_last="8bit"))
    lines = qmodel.summary().splitlines()
    by_name = {line.split()[0]: line.split() for line in lines[2:] if line.strip()}
    for lp in qmodel.plan.layers:
        row = by_name[lp.name]
        assert row[1] == lp.kind and row[2] == str(lp.weight_bits) and row[3] == str(lp.act_bits)
        assert row[5] == (str(lp.split) if lp.split else "-")
    for name in qmodel.plan.attention:
        assert name in by_name
    assert f"{len(qmodel.plan.layers)} quantized layers" in lines[-1]


def test_quantize_rejects_bad_models(make_unet):
    with pytest.raises(ConfigError, match="nn.Module"):
        quantize(lambda x: x)
    qmodel = quantize(make_unet(), QuantConfig())
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(qmodel)
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(qmodel.model, QuantConfig())
    with pytest.raises(ConfigError, match="example_inputs"):
        quantize(nn.Sequential(nn.Linear(2, 2)))


class CatConvNet(nn.Module):
    def __init__(self, norm_first: bool):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 1)
        self.b = nn.Conv2d(2, 5, 1)
        self.norm = nn.GroupNorm(1, 8) if norm_first else nn.Identity()
        self.fuse = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.fuse(self.norm(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_custom_model_concatenation(device):
    x = torch.randn(2, 2, 4, 4, device=device)
    split_net = CatConvNet(norm_first=False).to(device)
    qmodel = quantize(split_net, QuantConfig(**W16A16, split=True), ((x,), {}))
    assert qmodel.plan.layer("fuse").split == 3
    with torch.no_grad():
        assert torch.equal(qmodel(x), split_net(x))
    normed = quantize(CatConvNet(norm_first=True).to(device), QuantConfig(split=True), ((x,), {}))
    assert normed.plan.layer("fuse").split is None
