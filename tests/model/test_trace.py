"""trace_model: execution order and concatenation-fed layers, on diffusers and custom models."""
from __future__ import annotations

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
