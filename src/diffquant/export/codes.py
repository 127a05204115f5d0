"""Integer codes of a quantized model, shared by the packed format, ONNX export and int8 backend.

Weights are read from the layer's *fake-quantized* weight (``QuantLayer.effective_weight()``),
so any recipe that leaves the weight on its quantizers' grids exports exactly:
code = ⌊W_q/s⌉ + z, and (code − z)·s — the very operation the fake quantizer ends with —
reproduces W_q bit for bit. Both are checked; a weight off its grid (soft AdaRound, a recipe
that rescales after quantizing) or a real-valued zero point raises :class:`ExportError`.

Activations: the per-tensor quantizer of one table row becomes an :class:`ActCodes` on the uint8
range. A b-bit grid is a subset of uint8: codes are shifted by ``offset`` (128 for a symmetric
grid, whose codes start at −2^(b−1)), and the b-bit bounds are kept as ``qmin``/``qmax``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DiffquantError


class ExportError(DiffquantError):
    """A quantized model (or one of its recipe features) that an export format cannot express."""


def grid_bounds(bits: Tensor, grid: str) -> tuple[Tensor, Tensor]:
    """Per-channel q_min, q_max (int64) of ``bits`` on ``grid``."""
    bits = bits.to(torch.int64)
    if grid == "symmetric":
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return torch.zeros_like(bits), (1 << bits) - 1


def _channel_shape(dim: int, axis: int, channels: int) -> list[int]:
    shape = [1] * dim
    shape[axis] = channels
    return shape


@dataclass
class WeightCodes:
    """Integer codes of one weight part (a split layer has one per input part).

    ``codes`` are grid codes (int16, the part's shape) in [q_min, q_max] of each output
    channel's bit-width; ``step`` (float32) and ``zero_point`` (int64, integer-valued) are per
    output channel along ``axis``; ``bits`` (uint8) is per channel too, which is how mixed
    per-channel precision is expressed. ``dtype`` is the dtype the fake-quant weight lives in.
    """

    codes: Tensor
    step: Tensor
    zero_point: Tensor
    bits: Tensor
    grid: str
    axis: int
    dtype: torch.dtype = torch.float32

    @property
    def channels(self) -> int:
        return int(self.step.numel())

    @property
    def uniform_bits(self) -> int | None:
        """The common bit-width, or None when channels differ."""
        values = torch.unique(self.bits)
        return int(values[0]) if values.numel() == 1 else None

    def _bcast(self, t: Tensor) -> Tensor:
        return t.reshape(_channel_shape(self.codes.dim(), self.axis, self.channels))

    def dequantize(self) -> Tensor:
        """(code − z)·s in ``dtype``: bit-identical to the fake-quant weight it came from."""
        s = self._bcast(self.step).to(self.dtype)
        z = self._bcast(self.zero_point).to(self.dtype)
        return (self.codes.to(self.dtype) - z) * s

    def centered(self) -> Tensor:
        """code − z (int16): the signed integer each weight is a multiple of s by."""
        return (self.codes.to(torch.int64) - self._bcast(self.zero_point)).to(torch.int16)


def _integer(t: Tensor) -> bool:
    return bool(torch.all(t == torch.round(t)))


def weight_codes_of(weight: Tensor, quantizer, axis: int, what: str) -> WeightCodes:
    """Codes of a fake-quantized ``weight`` on the grid of ``quantizer`` (a UniformQuantizer)."""
    if quantizer.num_steps != 1:
        raise ExportError(f"{what}: per-timestep weight quantizers cannot be exported")
    w = weight.detach()
    s, z = quantizer.params(w.dim(), row=0)
    s, z = s.to(w.dtype), z.to(w.dtype)
    channels = w.shape[axis]
    z_vec = quantizer.zero_point.detach()[0].reshape(-1)
    if not _integer(z_vec):
        raise ExportError(
            f"{what}: real-valued weight zero points (e.g. learned ones) have no integer code; "
            "round them before exporting"
        )
    codes = torch.round(w / s) + z
    if not torch.equal((codes - z) * s, w):
        raise ExportError(
            f"{what}: the fake-quantized weight is not on its quantizer's grid "
            "(soft AdaRound not hardened, or a recipe step applied after quantization)"
        )
    channel_bits = getattr(quantizer, "channel_bits", None)  # MixedBitQuantizer (MPQ-DM OMQ)
    if channel_bits is None:
        bits = torch.full((channels,), quantizer.bits, dtype=torch.uint8)
    else:
        bits = channel_bits.detach().cpu().to(torch.uint8)
    lo, hi = grid_bounds(bits, quantizer.grid)
    shape = _channel_shape(codes.dim(), axis, channels)
    if codes.numel() and (bool((codes < lo.reshape(shape).to(codes)).any()) or bool((codes > hi.reshape(shape).to(codes)).any())):
        raise ExportError(f"{what}: weight codes fall outside their channels' bit-width grids")
    step = quantizer.step.detach()[0].reshape(-1).float()
    zero = z_vec.to(torch.int64)
    if step.numel() == 1 and channels != 1:  # a per-tensor weight quantizer: repeat per channel
        step, zero = step.expand(channels).clone(), zero.expand(channels).clone()
    return WeightCodes(
        codes=codes.to(torch.int16),
        step=step,
        zero_point=zero,
        bits=bits,
        grid=quantizer.grid,
        axis=axis,
        dtype=w.dtype,
    )


def weight_is_quantized(layer) -> bool:
    """Whether every weight part of a QuantLayer is quantized (1–8 bits, weight quant on)."""
    return layer.use_weight_quant and all(q.active for q in layer.weight_quantizers)


@torch.no_grad()
def layer_weight_codes(layer, name: str = "layer") -> list[WeightCodes]:
    """Codes of each weight part of a QuantLayer (one, or two for a split layer)."""
    if not weight_is_quantized(layer):
        raise ExportError(f"{name}: its weight is not quantized")
    if getattr(layer, "input_scale", None) is not None:
        raise ExportError(
            f"{name}: has a learned input-channel scale τ (DMQ LES / SmoothQuant); fold it first "
            "(diffquant.export.fold_input_scales) — an unfolded x/τ has no place in this format"
        )
    w = layer.effective_weight().detach()
    if layer.split is None:
        parts = [w]
    else:
        parts = list(torch.split(w, [layer.split, w.shape[layer.in_axis] - layer.split], dim=layer.in_axis))
    return [
        weight_codes_of(p, q, layer.out_axis, f"{name} (part {i})" if len(parts) > 1 else name)
        for i, (p, q) in enumerate(zip(parts, layer.weight_quantizers))
    ]


@dataclass(frozen=True)
class ActCodes:
    """One per-tensor activation quantizer row on the uint8 range.

    u = clamp(⌊x/s⌉ + z, q_min, q_max) + offset lies in [qmin, qmax] ⊆ [0, 255] (shifted
    bounds) with zero point ``zero_point`` = z + offset; x ≈ (u − zero_point)·s.
    """

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    offset: int
    bits: int
    #: the step as the float32 tensor the fake quantizer divides by
    step: Tensor
    #: per-channel power-of-two step factors m (DMQ PTS), None when all are 1: the grid of channel
    #: c is s·m_c, i.e. x·(1/m_c) on this per-tensor grid and the dequantized value times m_c —
    #: both exact, m_c being a power of two
    channel_multiplier: Tensor | None = None

    @property
    def full_range(self) -> bool:
        """Whether the grid is all of uint8 (no extra clamp needed around QuantizeLinear)."""
        return self.qmin == 0 and self.qmax == 255

    @property
    def float_range(self) -> tuple[float, float]:
        """The dequantized values of the lowest and highest code."""
        return (self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale

    def quantize(self, x: Tensor) -> Tensor:
        """uint8 codes of ``x``: the fake quantizer's exact operations, then the shift."""
        s = self.step.to(x.dtype)
        z = float(self.zero_point - self.offset)
        y = torch.div(x, s).round_().add_(z).clamp_(self.qmin - self.offset, self.qmax - self.offset)
        if self.offset:
            y.add_(self.offset)
        return y.to(torch.uint8)

    def fake_quantize(self, x: Tensor) -> Tensor:
        """The fake-quantized ``x`` (same values as the source quantizer's)."""
        return (self.quantize(x).to(x.dtype) - self.zero_point) * self.step.to(x.dtype)


def input_divisor_of(quantizer) -> Tensor | None:
    """The folded τ of a PTSQuantizer (the deployment form of DMQ's LES), None when there is none.

    Export paths apply it as one elementwise x·(1/τ) right before the per-tensor quantization —
    the same as a per-channel quantize scale s·τ — while the weights already hold W·τ.
    """
    divisor = getattr(quantizer, "input_divisor", None)
    if divisor is None or bool(torch.all(divisor == 1)):
        return None
    return divisor.detach().float().clone()


def scale_channels(x: Tensor, factor: Tensor | None, axis: int) -> Tensor:
    """x times a per-channel ``factor`` along ``axis`` (identity for None)."""
    if factor is None:
        return x
    shape = [1] * x.dim()
    shape[axis] = -1
    return x * factor.reshape(shape).to(x.dtype)


def apply_input_divisor(x: Tensor, divisor: Tensor | None, axis: int) -> Tensor:
    return x if divisor is None else scale_channels(x, 1.0 / divisor, axis)


def act_codes(quantizer, row: int, what: str = "activation", *, allow_channel_multiplier: bool = False) -> ActCodes | None:
    """The uint8 view of one row of an activation quantizer; None when it is not active.

    ``allow_channel_multiplier``: a DMQ PTS row becomes per-tensor codes plus
    :attr:`ActCodes.channel_multiplier` (for formats that apply it around the quantization)."""
    if not quantizer.active:
        return None
    if quantizer.channel_axis is not None:
        raise ExportError(f"{what}: per-channel activation quantizers cannot be exported")
    multiplier = getattr(quantizer, "multiplier", None)
    channel_multiplier = None
    if multiplier is not None and not bool(torch.all(multiplier[row] == 1)):
        m = multiplier[row].detach().float()
        power_of_two = bool(torch.all(torch.frexp(m).mantissa.abs() == 0.5))
        if not (allow_channel_multiplier and power_of_two):
            raise ExportError(
                f"{what}: per-channel power-of-two step factors (DMQ PTS) are not expressible as one "
                "per-tensor QuantizeLinear; export without PTS"
            )
        channel_multiplier = m.clone()
    if not bool(quantizer.initialized[row]):
        raise ExportError(f"{what}: activation quantizer row {row} was never calibrated")
    spec = quantizer.spec
    z = float(quantizer.zero_point.detach()[row].reshape(-1)[0])
    if z != round(z):
        raise ExportError(
            f"{what}: real-valued activation zero point {z:g} (learned, e.g. TALSQ) has no integer code; "
            "round it before exporting"
        )
    offset = -spec.qmin if spec.qmin < 0 else 0
    step = quantizer.step.detach()[row].reshape(-1)[0].float()
    return ActCodes(
        scale=float(step), zero_point=int(round(z)) + offset, qmin=spec.qmin + offset,
        qmax=spec.qmax + offset, offset=offset, bits=spec.bits, step=step.clone(),
        channel_multiplier=channel_multiplier,
    )
