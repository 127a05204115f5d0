"""Quantized Conv1d / Conv2d / ConvTranspose2d / Linear layers.

A :class:`QuantLayer` replaces one float layer. It keeps the float layer's own ``weight`` and
``bias`` Parameters (the same tensor objects, under the same names) and adds

- a per-output-channel weight quantizer and a per-tensor input-activation quantizer, or
- for a *split* layer (its input is a channel concatenation, docs/methods.md §1.9) one activation
  quantizer per input part and one weight quantizer per matching input-channel slice:
  Q(X)Q(W) = Q₁(X₁)Q₁′(W₁) + Q₂(X₂)Q₂′(W₂).

All quantizers are created here, at wrap time. While nothing is being learned the fake-quantized
weight is cached and reused, so sampling does not re-quantize weights on every call. The cache is
keyed on the identity, storage and autograd version of every tensor it depends on (an optimizer
step, ``load_state_dict`` or any in-place op under ``no_grad`` bumps the version) and on a copy of
the weight quantizers' small step / zero-point tensors, because writes through ``.data`` (as in
``UniformQuantizer.set_range``) do not bump versions. A write through ``layer.weight.data`` is the
one change it cannot see: call :meth:`QuantLayer.clear_cache` after one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..quant.quantizer import UniformQuantizer
from ..registry import Registry


class LayerKind:
    """One quantizable float layer type: how its call is made from a (fake-quantized) weight, its
    axes and the call arguments it keeps. Registered in :data:`LAYER_KINDS` under the type name."""

    module_type: type[nn.Module]
    #: the functional op, ``op(x, weight, bias, **op_args)``
    op = staticmethod(F.linear)
    #: weight axes of output / input channels, activation channel axis
    out_axis, in_axis, act_axis = 0, 1, 1
    #: the weight holds in_channels / groups input channels (convolutions; not the transposed one,
    #: whose weight is [in, out / groups])
    grouped = False

    @staticmethod
    def op_args(module: nn.Module) -> dict:
        return {}


class _Conv(LayerKind):
    grouped = True

    @staticmethod
    def op_args(module: nn.Module) -> dict:
        if getattr(module, "padding_mode", "zeros") != "zeros":
            raise ConfigError(f"padding_mode={module.padding_mode!r} is not supported")
        return dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)


#: every float layer type diffquant quantizes, by type name
LAYER_KINDS: Registry = Registry("layer kind")


@LAYER_KINDS.register("Linear")
class LinearKind(LayerKind):
    module_type = nn.Linear
    op = staticmethod(F.linear)
    act_axis = -1


@LAYER_KINDS.register("Conv1d")
class Conv1dKind(_Conv):
    module_type = nn.Conv1d
    op = staticmethod(F.conv1d)


@LAYER_KINDS.register("Conv2d")
class Conv2dKind(_Conv):
    module_type = nn.Conv2d
    op = staticmethod(F.conv2d)


@LAYER_KINDS.register("ConvTranspose2d")
class ConvTranspose2dKind(_Conv):
    module_type = nn.ConvTranspose2d
    op = staticmethod(F.conv_transpose2d)
    out_axis, in_axis = 1, 0
    grouped = False

    @staticmethod
    def op_args(module: nn.Module) -> dict:
        return {**_Conv.op_args(module), "output_padding": module.output_padding}


#: the registered float layer types (isinstance checks everywhere)
SUPPORTED = tuple(kind.module_type for _, kind in LAYER_KINDS.items())


@dataclass
class QuantizerSpec:
    """Everything needed to build one quantizer (channels and axis are filled in per layer)."""

    bits: int = 8
    grid: str = "asymmetric"
    per_channel: bool = False
    init: str = "minmax"
    num_steps: int = 1
    include_zero: bool = True
    clamp_zero_point: bool = True
    momentum: float | None = None
    init_options: dict = field(default_factory=dict)

    def build(self, channel_axis: int | None = None, channels: int = 1) -> UniformQuantizer:
        axis = channel_axis if self.per_channel else None
        return UniformQuantizer(
            bits=self.bits,
            grid=self.grid,
            channel_axis=axis,
            channels=channels if self.per_channel else 1,
            init=self.init,
            num_steps=self.num_steps,
            include_zero=self.include_zero,
            clamp_zero_point=self.clamp_zero_point,
            momentum=self.momentum,
            init_options=self.init_options,
        )


def _needs_module_call(q: nn.Module, x: Tensor) -> bool:
    """Whether ``q(x)`` must run as a module call: anything but plain inference of the base class
    (a subclass or other module, autograd needs the graph, observing, QDrop, hooks, tracing)."""
    return (
        type(q) is not UniformQuantizer
        or q.mode != "quantize"
        or (q.training and q.qdrop_prob < 1.0)
        or (torch.is_grad_enabled() and (x.requires_grad or q.step.requires_grad or q.zero_point.requires_grad))
        or bool(q._forward_hooks or q._forward_pre_hooks)
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


def quantize_activation(q: nn.Module, x: Tensor) -> Tensor:
    """``q(x)`` for activations, bit-identical, but at inference computed in place on one new
    tensor: the autograd-friendly formula allocates a fresh tensor for each of its eight
    elementwise steps, which made activation quantization cost as much as the convolutions
    (benchmarks/bench_wrap_overhead.py). Same operations in the same order as
    ``fake_quantize``; STE rounding equals plain rounding in value. Every other case (see
    :func:`_needs_module_call`) calls the quantizer module itself."""
    if _needs_module_call(q, x):
        return q(x)
    if not q.active:
        return x
    k = q.row()
    if not bool(q.initialized[k]):
        return q(x)  # raises the quantizer's own "not initialised" error
    s, z = q.params(x.dim(), k)
    s, z = s.to(x.dtype), z.to(x.dtype)
    spec = q.spec
    y = torch.div(x, s).round_()
    if x.device.type == "cpu" and z.dim() == 0:
        z_value = float(z)
        if z_value.is_integer():
            # integers add exactly, so clamp(r + z, lo, hi) − z = clamp(r, lo − z, hi − z)
            return y.clamp_(spec.qmin - z_value, spec.qmax - z_value).mul_(s)
    return y.add_(z).clamp_(spec.qmin, spec.qmax).sub_(z).mul_(s)


def _version(t: Tensor) -> int:
    """Autograd version counter; inference tensors have none (they change only in inference mode)."""
    return -1 if t.is_inference() else t._version


def layer_kind(module: nn.Module) -> str:
    """The registered kind of ``module``'s exact type (a subclass is not assumed to compute the same)."""
    for name, kind in LAYER_KINDS.items():
        if type(module) is kind.module_type:
            return name
    raise ConfigError(f"cannot quantize a {type(module).__name__}")


class QuantLayer(nn.Module):
    """A quantized stand-in for one Conv1d/Conv2d/ConvTranspose2d/Linear."""

    def __init__(
        self,
        module: nn.Module,
        weight_spec: QuantizerSpec,
        act_spec: QuantizerSpec,
        split: int | None = None,
    ):
        super().__init__()
        self.kind = layer_kind(module)
        kind = LAYER_KINDS.get(self.kind)
        self._op = kind.op
        self.weight = module.weight
        self.bias = module.bias
        self.op_args: dict = kind.op_args(module)
        #: weight axis of output channels (per-channel quantization) and of input channels (split)
        self.out_axis, self.in_axis = kind.out_axis, kind.in_axis
        #: activation axis along which a concatenated input is split
        self.act_axis = kind.act_axis
        in_channels = self.weight.shape[self.in_axis] * (self.op_args.get("groups", 1) if kind.grouped else 1)
        if split is not None:
            if self.op_args.get("groups", 1) != 1:
                raise ConfigError("split quantization needs groups=1")
            if not 0 < split < in_channels:
                raise ConfigError(f"split point {split} outside 1..{in_channels - 1}")
        self.split = split
        self.in_channels = in_channels
        out_channels = self.weight.shape[self.out_axis]
        parts = 1 if split is None else 2
        self.weight_quantizers = nn.ModuleList(
            weight_spec.build(self.out_axis, out_channels) for _ in range(parts)
        )
        self.act_quantizers = nn.ModuleList(act_spec.build(None, 1) for _ in range(parts))
        #: optional learned rounding per weight part (AdaRound), attached by a recipe
        self.adaround: nn.ModuleList | None = None
        #: optional per-input-channel equivalent scale τ (DMQ's LES, MPQ-DM's SmoothQuant):
        #: the layer computes Q(x/τ)·Q(W·τ); attached by :func:`attach_input_scale`
        self.input_scale: nn.Parameter | None = None
        #: optional low-rank weight update (QALoRA): W' = W + ΔW before scaling and quantizing
        self.weight_delta: nn.Module | None = None
        self.use_weight_quant = True
        self.use_act_quant = True
        self._cache_key: tuple | None = None
        self._cache: Tensor | None = None
        #: copies of the weight quantizers' step / zero point when the cache was filled
        self._cache_qparams: list[Tensor] = []

    # ------------------------------------------------------------------ weight side
    def base_weight(self) -> Tensor:
        """The float weight the quantizers see: (W + ΔW)·τ, or W itself without extensions."""
        w = self.weight
        if self.weight_delta is not None:
            w = w + self.weight_delta()
        if self.input_scale is not None:
            shape = [1] * w.dim()
            shape[self.in_axis] = -1
            w = w * self.input_scale.reshape(shape)
        return w

    def scale_input(self, x: Tensor) -> Tensor:
        """x/τ along the activation's channel axis (identity without τ)."""
        if self.input_scale is None:
            return x
        shape = [1] * x.dim()
        shape[self.act_axis] = -1
        return x / self.input_scale.reshape(shape).to(x.dtype)

    def weight_parts(self) -> list[Tensor]:
        w = self.base_weight()
        if self.split is None:
            return [w]
        return list(torch.split(w, [self.split, w.shape[self.in_axis] - self.split], dim=self.in_axis))

    def _dependencies(self) -> list[Tensor]:
        deps = [self.weight]
        if self.input_scale is not None:
            deps.append(self.input_scale)
        if self.weight_delta is not None:
            deps += list(self.weight_delta.parameters())
        for q in self.weight_quantizers:
            deps += [q.step, q.zero_point]
        if self.adaround is not None:
            for r in self.adaround:
                deps += list(r.parameters()) + list(r.buffers())
        return deps

    def _quantized_weight(self) -> Tensor:
        parts = []
        for i, (w, q) in enumerate(zip(self.weight_parts(), self.weight_quantizers)):
            if not q.active:
                parts.append(w)
            elif self.adaround is not None:
                parts.append(self.adaround[i](w, q))
            else:
                parts.append(q(w))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.in_axis)

    def _qparams(self) -> list[Tensor]:
        return [t for q in self.weight_quantizers for t in (q.step, q.zero_point)]

    def _qparams_unchanged(self) -> bool:
        current = self._qparams()
        return len(current) == len(self._cache_qparams) and all(
            torch.equal(a, b) for a, b in zip(current, self._cache_qparams)
        )

    def effective_weight(self) -> Tensor:
        """The (fake-quantized) weight used by forward; cached while nothing is learned."""
        if not self.use_weight_quant or not any(q.active for q in self.weight_quantizers):
            # nothing to quantize (and caching the Parameter itself would register it)
            return self.base_weight()
        deps = self._dependencies()
        learning = torch.is_grad_enabled() and any(t.requires_grad for t in deps)
        if learning or any(q.mode == "observe" for q in self.weight_quantizers):
            self.clear_cache()
            return self._quantized_weight()
        key = (
            tuple((id(t), _version(t), t.data_ptr(), t.device, t.dtype) for t in deps),
            tuple((q.enabled, q.bits, q.mode) for q in self.weight_quantizers),
            None if self.adaround is None else tuple(r.mode for r in self.adaround),
            # a tensor made in inference mode cannot be used where autograd records
            torch.is_inference_mode_enabled(),
        )
        if self._cache is None or key != self._cache_key or not self._qparams_unchanged():
            with torch.no_grad():
                self._cache = self._quantized_weight()
                self._cache_qparams = [t.detach().clone() for t in self._qparams()]
            self._cache_key = key
        return self._cache

    # ------------------------------------------------------------------ activation side
    def quantize_input(self, x: Tensor) -> Tensor:
        if not self.use_act_quant:
            return x
        if self.split is None:
            return quantize_activation(self.act_quantizers[0], x)
        size = x.shape[self.act_axis]
        x1, x2 = torch.split(x, [self.split, size - self.split], dim=self.act_axis)
        q1, q2 = self.act_quantizers
        return torch.cat([quantize_activation(q1, x1), quantize_activation(q2, x2)], dim=self.act_axis)

    def forward(self, x: Tensor) -> Tensor:
        x = self.quantize_input(self.scale_input(x))
        w = self.effective_weight()
        return self._op(x, w, self.bias, **self.op_args)

    def clear_cache(self) -> None:
        self._cache = self._cache_key = None
        self._cache_qparams = []

    def extra_repr(self) -> str:
        split = f", split={self.split}" if self.split is not None else ""
        tau = ", input_scale" if self.input_scale is not None else ""
        return f"{self.kind}, weight={tuple(self.weight.shape)}{split}{tau}"


def attach_adaround(layer: QuantLayer, modes: list[str] | None = None) -> nn.ModuleList:
    """Give every weight part of ``layer`` a learned-rounding module (AdaRound, docs/methods.md §1.3)."""
    from ..quant.adaround import AdaRound

    device = layer.weight.device
    layer.adaround = nn.ModuleList(AdaRound(tuple(w.shape)).to(device) for w in layer.weight_parts())
    if modes is not None:
        for module, mode in zip(layer.adaround, modes):
            module.mode = mode
    layer.clear_cache()
    return layer.adaround


def attach_input_scale(layer: QuantLayer, init: Tensor | None = None) -> nn.Parameter:
    """Give ``layer`` a per-input-channel scale τ (ones unless ``init``); the layer then computes
    Q(x/τ)·Q(W·τ), which equals the float layer for any τ when quantization is off."""
    if layer.op_args.get("groups", 1) != 1:
        raise ConfigError("an input-channel scale needs groups=1")
    device = layer.weight.device
    tau = torch.ones(layer.in_channels, device=device) if init is None else init.detach().reshape(-1).to(device).float().clone()
    if tau.numel() != layer.in_channels:
        raise ConfigError(f"input scale needs {layer.in_channels} values, got {tau.numel()}")
    layer.input_scale = nn.Parameter(tau, requires_grad=False)
    layer.clear_cache()
    return layer.input_scale


def attach_lora(layer: QuantLayer, rank: int) -> nn.Module:
    """Give ``layer`` a low-rank weight update ΔW = B·A with B = 0 (so the layer is unchanged)."""
    from .lora import LoRADelta

    layer.weight_delta = LoRADelta(tuple(layer.weight.shape), rank, device=layer.weight.device)
    layer.weight_delta.requires_grad_(False)
    layer.clear_cache()
    return layer.weight_delta
