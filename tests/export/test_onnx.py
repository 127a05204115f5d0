"""ONNX export: valid graphs with Q/DQ (or integer) nodes that onnxruntime runs like the fake-quant model.

Tolerance (measured): on the tiny UNet the ONNX outputs match the fake-quant model to about
4e-7 absolute unless float rounding in a different accumulation order moves an activation across a
rounding boundary, which changes one code by one and about 1e-2 of the output; on mnist-resunet
(W4A8) the relative RMS difference was 0.9 %, against a 9 % quantization error. The tests check
relative RMS ≤ 2 % (3 % on mnist-resunet) and ≤ ¼ of the quantization error.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from diffquant.config import QuantConfig
from diffquant.errors import ConfigError
from diffquant.export.codes import ExportError
from diffquant.export.onnx_export import export_float_onnx, export_onnx
from diffquant.export.onnx_runtime import OnnxDenoiser, optimized_op_types
from diffquant.methods.naive import run_naive
from diffquant.model import quantize
from export_testing import (
    float64_copy, model_dtype, MIXED_RULE_REASONS, TIMESTEPS, assert_matches_fake_quant, catnet_inputs, mixed_rules,
    Saturating, saturating_case,
)


def _call(model, unet_inputs, batch=3, t=10, seed=7):
    (x, ts), kw = unet_inputs(batch=batch, t=t, seed=seed)
    x = (x * (1 + t / 250)).to(model_dtype(model))
    with torch.no_grad():
        out = model(x, ts, **kw)
    return out if isinstance(out, torch.Tensor) else out.sample


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("mode, bits", [("qdq", (8, 8)), ("integer", (8, 8)), ("integer", (4, 8))])
def test_tiny_unet_export_runs_in_onnxruntime_like_fake_quant(mode, bits, calibrated_unet, unet_inputs, tmp_path):
    unet, qmodel = calibrated_unet(*bits)
    result = export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "unet.onnx", mode=mode)
    assert result.paths == [tmp_path / "unet.onnx"] and result.timesteps is None
    model = onnx.load(str(result.paths[0]))
    onnx.checker.check_model(model, full_check=True)
    ops = _ops(result.paths[0])
    n_layers, n_attn = len(qmodel.plan.layers), len(qmodel.plan.attention)
    assert ops["QuantizeLinear"] >= n_layers + 4 * n_attn  # every layer input, q/k/v/probs
    if mode == "qdq":
        assert ops["DequantizeLinear"] >= 2 * n_layers + 4 * n_attn
        int8_weights = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
        assert len(int8_weights) >= n_layers  # weights are stored as 8-bit integers, not floats
    else:
        assert result.not_integer == {}
        ran = optimized_op_types(result.paths[0])
        assert ran.get("ConvInteger", 0) >= sum(lp.kind == "Conv2d" for lp in qmodel.plan.layers)
        assert ran.get("MatMulInteger", 0) == sum(lp.kind == "Linear" for lp in qmodel.plan.layers)
        assert "Conv" not in ran and "Gemm" not in ran  # no float conv / linear left
    denoiser = OnnxDenoiser(result.paths[0], threads=1)
    got = _call(denoiser, unet_inputs)  # batch 3: the batch dimension is dynamic
    assert got.shape == (3, 3, 8, 8)
    assert_matches_fake_quant(got, _call(qmodel, unet_inputs), _call(unet, unet_inputs),
                              fake64=_call(float64_copy(qmodel), unet_inputs))


def test_sub_8_bit_grids_are_restricted_subsets_of_int8(calibrated_unet, unet_inputs, tmp_path):
    """W4A6: weight codes centred on their zero point lie in [-15, 15]; 6-bit inputs get a Clip
    to their 64-level range in front of the uint8 QuantizeLinear."""
    unet, qmodel = calibrated_unet(4, 6)
    path = export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "w4a6.onnx").paths[0]
    model = onnx.load(str(path))
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert weights and all(w.min() >= -15 and w.max() <= 15 for w in weights)
    assert _ops(path)["Clip"] >= len(qmodel.plan.layers)
    assert_matches_fake_quant(_call(OnnxDenoiser(path, threads=1), unet_inputs), _call(qmodel, unet_inputs), _call(unet, unet_inputs),
                              fake64=_call(float64_copy(qmodel), unet_inputs))


def test_one_graph_per_timestep_group(calibrated_unet, unet_inputs, tmp_path):
    steps = [TIMESTEPS[0], TIMESTEPS[-1]]  # two groups keep the test short
    unet, qmodel = calibrated_unet(4, 8, timesteps=steps)
    result = export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "steps.onnx", mode="integer")
    assert [p.name for p in result.paths] == ["steps.onnx", "steps.g1.onnx"]
    assert result.timesteps == [[999], [1]]
    index = json.loads(result.sidecar.read_text())
    assert [g["timesteps"] for g in index["graphs"]] == [[999], [1]]
    denoiser = OnnxDenoiser(result.paths[0], threads=1)
    assert [denoiser.session_for(torch.tensor([t, t])) for t in steps] == [0, 1]
    outs = []
    for t in steps:
        got = _call(denoiser, unet_inputs, t=t)
        assert_matches_fake_quant(got, _call(qmodel, unet_inputs, t=t), _call(unet, unet_inputs, t=t),
                              fake64=_call(float64_copy(qmodel), unet_inputs, t=t))
        outs.append(got)
    # the graphs really differ: the t=1 input through the t=999 graph gives another answer
    session = denoiser.sessions[0]
    wrong = session.run(None, {i.name: v for i, v in zip(session.get_inputs(), _feeds(unet_inputs, 1))})[0]
    assert not np.allclose(wrong, outs[1].numpy(), atol=1e-4)


def _feeds(unet_inputs, t):
    (x, ts), kw = unet_inputs(batch=3, t=t, seed=7)
    return [(x * (1 + t / 250)).numpy(), ts.numpy(), kw["class_labels"].numpy()]


def test_catnet_transposed_conv_split_and_linear(calibrated_catnet, tmp_path):
    net, qmodel = calibrated_catnet(weight_bits=8, act_bits=8)
    (x,), _ = catnet_inputs(9, batch=4)
    for mode in ("qdq", "integer"):
        result = export_onnx(qmodel, catnet_inputs(), tmp_path / f"cat_{mode}.onnx", mode=mode)
        onnx.checker.check_model(onnx.load(str(result.paths[0])), full_check=True)
        got = OnnxDenoiser(result.paths[0], threads=1)(x)
        with torch.no_grad():
            assert_matches_fake_quant(got, qmodel(x), net(x), fake64=float64_copy(qmodel)(x.double()))
    assert result.not_integer == {"up": "no ONNX integer operator for ConvTranspose2d"}


def test_layers_left_in_float_by_rules(calibrated_unet, unet_inputs, tmp_path):
    """Float weights / float inputs export as plain float operands; integer mode says which layers."""
    unet, qmodel = calibrated_unet(4, 8, rules=mixed_rules())
    result = export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "rules.onnx", mode="integer")
    assert result.not_integer == MIXED_RULE_REASONS
    got = _call(OnnxDenoiser(result.paths[0], threads=1), unet_inputs)
    assert_matches_fake_quant(got, _call(qmodel, unet_inputs), _call(unet, unet_inputs),
                              fake64=_call(float64_copy(qmodel), unet_inputs))


def test_float_export_matches_the_float_model(calibrated_unet, unet_inputs, tmp_path):
    unet, qmodel = calibrated_unet(8, 8)
    expected = _call(unet, unet_inputs)
    for source in (unet, qmodel):  # a QuantModel is exported with quantization off
        path = export_float_onnx(source, unet_inputs(batch=2), tmp_path / "float.onnx")
        assert "QuantizeLinear" not in _ops(path)
        torch.testing.assert_close(_call(OnnxDenoiser(path, threads=1), unet_inputs), expected, atol=1e-4, rtol=1e-4)


def test_inexpressible_models_give_clear_errors(calibrated_unet, make_unet, unet_inputs, tmp_path):
    _, qmodel = calibrated_unet(8, 8)
    with pytest.raises(ConfigError, match="QuantModel"):
        export_onnx(make_unet(), unet_inputs(batch=2), tmp_path / "a.onnx")
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "a.onnx", opset=11)
    with pytest.raises(ConfigError, match="mode"):
        export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "a.onnx", mode="fp8")
    with pytest.raises(ConfigError, match="example_inputs"):
        export_onnx(qmodel, (torch.zeros(1),), tmp_path / "a.onnx")
    _, learned = calibrated_unet(8, 8)
    q = next(iter(learned.quantizers("act").values()))
    q.zero_point.data += 0.25  # a real-valued (learned) zero point has no integer code: rounded, and said so
    with pytest.warns(UserWarning, match=r"rounded the real-valued zero points of 1 quantizers .*output change"):
        result = export_onnx(learned, unet_inputs(batch=2), tmp_path / "b.onnx")
    assert list(result.preparation.rounded_zero_points.values()) == [pytest.approx(0.25)]
    assert result.preparation.output_change is not None  # measured (here ~0: z only moves the clamp bounds)
    assert json.loads(result.sidecar.read_text())["preparation"]["rounded_zero_points"]
    assert not torch.equal(q.zero_point, torch.round(q.zero_point))  # the caller's model is left alone
    from diffquant.export.codes import act_codes

    with pytest.raises(ExportError, match="real-valued activation zero point"):
        act_codes(q, 0, "input")  # the code-level check that the preparation step answers


@pytest.mark.slow
def test_mnist_resunet_export(tmp_path):
    from diffquant.errors import DiffquantError
    from diffquant.methods.naive import run_naive
    from diffquant.model import quantize
    from diffquant.zoo.registry import load_model

    try:
        bundle = load_model("mnist-resunet")
    except DiffquantError as exc:
        pytest.skip(f"mnist-resunet assets not available: {exc}")
    example = bundle.example_inputs(4)
    qmodel = quantize(bundle.unet, QuantConfig(weight_bits=4, act_bits=8, split=True), example_inputs=example)
    gen = torch.Generator().manual_seed(1)
    run_naive(qmodel, lambda m: [m(torch.randn(4, 1, 28, 28, generator=gen), torch.full((4,), t)) for t in (900, 500, 50)])
    (x, t), _ = example
    with torch.no_grad():
        fake, float_out = qmodel(x, t), bundle.unet(x, t)
        fake64 = float64_copy(qmodel)(x.double(), t)
    for mode in ("qdq", "integer"):
        result = export_onnx(qmodel, example, tmp_path / f"resunet_{mode}.onnx", mode=mode)
        onnx.checker.check_model(onnx.load(str(result.paths[0])), full_check=True)
        got = OnnxDenoiser(result.paths[0], threads=1)(x, t)
        assert_matches_fake_quant(got, fake, float_out, fake64=fake64)


@pytest.mark.parametrize("mode", ["qdq", "integer"])
def test_every_tiny_unet_layer_matches_fake_quant_in_onnxruntime(mode, calibrated_unet, unet_inputs, tmp_path):
    """Teacher-forced: each layer's export module, exported alone and run by onnxruntime on the
    fake-quant layer's own input, gives its output to float rounding (conv_in, time embedding,
    attention projections, shortcut and split convs included)."""
    from diffquant.export.onnx_export import _torch_export, export_model_at_row

    unet, qmodel = calibrated_unet(8, 8)
    captured = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, (i[0].clone(), o.clone())))
             for n, layer in qmodel.layers().items()]
    try:
        _call(qmodel, unet_inputs)
    finally:
        for h in hooks:
            h.remove()
    exported, _ = export_model_at_row(qmodel, 0, mode)
    import onnxruntime as ort

    for name, (inp, out) in captured.items():
        path = tmp_path / f"{name}.onnx"
        _torch_export(exported.get_submodule(name), ((inp,), {}), path, 17)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inp.numpy()})[0])
        torch.testing.assert_close(got, out, rtol=0, atol=2e-6 * float(out.abs().max()), msg=name)


class ReadsBatchSize(nn.Module):
    """A denoiser that turns ``len(x)`` into a Python int (traced as a constant)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, t=None):
        n = len(x)
        return self.conv(x).reshape(n, -1).reshape(n, 3, x.shape[2], x.shape[3])


def test_a_frozen_batch_axis_is_refused_and_a_dynamic_one_runs_at_two_batch_sizes(calibrated_unet, unet_inputs,
                                                                                  tmp_path):
    unet, qmodel = calibrated_unet(8, 8)
    path = export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "u.onnx", mode="integer").paths[0]
    denoiser = OnnxDenoiser(path, threads=1)
    for batch in (1, 5):
        (x, ts), kw = unet_inputs(batch=batch, t=10, seed=3)
        assert denoiser(x, ts, **kw).shape == (batch, 3, 8, 8)
    # a denoiser reading len(x): the trace bakes in batch 2, and the export says so instead of a graph
    # that fails (or silently mixes rows) at another batch size
    torch.manual_seed(0)
    net = ReadsBatchSize().eval()
    x = torch.randn(2, 3, 6, 6)
    frozen = quantize(net, QuantConfig(weight_bits=8, act_bits=8), example_inputs=((x,), {}))
    from diffquant.methods.naive import run_naive

    run_naive(frozen, lambda m: m(x))
    with pytest.raises(ExportError, match="batch axis is frozen at 2"):
        export_onnx(frozen, ((x,), {}), tmp_path / "frozen.onnx")
    with pytest.raises(ExportError, match="batch axis is frozen at 2"):
        export_float_onnx(net, ((x,), {}), tmp_path / "frozen_fp32.onnx")


@pytest.mark.parametrize("bits", [(8, 8), (4, 8)])
def test_fused_mode_runs_convs_as_qlinearconv_and_reports_its_change(bits, calibrated_unet, unet_inputs, tmp_path):
    unet, qmodel = calibrated_unet(*bits)
    calibration = [unet_inputs(batch=2, t=t, seed=s) for t in (10, 600) for s in (1, 2)]
    calibration = [((x * (1 + ts[0].item() / 250), ts), kw) for (x, ts), kw in calibration]
    exact = export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "qdq.onnx", mode="qdq")
    with pytest.warns(UserWarning, match="conv outputs requantized to 8 bits"):
        fused = export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "fused.onnx", mode="fused",
                            calibration=calibration)
    onnx.checker.check_model(onnx.load(str(fused.paths[0])), full_check=True)
    single_input_convs = sum(lp.kind == "Conv2d" and not lp.split for lp in qmodel.plan.layers)
    [report] = fused.requantized
    assert report["layers"] == report["eligible"] == single_input_convs > 0
    assert json.loads(fused.sidecar.read_text())["requantized_outputs"] == fused.requantized
    # onnxruntime fuses every requantized conv; the exact graph keeps float convs
    assert optimized_op_types(fused.paths[0]).get("QLinearConv", 0) == single_input_convs
    assert optimized_op_types(exact.paths[0]).get("QLinearConv", 0) == 0
    # the extra 8-bit rounding of conv outputs: a small change, and the one the export reported
    ref = OnnxDenoiser(exact.paths[0], threads=1)
    got = OnnxDenoiser(fused.paths[0], threads=1)
    (x, ts), kw = calibration[0]
    a, b = got(x, ts, **kw), ref(x, ts, **kw)
    change = float(((a - b).pow(2).mean() / b.pow(2).mean()).sqrt())
    assert 0 < change < 0.1
    assert 0 < report["rel_rms_change"] < 0.1
    fake = _call(qmodel, unet_inputs)
    assert _call(got, unet_inputs).shape == fake.shape  # a dynamic batch still (3 rows here)


def test_fused_mode_options_are_checked(calibrated_unet, unet_inputs, tmp_path):
    _, qmodel = calibrated_unet(8, 8)
    with pytest.raises(ConfigError, match="calibration inputs are for mode='fused'"):
        export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "a.onnx", mode="qdq", calibration=[unet_inputs(batch=2)])
    with pytest.raises(ConfigError, match="at least one"):
        export_onnx(qmodel, unet_inputs(batch=2), tmp_path / "a.onnx", mode="fused", calibration=[])


class _OneBranch(nn.Module):
    """The saturation model with its two branches as one output (ONNX graphs have one output)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        conv, lin = self.net(x)
        return torch.cat([conv.flatten(1), lin], dim=1)


@pytest.mark.parametrize("mode", ["qdq", "integer", "fused"])
def test_int8_weights_that_could_saturate_run_on_exact_kernels(mode, tmp_path):
    """8-bit symmetric weights ±127 against activation codes near 255: onnxruntime's u8×s8 kernels
    saturate their int16 pair sums on x86 CPUs without VNNI (MatMulInteger, MatMulIntegerToFloat,
    QLinearConv). Such weights are stored as uint8 c + 128 (zero point 128), run by exact u8×u8
    kernels everywhere; ConvInteger and float convs keep int8."""
    _, x = saturating_case("symmetric")  # its inputs: 8-bit codes 229..255
    torch.manual_seed(0)
    model = _OneBranch(Saturating().eval())
    qmodel = quantize(model, QuantConfig(weight_bits=8, act_bits=8, weight_grid="symmetric"),
                      example_inputs=((x,), {}))
    run_naive(qmodel, lambda m: m(x))
    assert {lp.name for lp in qmodel.plan.layers} == {"net.conv", "net.lin"}
    if mode == "fused":
        with pytest.warns(UserWarning, match="requantized"):
            result = export_onnx(qmodel, ((x,), {}), tmp_path / "s.onnx", mode=mode, calibration=[((x,), {})])
    else:
        result = export_onnx(qmodel, ((x,), {}), tmp_path / "s.onnx", mode=mode)
    graph = onnx.load(str(result.paths[0])).graph
    codes = {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith(".codes")}
    lin = [w for name, w in codes.items() if ".lin." in name]
    conv = [w for name, w in codes.items() if ".conv." in name]
    assert lin and all(w.dtype == np.uint8 and w.max() == 255 for w in lin)  # 127 + 128
    assert conv and all(w.dtype == (np.uint8 if mode == "fused" else np.int8) for w in conv)
    with torch.no_grad():
        fake = qmodel(x)
    got = OnnxDenoiser(result.paths[0], threads=1)(x)
    conv_part = fake.shape[1] - 3
    # the Linear outputs are exact on every CPU (before: 255·127 pairs clipped at 32767 on AVX2)
    torch.testing.assert_close(got[:, conv_part:], fake[:, conv_part:], rtol=0, atol=1e-5 * float(fake.abs().max()))
    if mode != "fused":  # a fused conv output carries its extra 8-bit rounding
        torch.testing.assert_close(got, fake, rtol=0, atol=1e-5 * float(fake.abs().max()))
