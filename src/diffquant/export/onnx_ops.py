"""Autograd functions whose ONNX symbolics emit exactly the quantization nodes wanted.

Their ``forward`` computes the same values in PyTorch (used while tracing, and equal to the
fake-quant model's); their ``symbolic`` is what ``torch.onnx.export(dynamo=False)`` writes:

- :class:`QuantizeDequantize`: [Clip] → QuantizeLinear → DequantizeLinear (uint8). A b-bit grid
  with b < 8 is a subset of uint8; the Clip to its dequantized bounds in front of QuantizeLinear
  makes the saturation happen at the b-bit bounds (same codes as clamping after rounding).
- :class:`DequantizeWeight`: DequantizeLinear of an int8/uint8 initializer, per channel.
- :class:`QuantizeToUint8`: [Clip] → QuantizeLinear, the input side of an integer operator.
- :class:`ConvInteger` / :class:`MatMulInteger`: the ONNX integer operators (int32 output).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _const(g, value, dtype):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _clip(g, x, lo: float, hi: float):
    return g.op("Clip", x, _const(g, lo, torch.float32), _const(g, hi, torch.float32))


def _codes(x: Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> Tensor:
    """uint8-range codes as floats, with the fake quantizer's operations (x/s, round half even)."""
    s = torch.tensor(scale, dtype=x.dtype)
    return torch.clamp(torch.round(x / s) + zero_point, qmin, qmax)


class QuantizeDequantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, qmin: int, qmax: int):
        s = torch.tensor(scale, dtype=x.dtype)
        return (_codes(x, scale, zero_point, qmin, qmax) - zero_point) * s

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax):
        if (qmin, qmax) != (0, 255):
            x = _clip(g, x, (qmin - zero_point) * scale, (qmax - zero_point) * scale)
        s, z = _const(g, scale, torch.float32), _const(g, zero_point, torch.uint8)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


class QuantizeToUint8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, qmin: int, qmax: int):
        return _codes(x, scale, zero_point, qmin, qmax).to(torch.uint8)

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmin, qmax):
        if (qmin, qmax) != (0, 255):
            x = _clip(g, x, (qmin - zero_point) * scale, (qmax - zero_point) * scale)
        return g.op("QuantizeLinear", x, _const(g, scale, torch.float32), _const(g, zero_point, torch.uint8))


def _channel_view(t: Tensor, dim: int, axis: int) -> Tensor:
    shape = [1] * dim
    shape[axis] = -1
    return t.reshape(shape)


class DequantizeWeight(torch.autograd.Function):
    """(codes − zero_point)·scale per channel along ``axis``; codes and zero_point int8 or uint8."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis: int):
        z = _channel_view(zero_point, codes.dim(), axis).float()
        return (codes.float() - z) * _channel_view(scale, codes.dim(), axis)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


class ConvInteger(torch.autograd.Function):
    """Σ (x − x_zp)·w over 2-D windows, int32 (weights int8 with zero point 0)."""

    @staticmethod
    def forward(ctx, x, weight, x_zero_point: int, stride, padding, dilation, groups: int):
        y = F.conv2d(x.double() - x_zero_point, weight.double(), None, stride, padding, dilation, groups)
        return y.round().to(torch.int32)

    @staticmethod
    def symbolic(g, x, weight, x_zero_point, stride, padding, dilation, groups):
        kernel = weight.type().sizes()[2:]
        return g.op(
            "ConvInteger", x, weight, _const(g, x_zero_point, torch.uint8),
            strides_i=list(stride), pads_i=list(padding) * 2, dilations_i=list(dilation), group_i=groups,
            kernel_shape_i=list(kernel),
        )


class MatMulInteger(torch.autograd.Function):
    """(x − x_zp) @ (w − w_zp), int32; ``weight`` is [in, out], ``w_zero_point`` per column."""

    @staticmethod
    def forward(ctx, x, weight, x_zero_point: int, w_zero_point):
        y = (x.double() - x_zero_point) @ (weight.double() - w_zero_point.double())
        return y.round().to(torch.int32)

    @staticmethod
    def symbolic(g, x, weight, x_zero_point, w_zero_point):
        return g.op("MatMulInteger", x, weight, _const(g, x_zero_point, torch.uint8), w_zero_point)
