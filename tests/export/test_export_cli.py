"""``diffquant export``: parser, handler, outputs and one-line errors (cli.py wiring is the lead's)."""
from __future__ import annotations

import argparse

import onnx
import onnx.numpy_helper
import pytest
import torch

from diffquant.config import QuantConfig
from diffquant.errors import CheckpointError, ConfigError, DiffquantError
from diffquant.export.export_cli import add_export_parser
from diffquant.export.onnx_runtime import OnnxDenoiser
from diffquant.export.pack import load_packed
from diffquant.methods.naive import run_naive
from diffquant.model import quantize, save


def _parse(argv):
    parser = argparse.ArgumentParser(prog="diffquant")
    add_export_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["export", *argv])


@pytest.fixture(scope="module")
def saved(tmp_path_factory, make_unet, unet_inputs):
    """A tiny UNet as a diffusers folder, and its W4A8 checkpoint from the naive recipe."""
    root = tmp_path_factory.mktemp("cli")
    unet = make_unet()
    unet.save_pretrained(root / "unet")
    qmodel = quantize(unet, QuantConfig(weight_bits=4, act_bits=8, split=True))
    run_naive(qmodel, lambda m: [m(*unet_inputs(batch=2, t=t)[0], **unet_inputs(batch=2, t=t)[1]) for t in (10, 500)])
    save(qmodel, root / "w4a8")
    return root, qmodel


def test_packed_and_onnx_outputs(saved, unet_inputs, capsys):
    root, qmodel = saved
    out = root / "out"
    args = _parse(["--model", str(root / "unet"), "--quantized", str(root / "w4a8"),
                   "--packed", str(out / "w4a8.safetensors"), "--onnx", str(out / "w4a8.onnx"),
                   "--backend", "integer", "--float-onnx", str(out / "fp32.onnx")])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "packed checkpoint" in printed and "onnx (integer)" in printed and "onnx (float)" in printed
    (x, t), kw = unet_inputs(batch=2, t=10, seed=3)
    with torch.no_grad():
        expected = qmodel(x, t, **kw).sample
        assert torch.equal(load_packed(None, out / "w4a8.safetensors")(x, t, **kw).sample, expected)
    onnx.checker.check_model(onnx.load(str(out / "w4a8.onnx")))
    assert OnnxDenoiser(out / "w4a8.onnx", threads=1)(x, t, **kw).shape == expected.shape
    # weights travel as int8 initializers (the graph itself is most of such a tiny file)
    assert _initializer_bytes(out / "w4a8.onnx") < 0.35 * _initializer_bytes(out / "fp32.onnx")


def _initializer_bytes(path) -> int:
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer)


def test_onnx_from_a_packed_file(saved, tmp_path):
    root, qmodel = saved
    packed = tmp_path / "p.safetensors"
    args = _parse(["--model", str(root / "unet"), "--quantized", str(root / "w4a8"), "--packed", str(packed)])
    args.handler(args)
    args = _parse(["--model", str(root / "unet"), "--quantized", str(packed), "--onnx", str(tmp_path / "q.onnx")])
    assert args.handler(args) == 0 and (tmp_path / "q.onnx").is_file()


def test_errors_are_diffquant_errors(saved, tmp_path):
    root, _ = saved
    with pytest.raises(ConfigError, match="nothing to export"):
        args = _parse(["--model", str(root / "unet"), "--quantized", str(root / "w4a8")])
        args.handler(args)
    with pytest.raises(CheckpointError):
        args = _parse(["--model", str(root / "unet"), "--quantized", str(tmp_path / "none"), "--packed", "x"])
        args.handler(args)
    with pytest.raises(DiffquantError, match="model folder not found"):
        args = _parse(["--model", str(tmp_path / "nope"), "--quantized", str(root / "w4a8"), "--packed", "x"])
        args.handler(args)
    with pytest.raises(SystemExit):  # argparse: unknown backend
        _parse(["--quantized", "q", "--onnx", "a.onnx", "--backend", "tensorrt"])


def test_fused_onnx_takes_its_output_ranges_from_float_trajectories(saved, unet_inputs, tmp_path, capsys, monkeypatch):
    root, qmodel = saved
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    args = _parse(["--model", str(root / "unet"), "--quantized", str(root / "w4a8"), "--onnx", str(tmp_path / "f.onnx"),
                   "--backend", "fused", "--calib-samples", "2"])
    with pytest.warns(UserWarning, match="requantized"):
        assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "onnx (fused)" in printed and "conv outputs requantized to 8 bits" in printed
    (x, t), kw = unet_inputs(batch=2, t=10, seed=3)
    with torch.no_grad():
        expected = qmodel(x, t, **kw).sample
    got = OnnxDenoiser(tmp_path / "f.onnx", threads=1)(x, t, **kw)
    assert float((got - expected).pow(2).mean().sqrt()) < 0.1 * float(expected.pow(2).mean().sqrt())
    with pytest.raises(ConfigError, match="--calib-samples"):
        args = _parse(["--model", str(root / "unet"), "--quantized", str(root / "w4a8"), "--onnx", "x.onnx",
                       "--backend", "fused", "--calib-samples", "0"])
        args.handler(args)
