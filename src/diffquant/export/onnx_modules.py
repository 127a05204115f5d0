"""Export-time stand-ins for QuantLayer and QuantAttnProcessor with fixed quantization constants.

Each holds the integer weight codes of one layer and the activation parameters of one timestep
row, and traces to ONNX quantization nodes (:mod:`.onnx_ops`):

- ``qdq``: QuantizeLinear/DequantizeLinear on the input (per tensor, uint8), DequantizeLinear on
  the int8 weight initializer (per output channel), then the float Conv/ConvTranspose/MatMul.
  Linear layers are exported as MatMul + Add (not Gemm) so that onnxruntime fuses them into
  MatMulIntegerToFloat.
- ``integer``: QuantizeLinear on the input, then ConvInteger / MatMulInteger on the codes and one
  float rescale (s_x·s_w per channel) plus the bias — integer kernels in onnxruntime for every
  quantized Conv2d and Linear. Other kinds (ConvTranspose2d, Conv1d) use ``qdq``.
- ``fused``: ``qdq`` plus an 8-bit Q/DQ pair on the output of every quantized single-input Conv2d
  and its bias as int32 codes on the s_x·s_w grid — the DQ → Conv → Q pattern that onnxruntime
  fuses into QLinearConv (a conv whose output is not quantized runs in float there). The output
  ranges are calibrated at export (:func:`~.onnx_export.export_onnx`); the extra rounding per conv
  output is not in the fake-quant model, so this mode trades exactness for speed and the export
  measures and reports the change. Linear layers need no output Q: onnxruntime already fuses
  their DQ → MatMul into MatMulIntegerToFloat.

Weights: the codes centred on their zero point, q − z, fit int8 (zero point 0) for every grid up
to 7 bits and for symmetric 8-bit grids. A 4-bit grid thus becomes int8 codes in −15…15
(asymmetric; −8…7 symmetric): a restricted subset of the int8 range, run by the runtime's int8
kernels and stored one code per byte (dense sub-byte storage is the packed checkpoint's job).
Activations likewise: a b-bit grid is a subset of uint8, enforced by a Clip (see :mod:`.onnx_ops`). 8-bit asymmetric weights need 9 bits there: ``qdq``
stores q as uint8 with the per-channel zero point; ``integer`` stores q − 128 as int8 and adds
(128 − z)·Σ(x − x_zp) over each window, from a one-channel ConvInteger with an all-ones kernel
(MatMulInteger takes the per-column uint8 zero point directly).
Where a u8×s8 kernel would run a part whose int8 codes exceed ±64 (Linear layers; convs in
``fused`` mode), the part is stored as uint8 c + 128 with zero point 128 instead: onnxruntime's
u8×s8 kernels saturate int16 pair sums on CPUs without VNNI, its u8×u8 ones do not
(:data:`SATURATION_FREE_INT8`, docs/deploy.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.attention import QuantAttnProcessor
from ..nn.layers import QuantLayer
from .codes import (
    ActCodes, ExportError, WeightCodes, act_codes, apply_input_divisor, input_divisor_of, layer_weight_codes,
    scale_channels, weight_is_quantized,
)
from .onnx_ops import ConvInteger, DequantizeWeight, MatMulInteger, QuantizeDequantize, QuantizeToUint8

MODES = ("qdq", "integer", "fused")
INTEGER_KINDS = ("Conv2d", "Linear")
INT32_LIMIT = 2**31 - 1
#: the largest |int8 weight| whose products with any uint8 activation pair-sum within int16
#: (2·255·64 ≤ 32767): onnxruntime's u8×s8 kernels on x86 CPUs without VNNI (AVX2) saturate
#: beyond it, e.g. 255·127 + 255·127 → 32767 (MatMulInteger, MatMulIntegerToFloat, QLinearConv)
SATURATION_FREE_INT8 = 64


def uint8_range_codes(lo: float, hi: float) -> ActCodes:
    """Asymmetric uint8 codes covering [min(lo, 0), max(hi, 0)] (a requantized layer output)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, torch.finfo(torch.float32).tiny)
    zero = int(min(255, max(0, round(-lo / scale))))
    step = torch.tensor(scale, dtype=torch.float32)
    return ActCodes(scale=float(step), zero_point=zero, qmin=0, qmax=255, offset=0, bits=8, step=step)


def check_onnx_act(act: ActCodes | None, what: str) -> ActCodes | None:
    if act is not None and not 0 <= act.zero_point <= 255:
        raise ExportError(f"{what}: activation zero point {act.zero_point} is outside uint8 (unclamped zero point)")
    return act


def qdq(x: Tensor, act: ActCodes | None) -> Tensor:
    if act is None:
        return x
    return QuantizeDequantize.apply(x, act.scale, act.zero_point, act.qmin, act.qmax)


class _WeightPart(nn.Module):
    """One weight part as integer codes: int8 centred codes, or uint8 codes + zero points.

    ``wide_int8``: whether int8 codes beyond ±:data:`SATURATION_FREE_INT8` may be stored (the layer
    is not run by a u8×s8 kernel: ConvInteger and float convs are exact with them); otherwise such
    codes are stored as uint8 c + 128 with zero point 128 — the same values, run by onnxruntime's
    exact u8×u8 kernels on every CPU.
    """

    def __init__(self, wc: WeightCodes, transpose: bool, wide_int8: bool = True):
        super().__init__()
        centered = wc.centered().to(torch.int64)
        self.axis = wc.axis
        self.fits_int8 = bool(centered.min() >= -128 and centered.max() <= 127) if centered.numel() else True
        span = int(centered.abs().max()) if centered.numel() else 0
        if self.fits_int8 and (wide_int8 or span <= SATURATION_FREE_INT8):
            codes, zero = centered.to(torch.int8), torch.zeros(wc.channels, dtype=torch.int8)
        elif self.fits_int8:  # c + 128 ∈ [0, 255]
            codes, zero = (centered + 128).to(torch.uint8), torch.full((wc.channels,), 128, dtype=torch.uint8)
        else:
            if wc.zero_point.min() < 0 or wc.zero_point.max() > 255:
                raise ExportError("8-bit weight zero points outside uint8 cannot be exported")
            codes, zero = wc.codes.to(torch.uint8), wc.zero_point.to(torch.uint8)
        if transpose:  # Linear: [out, in] -> [in, out], channels on axis 1
            codes, self.axis = codes.t(), 1
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", wc.step.float().clone())
        self.register_buffer("zero_point", zero)
        self.register_buffer("q_zero_point", wc.zero_point.clone())

    def dequantize(self) -> Tensor:
        return DequantizeWeight.apply(self.codes, self.scale, self.zero_point, self.axis)


class OnnxQuantLayer(nn.Module):
    """A QuantLayer frozen at one timestep row, exported as ``qdq`` or ``integer`` nodes."""

    def __init__(self, layer: QuantLayer, row: int, mode: str, name: str = "layer"):
        super().__init__()
        if mode not in MODES:
            raise ExportError(f"unknown ONNX mode {mode!r}; choose one of {', '.join(MODES)}")
        self.kind = layer.kind
        self.op_args = dict(layer.op_args)
        self.split = layer.split
        self.act_axis = layer.act_axis
        self.in_axis = layer.in_axis
        bias = None if layer.bias is None else layer.bias.detach().float().clone()
        self.register_buffer("bias", bias)
        parts = 1 if layer.split is None else 2
        self.acts: list[ActCodes | None] = [None] * parts
        #: folded τ per input part (DMQ LES), applied as x·(1/τ) before quantizing
        self.divisors: list[Tensor | None] = [None] * parts
        if layer.use_act_quant:
            # PTS factors: exported on conv inputs (the shortcut convs DMQ puts them on); on other
            # layers their graphs were found not to reproduce the fake-quant model, so they are refused
            pts_ok = layer.kind in ("Conv1d", "Conv2d") and layer.act_axis == 1
            self.acts = [check_onnx_act(act_codes(q, row, f"{name} input", allow_channel_multiplier=pts_ok), f"{name} input")
                         for q in layer.act_quantizers]
            self.divisors = [input_divisor_of(q) if a is not None else None for q, a in zip(layer.act_quantizers, self.acts)]
        self.weight_parts = nn.ModuleList()
        self.register_buffer("float_weight", None)
        if weight_is_quantized(layer):
            for wc in layer_weight_codes(layer, name):
                # Linear layers run on u8×s8 MatMul kernels, and so do fused convs (QLinearConv)
                wide = self.kind != "Linear" and mode != "fused"
                self.weight_parts.append(_WeightPart(wc, transpose=self.kind == "Linear", wide_int8=wide))
        else:
            self.float_weight = layer.weight.detach().float().clone()
        self.mode = mode
        #: ``fused`` mode: the 8-bit codes of this layer's output (set by :meth:`requantize_output`)
        self.output_act: ActCodes | None = None
        self.register_buffer("bias_codes", None)
        self.register_buffer("bias_scale", None)
        #: why this layer does not run on an integer operator (None when it does)
        self.integer_blocker = self._integer_blocker(mode)
        if self.integer_blocker is None:
            self._prepare_integer()

    def _integer_blocker(self, mode: str) -> str | None:
        if mode != "integer":
            return f"{mode} mode"
        if self.kind not in INTEGER_KINDS:
            return f"no ONNX integer operator for {self.kind}"
        if self.float_weight is not None:
            return "weight not quantized"
        if any(a is None for a in self.acts):
            return "input not quantized"
        if any(a.channel_multiplier is not None for a in self.acts):
            return "per-channel power-of-two input steps (DMQ PTS) run as Q/DQ"
        if self.kind == "Conv2d" and self.op_args.get("groups", 1) != 1 and not all(p.fits_int8 for p in self.weight_parts):
            return "grouped conv with 8-bit asymmetric weights"
        if self.kind == "Conv2d" and isinstance(self.op_args.get("padding"), str):
            return "string padding"
        return None

    @property
    def output_fusable(self) -> bool:
        """Whether ``fused`` mode quantizes this layer's output (one DQ-fed Conv2d, see module docstring)."""
        return (self.mode == "fused" and self.kind == "Conv2d" and self.split is None and self.float_weight is None
                and self.acts[0] is not None and self.acts[0].channel_multiplier is None
                and not isinstance(self.op_args.get("padding"), str))

    def requantize_output(self, lo: float, hi: float) -> bool:
        """Quantize the output to uint8 over [lo, hi] and the bias to int32 on the s_x·s_w grid;
        False (nothing changed) where the bias codes would not fit int32."""
        if not self.output_fusable:
            raise ExportError("requantize_output() needs a single-input quantized Conv2d in fused mode")
        if self.bias is not None:
            step = (self.weight_parts[0].scale.double() * self.acts[0].scale).float()
            codes = torch.round(self.bias.double() / step.double())
            if not bool(codes.abs().max() <= INT32_LIMIT):
                return False
            self.bias_codes = codes.to(torch.int32)
            self.bias_scale = step
        self.output_act = uint8_range_codes(lo, hi)
        return True

    def _bias(self) -> Tensor | None:
        if self.bias_codes is None:
            return self.bias
        return DequantizeWeight.apply(self.bias_codes, self.bias_scale, torch.zeros_like(self.bias_codes), 0)

    def _prepare_integer(self) -> None:
        channel_dims = 4 if self.kind == "Conv2d" else 1
        for part, act in zip(self.weight_parts, self.acts):
            rescale = part.scale.double() * act.scale
            shape = [1, -1, 1, 1] if channel_dims == 4 else [-1]
            part.register_buffer("rescale", rescale.float().reshape(shape))
            if self.kind == "Conv2d" and not part.fits_int8:
                # q − 128 as int8, plus (128 − z)·Σ(x − x_zp) per window (module docstring)
                part.codes = (part.codes.to(torch.int16) - 128).to(torch.int8)
                part.zero_point = torch.zeros_like(part.zero_point, dtype=torch.int8)
                part.register_buffer("correction", (128 - part.q_zero_point).to(torch.int32).reshape(1, -1, 1, 1))
                ones = torch.ones(1, *part.codes.shape[1:], dtype=torch.int8)
                part.register_buffer("ones", ones)

    # ------------------------------------------------------------------ forward
    def _inputs(self, x: Tensor) -> list[Tensor]:
        xs = [x] if self.split is None else list(
            torch.split(x, [self.split, x.shape[self.act_axis] - self.split], dim=self.act_axis))
        xs = [apply_input_divisor(xp, d, self.act_axis) for xp, d in zip(xs, self.divisors)]
        # PTS: x·(1/m) onto the per-tensor grid (exact: m is a power of two)
        return [xp if a is None else apply_input_divisor(xp, a.channel_multiplier, self.act_axis)
                for xp, a in zip(xs, self.acts)]

    def _channel_factor(self, x: Tensor, act: ActCodes | None) -> Tensor:
        """The dequantized PTS input times m (exact: m is a power of two)."""
        return x if act is None else scale_channels(x, act.channel_multiplier, self.act_axis)

    def _weight(self) -> Tensor:
        if self.float_weight is not None:
            return self.float_weight
        parts = [p.dequantize() for p in self.weight_parts]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=0 if self.kind == "Linear" else self.in_axis)  # Linear parts are [in, out]

    def forward(self, x: Tensor) -> Tensor:
        xs = self._inputs(x)
        if self.integer_blocker is None:
            return self._integer_forward(xs)
        xs = [self._channel_factor(qdq(xp, act), act) for xp, act in zip(xs, self.acts)]
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=self.act_axis)
        w = self._weight()
        if self.kind == "Linear":
            if self.float_weight is not None:
                w = w.t()
            y = torch.matmul(x, w)
            return y if self.bias is None else y + self.bias
        if self.kind == "Conv2d":
            return qdq(F.conv2d(x, w, self._bias(), **self.op_args), self.output_act)
        if self.kind == "Conv1d":
            return F.conv1d(x, w, self.bias, **self.op_args)
        return F.conv_transpose2d(x, w, self.bias, **self.op_args)

    def _integer_forward(self, xs: list[Tensor]) -> Tensor:
        out = None
        for xp, part, act in zip(xs, self.weight_parts, self.acts):
            xq = QuantizeToUint8.apply(xp, act.scale, act.zero_point, act.qmin, act.qmax)
            if self.kind == "Linear":
                acc = MatMulInteger.apply(xq, part.codes, act.zero_point, part.zero_point)
            else:
                a = self.op_args
                conv = (a["stride"], a["padding"], a["dilation"], a["groups"])
                acc = ConvInteger.apply(xq, part.codes, act.zero_point, *conv)
                if hasattr(part, "correction"):
                    acc = acc + part.correction * ConvInteger.apply(xq, part.ones, act.zero_point, *conv)
            y = acc.float() * part.rescale
            out = y if out is None else out + y
        if self.bias is not None:
            out = out + (self.bias if self.kind == "Linear" else self.bias.reshape(1, -1, 1, 1))
        return out


class OnnxAttnProcessor(nn.Module):
    """QuantAttnProcessor at one timestep row: q, k, v and the softmax output get Q/DQ pairs,
    scores and softmax in fp32, as in :class:`~diffquant.nn.attention.QuantAttnProcessor`."""

    def __init__(self, processor: QuantAttnProcessor, row: int, name: str = "attention"):
        super().__init__()
        quantizers = processor.quantizers()
        use = processor.use_act_quant
        self.acts = {k: check_onnx_act(act_codes(q, row, f"{name}.{k}"), f"{name}.{k}") if use else None
                     for k, q in quantizers.items()}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        query = qdq(query, self.acts["q"])
        key = qdq(key, self.acts["k"])
        value = qdq(attn.head_to_batch_dim(value), self.acts["v"])
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        probs = qdq(scores.softmax(dim=-1), self.acts["probs"]).to(value.dtype)
        hidden_states = torch.matmul(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
