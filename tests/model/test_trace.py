"""trace_model: execution order and concatenation-fed layers, on diffusers and custom models."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.model.adapters import example_inputs_for
from diffquant.model.trace import trace_model


def first_call_order(model: nn.Module, args, kwargs) -> list[str]:
    """Independent recording: names of all submodules in the order of their first call."""
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, inp, name=name: order.append(name) if name not in order else None)
        for name, m in model.named_modules() if name
    ]
    with torch.no_grad():
        model(*args, **kwargs)
    for h in handles:
        h.remove()
    return order


def expected_up_block_splits(model: nn.Module, args, kwargs) -> dict[str, int]:
    """Channels of the hidden-state part of every up-block resnet input (hidden state first,
    then the skip popped from the end of ``res_hidden_states_tuple``)."""
    skips: dict[str, tuple] = {}
    inputs: dict[str, int] = {}
    handles = []
    for i, block in enumerate(model.up_blocks):
        def block_hook(mod, a, kw, i=i):
            skips[i] = kw["res_hidden_states_tuple"] if "res_hidden_states_tuple" in kw else a[1]
        handles.append(block.register_forward_pre_hook(block_hook, with_kwargs=True))
        for j, resnet in enumerate(block.resnets):
            handles.append(resnet.register_forward_pre_hook(
                lambda mod, a, i=i, j=j: inputs.__setitem__((i, j), a[0].shape[1])))
    with torch.no_grad():
        model(*args, **kwargs)
    for h in handles:
        h.remove()
    out = {}
    for (i, j), total in inputs.items():
        skip_channels = skips[i][-(j + 1)].shape[1]
        out[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = total - skip_channels
    return out


def test_call_order_matches_an_independent_recording(any_tiny_model):
    model = any_tiny_model()
    args, kwargs = example_inputs_for(model)
    trace = trace_model(model, args, kwargs)
    expected = first_call_order(model, args, kwargs)
    assert sorted(trace.call_index, key=trace.call_index.get) == expected
    assert list(trace.call_index.values()) == sorted(trace.call_index.values())


def test_unet_splits_are_exactly_the_up_block_shortcuts(make_unet, make_cond_unet):
    for make in (make_unet, make_cond_unet):
        model = make()
        args, kwargs = example_inputs_for(model)
        trace = trace_model(model, args, kwargs)
        # the trace also sees the sinusoidal [sin, cos] concatenation feeding the time MLP
        # (the plan never splits that layer, see test_wrap.py)
        assert trace.splits["time_embedding.linear_1"] == model.config.block_out_channels[0] // 2
        splits = {k: v for k, v in trace.splits.items() if not k.startswith("time_embedding")}
        expected = expected_up_block_splits(model, args, kwargs)
        assert splits == expected
        assert all(v > 0 for v in expected.values()) and len(expected) == sum(len(b.resnets) for b in model.up_blocks)
        assert not trace.multi_part


def test_tracing_leaves_the_model_unchanged(make_unet):
    model = make_unet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    args, kwargs = example_inputs_for(model)
    with torch.no_grad():
        before = model(*args, **kwargs).sample
    trace_model(model, args, kwargs)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(*args, **kwargs).sample, before)


class CatThenConv(nn.Module):
    """Concatenates two feature maps right before a conv (a split), and three before another."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 1)
        self.b = nn.Conv2d(2, 5, 1)
        self.fuse = nn.Conv2d(8, 4, 3, padding=1)
        self.fuse3 = nn.Conv2d(10, 2, 1)
        self.head = nn.Linear(4 + 6, 3)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        h = self.fuse(torch.cat([a, b], dim=1))
        h3 = self.fuse3(torch.cat((h, a, b[:, :3]), 1))
        pooled = h3.mean(dim=(2, 3))
        return self.head(torch.cat([h.mean(dim=(2, 3)), pooled, pooled, pooled], dim=-1))


class CatThenNormThenConv(nn.Module):
    """Concatenates, then normalises before the conv: the conv does not see the raw concat."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv = nn.Conv2d(8, 4, 1)
        self.batch_conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = self.a(x)
        h = self.conv(self.norm(torch.cat([a, a * 2], dim=1)))
        return self.batch_conv(torch.cat([h, h], dim=0))  # a concat along the batch: no split


def test_custom_cat_before_conv_is_found():
    model = CatThenConv()
    x = torch.randn(2, 2, 4, 4)
    seen = {}
    model.fuse.register_forward_pre_hook(lambda m, inp: seen.setdefault("fuse", inp[0]))
    trace = trace_model(model, (x,), {})
    assert trace.splits == {"fuse": 3}
    assert trace.multi_part == {"fuse3": [4, 3, 3], "head": [4, 2, 2, 2]}
    # the layer's input really is the concatenation of a and b
    torch.testing.assert_close(seen["fuse"], torch.cat([model.a(x), model.b(x)], 1))


def test_linear_cat_on_last_axis_is_a_split():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.x_proj = nn.Linear(3, 5)
            self.out = nn.Linear(5 + 2, 1)

        def forward(self, x, c):
            return self.out(torch.concat((self.x_proj(x), c), dim=-1))

    trace = trace_model(Mlp(), (torch.randn(4, 3), torch.randn(4, 2)), {})
    assert trace.splits == {"out": 5}


def test_cat_then_norm_is_not_a_split():
    trace = trace_model(CatThenNormThenConv(), (torch.randn(2, 2, 4, 4),), {})
    assert trace.splits == {} and trace.multi_part == {}
    assert list(trace.call_index) == ["a", "norm", "conv", "batch_conv"]


# ---------------------------------------------------------------------- structure from the graph
class _OwnBlock(torch.nn.Module):
    """A residual block class no name list knows, with its own projection of the condition."""

    def __init__(self, c: int, e: int):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.Conv2d(c, c, 3, padding=1)
        self.cond = torch.nn.Linear(e, c)

    def forward(self, x, emb):
        return x + self.b(torch.relu(self.a(x) + self.cond(emb)[:, :, None, None]))


class _UnseenDenoiser(torch.nn.Module):
    """Prefixed time MLP (``cond_mlp``), own block class, plain stem and head."""

    def __init__(self, c: int = 8, e: int = 16):
        super().__init__()
        self.cond_mlp = torch.nn.Sequential(torch.nn.Linear(e, e), torch.nn.SiLU(), torch.nn.Linear(e, e))
        self.stem, self.head = torch.nn.Conv2d(1, c, 3, padding=1), torch.nn.Conv2d(c, 1, 3, padding=1)
        self.stage = torch.nn.ModuleList([_OwnBlock(c, e), _OwnBlock(c, e)])
        self.e = e

    def forward(self, x, t):
        freqs = torch.exp(-torch.arange(self.e // 2, dtype=torch.float32) / (self.e // 2))
        angles = t.float()[:, None] * freqs[None]
        emb = self.cond_mlp(torch.cat([angles.sin(), angles.cos()], dim=1))
        h = self.stem(x)
        for block in self.stage:
            h = block(h, emb)
        return self.head(h)


def _unseen_inputs():
    return (torch.randn(2, 1, 8, 8), torch.tensor([10, 10])), {}


def test_an_unseen_denoiser_gets_blocks_and_time_embedding_from_the_traced_graph():
    from diffquant.config import QuantConfig
    from diffquant.model import quantize

    model = _UnseenDenoiser().eval()
    trace = trace_model(model, *_unseen_inputs())
    assert trace.residual_blocks == ["stage.0", "stage.1"]
    assert set(trace.timestep_only_layers()) == {"cond_mlp.0", "cond_mlp.2", "stage.0.cond", "stage.1.cond"}
    assert trace.input_flow["stem"] == 1  # from x only
    qmodel = quantize(model, QuantConfig(time_embedding="8bit", weight_bits=4), _unseen_inputs())
    blocks = [u.name for u in qmodel.plan.units if u.kind == "block"]
    assert blocks == ["stage.0", "stage.1"] and qmodel.plan.found == {"time_embedding": "structure",
                                                                      "blocks": "structure"}
    roles = {lp.name: lp for lp in qmodel.plan.layers}
    # the shared time MLP gets the role (and its 8-bit rule); the per-block projections stay in their blocks
    assert {n for n, lp in roles.items() if "time_embedding" in lp.roles} == {"cond_mlp.0", "cond_mlp.2"}
    assert roles["cond_mlp.0"].weight_bits == 8 and roles["stage.0.cond"].weight_bits == 4
    # roles for rules, from the data flow: the first x-consuming layer and the blocks' time projections
    assert "input" in roles["stem"].roles and "input" not in roles["cond_mlp.0"].roles
    assert {n for n, lp in roles.items() if "time_projection" in lp.roles} == {"stage.0.cond", "stage.1.cond"}
    assert "from the traced graph" in qmodel.summary()


def test_dmq_keeps_the_first_layer_and_time_projections_fp_on_models_without_unet_names(make_dit):
    from diffquant.config import QuantConfig
    from diffquant.methods import DMQConfig
    from diffquant.model import quantize

    dit = make_dit()
    qmodel = quantize(dit, DMQConfig().wrap_config(QuantConfig(weight_bits=4)))
    fp = {lp.name for lp in qmodel.plan.layers if lp.weight_bits == 32}
    assert "pos_embed.proj" in fp  # a DiT's first layer, which the old name list (conv_in) missed
    unseen = quantize(_UnseenDenoiser().eval(), DMQConfig().wrap_config(QuantConfig(weight_bits=4)), _unseen_inputs())
    assert {"stem", "stage.0.cond", "stage.1.cond", "head"} <= {lp.name for lp in unseen.plan.layers
                                                               if lp.weight_bits == 32}


def test_names_stay_the_override_and_a_typo_in_a_glob_is_one_warning():
    from diffquant.config import LayerRule, QuantConfig
    from diffquant.model import quantize

    config = QuantConfig(time_embedding_patterns=["stage.*.cond"], block_types=["Sequential"],
                         exclude=["hed"], rules=[LayerRule("stemm", weight_bits=8)])
    with pytest.warns(UserWarning) as record:
        qmodel = quantize(_UnseenDenoiser().eval(), config, _unseen_inputs())
    messages = [str(w.message) for w in record if "matches no layer" in str(w.message)]
    assert any("exclude pattern 'hed'" in m for m in messages) and any("rules pattern 'stemm'" in m for m in messages)
    assert qmodel.plan.found == {"time_embedding": "names", "blocks": "names"}
    assert [u.name for u in qmodel.plan.units if u.kind == "block"] == ["cond_mlp"]
    assert {lp.name for lp in qmodel.plan.layers if "time_embedding" in lp.roles} == {"stage.0.cond", "stage.1.cond"}


#: the name lists diffquant used before roles and feature points came from the traced graph
OLD_TIME_EMBEDDING_GLOBS = ["time_embedding.*", "time_embed.*", "pe_linear.*", "te*", "*.timestep_embedder.*",
                            "*.emb.timestep_embedder.*"]
OLD_TDAC_LAYERS = ["mid_block.attentions.0", "mid.attn_1", "middle_block.1", "mid_block.resnets.1",
                   "mid.res_block2", "b_mid.1"]
OLD_TRD_MODULES = {"unet": "up_blocks.1", "cond_unet": "up_blocks.1", "dit": "transformer_blocks.1",
                   "default": "up_blocks.2", "mnist-resunet": "decoders.2.1", "mnist-convunet": "b_out",
                   "pixart": "transformer_blocks.1"}


OLD_SHORTCUT_SUFFIXES = ("conv_shortcut", "skip_connection", "nin_shortcut", "residual_conv")


def _same_as_the_old_names(model, inputs, key):
    import copy
    import fnmatch

    from diffquant.config import DEFAULT_BLOCK_TYPES, QuantConfig
    from diffquant.model import quantize

    trace = trace_model(model, *inputs)
    modules = dict(model.named_modules())
    named = [n for n, m in modules.items() if n and type(m).__name__ in DEFAULT_BLOCK_TYPES]
    outer = [n for n in named if not any(n.startswith(o + ".") for o in named if o != n)]
    assert sorted(trace.residual_blocks) == sorted(outer)  # (mnist-convunet has none either way)
    structural = quantize(copy.deepcopy(model), QuantConfig(), inputs)
    by_name = quantize(copy.deepcopy(model), QuantConfig(time_embedding_patterns=OLD_TIME_EMBEDDING_GLOBS), inputs)
    roles = lambda q, r: {lp.name for lp in q.plan.layers if r in lp.roles}  # noqa: E731
    assert structural.plan.found["time_embedding"] == "structure" and by_name.plan.found["time_embedding"] == "names"
    assert roles(structural, "time_embedding") == roles(by_name, "time_embedding") != set()
    assert all(not fnmatch.fnmatchcase(n, "*time_emb_proj") for n in roles(structural, "time_embedding"))
    old_tdac = next((n for n in OLD_TDAC_LAYERS if n in modules), None)
    features = structural.plan.features
    if old_tdac is not None:
        assert features["middle"] == old_tdac
    assert features["last_block"] == OLD_TRD_MODULES[key]
    # shortcut projections: the old name suffixes, now found from the residual additions
    old_shortcuts = {lp.name for lp in structural.plan.layers if lp.name.rsplit(".", 1)[-1] in OLD_SHORTCUT_SUFFIXES}
    assert roles(structural, "shortcut") == old_shortcuts
    assert roles(structural, "input") == {"conv_in"} if "conv_in" in modules else len(roles(structural, "input")) == 1


def test_tiny_diffusers_models_get_the_old_names_answers_from_the_graph(any_tiny_model, request):
    from diffquant.model.adapters import example_inputs_for

    model = any_tiny_model()
    key = request.node.callspec.params["any_tiny_model"]
    _same_as_the_old_names(model, example_inputs_for(model), key)


def test_a_pixart_transformer_gets_the_old_names_answers_from_the_graph():
    """PixArt's shared adaLN: linear_2 feeds adaln_single.linear and is also used directly."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                     caption_channels=12, norm_num_groups=4).eval()
    inputs = ((torch.randn(2, 4, 8, 8),), dict(timestep=torch.tensor([10, 10]), encoder_hidden_states=torch.randn(2, 5, 12),
                                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}))
    _same_as_the_old_names(model, inputs, "pixart")


@pytest.mark.parametrize("name", ["default", "mnist-resunet", "mnist-convunet"])
def test_the_zoo_models_get_the_same_blocks_time_path_and_features_from_the_graph_as_from_names(name):
    """Blocks, the time-embedding MLP and TDAC/TRD's feature modules are found structurally; on the
    models the recipes were measured on, that is exactly the old name lists' answer (so their
    results stay bit-identical)."""
    from diffquant.errors import DiffquantError
    from diffquant.zoo.registry import load_model

    try:
        bundle = load_model(name)
    except DiffquantError as exc:
        pytest.skip(str(exc))
    _same_as_the_old_names(bundle.unet, bundle.example_inputs(2), name)


class _UnseenUNet(torch.nn.Module):
    """Encoder–bottleneck–decoder with a skip concatenation, all names unknown to diffquant."""

    def __init__(self, c: int = 8, e: int = 16):
        super().__init__()
        self.e = e
        self.clock = torch.nn.Sequential(torch.nn.Linear(e, e), torch.nn.GELU(), torch.nn.Linear(e, e))
        self.entry = torch.nn.Conv2d(1, c, 3, padding=1)
        self.enc = _OwnBlock(c, e)
        self.shrink = torch.nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.neck = torch.nn.ModuleList([_OwnBlock(c, e), _OwnBlock(c, e), _OwnBlock(c, e)])
        self.merge = torch.nn.Conv2d(2 * c, c, 1)
        self.dec = _OwnBlock(c, e)
        self.exit = torch.nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x, t):
        freqs = torch.exp(-torch.arange(self.e // 2, dtype=torch.float32) / (self.e // 2))
        angles = t.float()[:, None] * freqs[None]
        emb = self.clock(torch.cat([angles.sin(), angles.cos()], dim=1))
        skip = self.enc(self.entry(x), emb)
        h = self.shrink(skip)
        for stage in self.neck:
            h = stage(h, emb)
        h = torch.nn.functional.interpolate(h, scale_factor=2.0)
        h = self.dec(self.merge(torch.cat([h, skip], dim=1)), emb)
        return self.exit(h)


def test_an_unseen_unet_gets_its_middle_last_block_and_time_path_from_the_graph():
    from diffquant.config import QuantConfig
    from diffquant.model import quantize

    inputs = ((torch.randn(2, 1, 8, 8), torch.tensor([10, 10])), {})
    trace = trace_model(_UnseenUNet().eval(), *inputs)
    assert trace.outer_blocks == ["enc", "neck.0", "neck.1", "neck.2", "dec"]
    assert trace.middle_blocks == ["neck.0", "neck.1", "neck.2"]  # between the skip's making and its use
    qmodel = quantize(_UnseenUNet().eval(), QuantConfig(), inputs)
    assert qmodel.plan.features == {"middle": "neck.1", "last_block": "dec"}
    roles = {lp.name: lp.roles for lp in qmodel.plan.layers}
    assert {n for n, r in roles.items() if "time_embedding" in r} == {"clock.0", "clock.2"}
    assert {n for n, r in roles.items() if "time_projection" in r} == {f"{b}.cond" for b in trace.outer_blocks}
    assert "TDAC feature neck.1" in qmodel.summary()
    # what TDAC and TRD hook by default
    from diffquant.calib.tdac import default_feature_layer
    from diffquant.finetune.trd import default_feature_module

    assert default_feature_layer(_UnseenUNet().eval(), inputs) == "neck.1"
    assert default_feature_module(qmodel) == "dec"


class _ProjectedBlock(torch.nn.Module):
    """A residual block with a 1×1 projection of its input onto the addition, and a self-attention
    module of its own class (names no list knows)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        self.tail = torch.nn.Conv2d(c_out, c_out, 3, padding=1)
        self.bypass = torch.nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.bypass(x) + self.tail(torch.relu(self.body(x)))


class _OwnAttention(torch.nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(c, 3 * c), torch.nn.Linear(c, c)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, dim=-1)
        return x + self.out(weights @ v).transpose(1, 2).reshape(b, c, h, w)


class _RoleNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.entry = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.widen = _ProjectedBlock(4, 8)
        self.reduce = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.mix = _OwnAttention(8)
        self.exit = torch.nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t):
        return self.exit(self.mix(self.reduce(self.widen(self.entry(x)))))


def test_coverage_roles_of_an_unseen_model_come_from_the_traced_graph():
    """@shortcut, @downsample, @attention, @input, @last and registration order on a model whose
    names no list knows; rules on them apply when the model is wrapped, in order."""
    from diffquant.config import LayerRule, QuantConfig
    from diffquant.errors import ConfigError
    from diffquant.model import quantize

    inputs = ((torch.randn(2, 1, 8, 8), torch.tensor([10, 10])), {})
    trace = trace_model(_RoleNet().eval(), *inputs)
    assert trace.shortcut_layers == {"widen.bypass"} and trace.attention_modules == ["mix"]
    rules = [LayerRule("@shortcut", weight_bits=32, act_bits=32), LayerRule("@downsample", weight_bits=32),
             LayerRule("@attention", act_bits=6), LayerRule("@conv_in", weight_bits=8, at_least=True),
             LayerRule("@last", weight_bits=2, at_least=True)]
    qmodel = quantize(_RoleNet().eval(), QuantConfig(weight_bits=4, rules=rules), inputs)
    roles = {lp.name: set(lp.roles) for lp in qmodel.plan.layers}
    assert {n for n, r in roles.items() if "shortcut" in r} == {"widen.bypass"}
    assert {n for n, r in roles.items() if "downsample" in r} == {"reduce"}
    assert {n for n, r in roles.items() if "attention" in r} == {"mix.qkv", "mix.out"}
    assert "input" in roles["entry"] and "last" in roles["exit"] and "first_registered" in roles["entry"]
    bits = {lp.name: (lp.weight_bits, lp.act_bits) for lp in qmodel.plan.layers}
    assert bits["widen.bypass"] == (32, 32) and bits["reduce"] == (32, 8) and bits["mix.qkv"] == (4, 6)
    assert bits["entry"] == (8, 8) and bits["exit"] == (4, 8)  # at_least: a floor, never lowered
    assert bits["widen.body"] == (4, 8)
    with pytest.raises(ConfigError, match="unknown layer role '@shortcuts'"):
        LayerRule("@shortcuts", weight_bits=32)
