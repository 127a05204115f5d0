"""The naive recipe: RTN weights on per-channel min/max grids, global min/max activation ranges."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from diffquant.config import QuantConfig
from diffquant.errors import DiffquantError
from diffquant.methods.naive import run_naive
from diffquant.model import quantize

TIMESTEPS = (900, 400, 20)


def batches(unet_inputs):
    """Calibration batches: different seeds, timesteps and scales."""
    out = []
    for i, t in enumerate(TIMESTEPS):
        for b in range(2):
            (x, ts), kw = unet_inputs(batch=2, t=t, seed=10 * i + b)
            out.append(((x * (0.5 + i), ts), kw))
    return out


def make_loop(data):
    def loop(model):
        for args, kwargs in data:
            model(*args, **kwargs)

    return loop


def record_inputs(model: nn.Module, names, data) -> dict[str, list[torch.Tensor]]:
    """Inputs of the named submodules over all calibration batches."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, inp, n=n: seen[n].append(inp[0].detach().clone())) for n in names]
    with torch.no_grad():
        make_loop(data)(model)
    for h in handles:
        h.remove()
    return seen


def hand_rtn(w: torch.Tensor, bits: int, axis: int) -> torch.Tensor:
    """Round-to-nearest on the per-channel asymmetric min/max grid (range widened to contain 0)."""
    dims = tuple(d for d in range(w.dim()) if d != axis)
    lo = w.amin(dim=dims, keepdim=True).clamp(max=0)
    hi = w.amax(dim=dims, keepdim=True).clamp(min=0)
    levels = 2**bits - 1
    s = ((hi - lo) / levels).clamp(min=1e-8)
    z = torch.round(-lo / s).clamp(0, levels)
    return s * (torch.clamp(torch.round(w / s) + z, 0, levels) - z)


@pytest.mark.parametrize("bits", [4, 8])
def test_weights_are_round_to_nearest_on_per_channel_minmax_grids(make_unet, unet_inputs, bits):
    qmodel = quantize(make_unet(), QuantConfig(weight_bits=bits, act_bits=8, split=True))
    run_naive(qmodel, make_loop(batches(unet_inputs)))
    n_split = 0
    for name, layer in qmodel.layers().items():
        with torch.no_grad():
            w_q = layer.effective_weight()
        parts = layer.weight_parts()
        n_split += len(parts) == 2
        expected = torch.cat([hand_rtn(p.detach(), bits, layer.out_axis) for p in parts], dim=layer.in_axis)
        torch.testing.assert_close(w_q, expected, rtol=0, atol=1e-6, msg=name)
        # at most 2^b levels per output channel and weight part
        split_sizes = [p.shape[layer.in_axis] for p in parts]
        for part in torch.split(w_q, split_sizes, dim=layer.in_axis):
            per_channel = part.movedim(layer.out_axis, 0).reshape(part.shape[layer.out_axis], -1)
            assert max(len(torch.unique(row)) for row in per_channel) <= 2**bits
    assert n_split > 0


def test_activation_ranges_are_global_min_max_of_each_layer_input(make_unet, unet_inputs):
    """The act quantizer of every layer stores min/max over all calibration batches of its input.

    Ranges are observed in the wrapped model with weights and earlier activations already
    quantized (as in Q-Diffusion's calibration), so the inputs to compare with are the ones the
    layers saw there; layers whose inputs come straight from the model inputs (conv_in, the first
    time-embedding linear) must match the float model exactly, the rest closely.
    """
    float_model = make_unet()
    data = batches(unet_inputs)
    qmodel = quantize(float_model, QuantConfig(weight_bits=8, act_bits=8))
    names = list(qmodel.layers())

    seen_q = {n: [] for n in names}
    handles = [qmodel.model.get_submodule(n).register_forward_pre_hook(
        lambda m, inp, n=n: seen_q[n].append(inp[0].detach().clone())) for n in names]
    run_naive(qmodel, make_loop(data))
    for h in handles:
        h.remove()
    seen_f = record_inputs(float_model, names, data)

    for name in names:
        q = qmodel.model.get_submodule(name).act_quantizers[0]
        assert len(seen_q[name]) == len(data) and int(q.batches_seen[0]) == len(data)
        lo = min(x.min() for x in seen_q[name])
        hi = max(x.max() for x in seen_q[name])
        assert q.range_lo[0].item() == lo.item() and q.range_hi[0].item() == hi.item(), name
        expected_step = (max(hi.item(), 0) - min(lo.item(), 0)) / 255
        assert q.step[0].item() == pytest.approx(expected_step, rel=1e-5)
        f_lo = min(x.min() for x in seen_f[name]).item()
        f_hi = max(x.max() for x in seen_f[name]).item()
        width = f_hi - f_lo
        assert abs(q.range_lo[0].item() - f_lo) < 0.1 * width and abs(q.range_hi[0].item() - f_hi) < 0.1 * width
    for name in ("conv_in", "time_embedding.linear_1"):
        q = qmodel.model.get_submodule(name).act_quantizers[0]
        assert q.range_lo[0].item() == min(x.min() for x in seen_f[name]).item()
        assert q.range_hi[0].item() == max(x.max() for x in seen_f[name]).item()
    # the range covers all batches, not just the first
    conv_in = qmodel.model.conv_in.act_quantizers[0]
    first = seen_f["conv_in"][0]
    assert conv_in.range_lo[0] < first.min() and conv_in.range_hi[0] > first.max()


def test_w4a32_leaves_activations_in_floating_point(make_unet, unet_inputs):
    float_model = make_unet()
    data = batches(unet_inputs)
    qmodel = quantize(float_model, QuantConfig(weight_bits=4, act_bits=8, quantize_acts=False))
    assert qmodel.quant_config.tag == "W4A32"
    run_naive(qmodel, None)  # no calibration data needed
    assert qmodel.plan.attention == []
    assert all(not q.active for q in qmodel.quantizers("act").values())
    # = the float model with hand-quantized weights
    reference = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, layer in qmodel.layers().items():
            reference.get_submodule(name).weight.copy_(hand_rtn(layer.weight, 4, layer.out_axis))
        args, kwargs = data[0]
        torch.testing.assert_close(qmodel(*args, **kwargs).sample, reference(*args, **kwargs).sample,
                                   rtol=1e-5, atol=1e-5)


def test_w8a8_error_is_much_smaller_than_w4a8(make_unet, unet_inputs):
    float_model = make_unet()
    data = batches(unet_inputs)
    test_args, test_kwargs = unet_inputs(batch=4, t=400, seed=99)
    with torch.no_grad():
        reference = float_model(*test_args, **test_kwargs).sample
    errors = {}
    for wbits in (8, 4):
        qmodel = run_naive(quantize(float_model, QuantConfig(weight_bits=wbits, act_bits=8)), make_loop(data))
        assert qmodel.recipe == "naive" and not qmodel.training
        with torch.no_grad():
            y = qmodel(*test_args, **test_kwargs).sample
        errors[wbits] = ((y - reference).pow(2).mean() / reference.pow(2).mean()).item()
    assert 0 < errors[8] < errors[4] / 4
    assert errors[8] < 0.01


def test_activation_quantization_needs_calibration_data(make_unet):
    qmodel = quantize(make_unet(), QuantConfig())
    with pytest.raises(DiffquantError, match="forward_loop"):
        run_naive(qmodel, None)


def test_a_layer_the_data_never_reaches_stays_in_floating_point():
    class WithUnusedBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    x = torch.randn(4, 3)
    qmodel = quantize(WithUnusedBranch(), QuantConfig(), ((x,), {}))
    run_naive(qmodel, lambda m: m(x))
    assert qmodel.model.used.act_quantizers[0].enabled
    assert not qmodel.model.unused.act_quantizers[0].enabled


def test_naive_config_range_policies_reach_the_wrapped_quantizers(tmp_path, monkeypatch):
    """NaiveConfig(w_init=lp_shrink, a_init=ema_minmax) through the pipeline sets the quantizers' policies."""
    from diffusers import UNet2DModel

    from diffquant.config import QuantConfig
    from diffquant.methods.naive import NaiveConfig
    from diffquant.pipeline import CalibConfig, quantize_bundle
    from diffquant.zoo.registry import load_model

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4).save_pretrained(tmp_path / "m")
    bundle = load_model(str(tmp_path / "m"))
    res = quantize_bundle(bundle, "naive", QuantConfig(weight_bits=4), CalibConfig(n=2, steps=2, every=1),
                          recipe_config=NaiveConfig(w_init="lp_shrink", a_init="ema_minmax"))
    assert {q.init for q in res.qmodel.quantizers("weight").values()} == {"lp_shrink"}
    assert {q.init for q in res.qmodel.quantizers("act").values()} == {"ema_minmax"}
    assert res.qmodel.quant_config.weight_init == "lp_shrink"
