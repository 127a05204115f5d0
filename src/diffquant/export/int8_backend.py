"""Native PyTorch integer inference on CPU: QuantLayers replaced by int8 kernels.

Kernels: PyTorch's x86 oneDNN quantized ops ``torch.ops.onednn.qconv1d_pointwise`` /
``qconv2d_pointwise`` / ``qlinear_pointwise`` with prepacked int8 weights (``qconv_prepack``,
``qlinear_prepack``), uint8 activations with a per-tensor scale and zero point, per-channel
weight scales, and **fp32 output** (no requantization) — so the result differs from the
fake-quant model only by float rounding in the accumulation and rescale. (``torch._int_mm`` is
slower than fp32 matmul on CPU and ``quantized::conv2d`` requantizes its output to uint8, so
neither is used.)

Integer mapping (:mod:`.codes`): the activation codes of one timestep row, shifted onto uint8; the
weight codes centred on their zero point, q − z, as int8 with zero point 0 (oneDNN ignores weight
zero points). 8-bit asymmetric weights do not fit int8 that way: q − 128 is used instead and
(128 − z)·s_w·s_x·Σ(x_q − z_x) over each window is added (a one-channel int8 conv with an
all-ones kernel, or a row sum for Linear).

Exact products on every x86 CPU: with VNNI (``vpdpbusd``) or AMX, oneDNN accumulates u8×s8
products straight into int32. Without them (AVX2-only CPUs, AVX-512 without VNNI) its kernels
multiply adjacent u8×s8 pairs into a *saturating* int16 sum (``vpmaddubsw``), so 8-bit activation
codes near 255 with weight codes near ±127 overflow (2·255·127 > 32767) and the output is
silently wrong. :func:`int8_products_saturate` probes the kernels once per process; on such a CPU
every layer whose worst-case pair could overflow feeds its codes in two parts, u = min(u, 127) +
(u − min(u, 127)), both exact (2·127·128 and 2·128·128 fit int16), and adds the two fp32 outputs —
the same integers, at twice the kernel work for those layers only (:attr:`Int8Report.split_products`).
No quantization grid changes. ``to_int8(..., saturating=True)`` forces this path on any CPU; setting
``ONEDNN_MAX_CPU_ISA=AVX2`` before the process starts makes oneDNN itself use its AVX2 kernels.

Kept on the fake-quant path (reported by :attr:`Int8Report.fake_quant`): ConvTranspose2d (no
oneDNN kernel exposed), layers whose input or weight is not quantized (or wider than 8 bits),
real-valued zero points, and the attention act-to-act matmuls.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DiffquantError
from ..model.qmodel import QuantModel
from ..nn.layers import QuantLayer
from .codes import (
    ActCodes, ExportError, WeightCodes, act_codes, apply_input_divisor, input_divisor_of, layer_weight_codes,
    weight_is_quantized,
)
from .prepare import ExportPreparation, prepare_for_export

INT8_KINDS = ("Conv1d", "Conv2d", "Linear")
#: the largest |a1·w1 + a2·w2| a saturating int16 pair sum holds exactly
INT16_MAX = 32767


@dataclass
class Int8Report:
    """Which layers run on int8 kernels, and why the others do not."""

    int8: list[str] = field(default_factory=list)
    fake_quant: dict[str, str] = field(default_factory=dict)
    #: whether the kernels were treated as saturating int16 pair sums (no VNNI/AMX)
    saturating: bool = False
    #: int8 layers whose activation codes are fed in two parts to keep the products exact
    split_products: list[str] = field(default_factory=list)
    #: what was done to the recipe's result first (LoRA merged, τ folded, zero points rounded)
    preparation: ExportPreparation | None = None

    def summary(self) -> str:
        lines = [f"{len(self.int8)} layers on int8 kernels, {len(self.fake_quant)} on the fake-quant path"]
        if self.preparation is not None and self.preparation.summary() != "nothing to change":
            lines.append(f"prepared for export: {self.preparation.summary()}")
        if self.saturating:
            lines.append(f"kernels without VNNI/AMX: {len(self.split_products)} layers take two exact "
                         "kernel calls (activation codes split at 127)")
        lines += [f"  {name}: {why}" for name, why in self.fake_quant.items()]
        return "\n".join(lines)


def _onednn():
    return torch.ops.onednn


def int8_kernels_available() -> bool:
    """Whether this PyTorch build runs the oneDNN int8 conv/linear kernels on this CPU."""
    try:
        w = torch.ones(1, 1, 1, 1, dtype=torch.int8)
        packed = _onednn().qconv_prepack(w, torch.ones(1), 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
        x = torch.ones(1, 1, 1, 1, dtype=torch.uint8)
        y = _onednn().qconv2d_pointwise(x, 1.0, 0, packed, torch.ones(1), torch.zeros(1, dtype=torch.int64), None,
                                        [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")
        return bool(y.reshape(-1)[0] == 1.0)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _probe_is_exact() -> bool:
    """One u8×s8 linear and conv with codes 255 × 127 / −128, compared with exact integer sums."""
    op = _onednn()
    k = 64
    w = torch.full((3, k), 127, dtype=torch.int8)
    w[1] = -128
    w[2, ::2] = -77
    x = torch.full((2, k), 255, dtype=torch.uint8)
    x[1, 1::2] = 200
    ref = x.double() @ w.double().T
    y = op.qlinear_pointwise(x, 1.0, 0, op.qlinear_prepack(w, None), torch.ones(3), torch.zeros(3, dtype=torch.int64),
                             None, 1.0, 0, torch.float32, "none", [], "")
    if not torch.equal(y.double(), ref):
        return False
    wc = w.reshape(3, k, 1, 1)
    packed = op.qconv_prepack(wc, torch.ones(3), 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
    yc = op.qconv2d_pointwise(x.reshape(2, k, 1, 1), 1.0, 0, packed, torch.ones(3), torch.zeros(3, dtype=torch.int64),
                              None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")
    return torch.equal(yc.reshape(2, 3).double(), ref)


@functools.lru_cache(maxsize=None)
def int8_products_saturate() -> bool:
    """Whether oneDNN's u8×s8 kernels on this CPU sum product pairs in saturating int16.

    True on CPUs without VNNI/AMX (the ISA oneDNN dispatches to, including a cap set with
    ``ONEDNN_MAX_CPU_ISA``). Probed by running the kernels, so it reports what they do, not what
    the CPU flags suggest; the answer is fixed for the process (oneDNN picks its ISA once).
    """
    return not _probe_is_exact()


def products_could_saturate(act_max: int, weight_abs_max: int) -> bool:
    """Whether a pair a1·w1 + a2·w2 with a ≤ ``act_max`` and |w| ≤ ``weight_abs_max`` can overflow int16."""
    return 2 * act_max * weight_abs_max > INT16_MAX


class _Int8Weight(nn.Module):
    """One weight part prepacked for oneDNN, with the W8-asymmetric correction if needed."""

    def __init__(self, wc: WeightCodes, kind: str, op_args: dict):
        super().__init__()
        centered = wc.centered().to(torch.int64)
        fits = centered.numel() == 0 or bool(centered.min() >= -128 and centered.max() <= 127)
        codes = centered if fits else wc.codes.to(torch.int64) - 128
        self.register_buffer("w_scale", wc.step.float().contiguous())
        self.register_buffer("w_zero", torch.zeros(wc.channels, dtype=torch.int64))
        self.register_buffer("correction", None if fits else ((128 - wc.zero_point).double() * wc.step.double()).float())
        codes = codes.to(torch.int8).contiguous()
        #: the largest |code| fed to the kernel (what a saturating pair sum depends on)
        self.abs_max = int(codes.abs().max()) if codes.numel() else 0
        self.ones_packed = None
        if kind == "Linear":
            self.packed = _onednn().qlinear_prepack(codes, None)
        else:
            a = op_args
            self.packed = _onednn().qconv_prepack(codes, self.w_scale, 1.0, 0, list(a["stride"]), list(a["padding"]),
                                                  list(a["dilation"]), a["groups"], None)
            if not fits:
                ones = torch.ones(1, *codes.shape[1:], dtype=torch.int8)
                self.ones_packed = _onednn().qconv_prepack(ones, torch.ones(1), 1.0, 0, list(a["stride"]),
                                                           list(a["padding"]), list(a["dilation"]), 1, None)


class Int8Layer(nn.Module):
    """A QuantLayer (Conv1d/Conv2d/Linear) on oneDNN int8 kernels with fp32 output."""

    def __init__(self, layer: QuantLayer, name: str = "layer", saturating: bool = False):
        super().__init__()
        self.kind = layer.kind
        self.name = name
        self.op_args = dict(layer.op_args)
        self.split = layer.split
        self.act_axis = layer.act_axis
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().contiguous())
        # the activation quantizers stay (timestep rows are read from them at call time)
        self.act_quantizers = layer.act_quantizers
        self.rows: list[list[ActCodes]] = [
            [act_codes(q, k, f"{name} input") for k in range(q.num_steps)] for q in layer.act_quantizers
        ]
        #: folded τ per input part (DMQ LES), applied as x·(1/τ) before quantizing
        self.divisors = [input_divisor_of(q) for q in layer.act_quantizers]
        self.weights = nn.ModuleList(_Int8Weight(wc, self.kind, self.op_args) for wc in layer_weight_codes(layer, name))
        #: per input part: feed the codes in two parts (saturating kernels, products that could overflow)
        self.split_products = [
            bool(saturating) and products_could_saturate(max(r.qmax for r in rows), w.abs_max)
            for rows, w in zip(self.rows, self.weights)
        ]
        if self.kind == "Conv2d":
            self._op = _onednn().qconv2d_pointwise
        elif self.kind == "Conv1d":
            self._op = _onednn().qconv1d_pointwise

    def _conv_args(self) -> tuple:
        a = self.op_args
        return list(a["stride"]), list(a["padding"]), list(a["dilation"]), a["groups"]

    def _kernel(self, xq: Tensor, scale: float, zero_point: int, w: _Int8Weight, bias: Tensor | None) -> Tensor:
        if self.kind == "Linear":
            return _onednn().qlinear_pointwise(xq, scale, zero_point, w.packed, w.w_scale, w.w_zero, bias,
                                               1.0, 0, torch.float32, "none", [], "")
        return self._op(xq, scale, zero_point, w.packed, w.w_scale, w.w_zero, bias, *self._conv_args(),
                        1.0, 0, torch.float32, "none", [], "")

    def _exact_kernel(self, xq: Tensor, act: ActCodes, w: _Int8Weight, bias: Tensor | None, split: bool) -> Tensor:
        """The kernel on ``xq``; split at 127 when a saturating pair sum could overflow.

        Σ(u − z)·w = Σ(min(u, 127) − z)·w + Σ(u − min(u, 127))·w: the second part's codes are in
        [0, 128], so every pair fits int16 for any int8 weight.
        """
        if not split:
            return self._kernel(xq, act.scale, act.zero_point, w, bias)
        low = torch.clamp(xq, max=127)
        return self._kernel(low, act.scale, act.zero_point, w, bias) + self._kernel(xq - low, act.scale, 0, w, None)

    def _part(self, x: Tensor, w: _Int8Weight, act: ActCodes, bias: Tensor | None, split: bool = False) -> Tensor:
        xq = act.quantize(x.float())
        y = self._exact_kernel(xq, act, w, bias, split)
        if self.kind == "Linear":
            if w.correction is not None:
                sums = (xq.to(torch.int32) - act.zero_point).sum(dim=-1, keepdim=True).float() * act.scale
                y = y + sums * w.correction
            return y
        conv = self._conv_args()
        if w.correction is not None:
            sums = self._op(xq, act.scale, act.zero_point, w.ones_packed, torch.ones(1), torch.zeros(1, dtype=torch.int64),
                            None, conv[0], conv[1], conv[2], 1, 1.0, 0, torch.float32, "none", [], "")
            shape = [1, -1] + [1] * (y.dim() - 2)
            y = y + sums * w.correction.reshape(shape)
        return y

    def forward(self, x: Tensor) -> Tensor:
        if self.split is None:
            xs = [x]
        else:
            xs = list(torch.split(x, [self.split, x.shape[self.act_axis] - self.split], dim=self.act_axis))
        out = None
        for i, (xp, w, q) in enumerate(zip(xs, self.weights, self.act_quantizers)):
            act = self.rows[i][q.row()]
            xp = apply_input_divisor(xp, self.divisors[i], self.act_axis)
            y = self._part(xp, w, act, self.bias if i == 0 else None, self.split_products[i])
            out = y if out is None else out + y
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        split = f", split={self.split}" if self.split is not None else ""
        exact = ", codes split at 127" if any(self.split_products) else ""
        return f"{self.kind}, int8 oneDNN{split}{exact}"


def int8_blocker(layer: QuantLayer) -> str | None:
    """Why ``layer`` cannot run on an int8 kernel (None when it can)."""
    if layer.kind not in INT8_KINDS:
        return f"no oneDNN int8 kernel for {layer.kind}"
    if not weight_is_quantized(layer):
        return "weight not quantized"
    if not layer.use_act_quant or not all(q.active for q in layer.act_quantizers):
        return "input not quantized"
    if isinstance(layer.op_args.get("padding"), str):
        return "string padding"
    return None


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@torch.no_grad()
def to_int8(qmodel: QuantModel, *, saturating: bool | None = None, example_inputs=None) -> QuantModel:
    """A copy of ``qmodel`` whose eligible layers run on int8 kernels (CPU only).

    The returned model is called exactly like ``qmodel`` (timestep rows included); its
    :class:`Int8Report` is in ``model.int8_report``. ``saturating``: None probes the kernels
    (:func:`int8_products_saturate`); True forces the exact path for kernels without VNNI/AMX
    (codes split where a pair could overflow int16) on any CPU; False trusts the kernels to be
    exact (wrong on CPUs without VNNI/AMX — for measurements only).
    """
    if not isinstance(qmodel, QuantModel):
        raise ConfigError(f"to_int8() needs a QuantModel, got {type(qmodel).__name__}")
    if any(p.device.type != "cpu" for p in qmodel.parameters()):
        raise ConfigError("the int8 backend runs on the CPU: move the model to cpu first")
    if not int8_kernels_available():
        raise DiffquantError("this PyTorch build has no usable oneDNN int8 kernels on this CPU")
    if saturating is None:
        saturating = int8_products_saturate()
    model, preparation = prepare_for_export(qmodel, example_inputs)
    model = model.eval()
    if preparation.changed_outputs:
        warnings.warn(f"to_int8(): {preparation.summary()}", stacklevel=2)
    report = Int8Report(saturating=bool(saturating), preparation=preparation)
    for name, layer in model.layers().items():
        why = int8_blocker(layer)
        if why is None:
            try:
                int8_layer = Int8Layer(layer, name, saturating=bool(saturating))
                _set_submodule(model.model, name, int8_layer)
                report.int8.append(name)
                if any(int8_layer.split_products):
                    report.split_products.append(name)
                continue
            except ExportError as exc:
                why = str(exc)
        report.fake_quant[name] = why
    for name in model.plan.attention:
        report.fake_quant[f"{name} (matmuls)"] = "attention act-to-act matmuls stay fake-quant"
    if not report.int8:
        reasons = sorted({why for key, why in report.fake_quant.items() if not key.endswith("(matmuls)")})
        warnings.warn("to_int8(): no layer could run on int8 kernels, the model stays on fake quantization"
                      + (f" ({'; '.join(reasons)[:300]})" if reasons else " (it has no quantized layers)"),
                      stacklevel=2)
    model.int8_report = report
    return model


class CompiledInt8(nn.Module):
    """An int8 model behind ``torch.compile`` (inductor, weight freezing), with an eager fallback.

    Inductor fuses the float work around the int8 kernels (GroupNorm → SiLU → activation
    quantization, rescales, residual adds) and keeps the packed int8 weights as constants; on the
    benchmarked 31 M UNet this removes most of the per-layer overhead (benchmarks/results/deploy.md).
    Compiling takes a minute or more on 2 cores, so it pays off for long sampling runs. Some
    fusion patterns of this torch's inductor fail to lower (e.g. an int8 linear followed by an
    add in small diffusers UNets): then the first call warns once and the model runs eagerly —
    the outputs are the same either way. Per-timestep activation tables are recompiled per row
    until dynamo's recompile limit, then run eagerly.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.eager = model
        self.int8_report = model.int8_report
        # kept out of the module tree (it wraps ``eager``, whose tensors are registered already)
        self.__dict__["_compiled"] = torch.compile(model, dynamic=False)
        #: None until the first call; then whether the compiled graph is in use
        self.compiled_ok: bool | None = None

    def forward(self, *args, **kwargs):
        if self.compiled_ok is not False:
            try:
                # freezing (packed int8 weights as graph constants) is required by inductor's
                # oneDNN int8 lowerings; patched per call, so no global setting changes
                with _inductor_freezing():
                    out = self._compiled(*args, **kwargs)
                self.compiled_ok = True
                return out
            except Exception as exc:  # inductor lowering errors have many types
                if self.compiled_ok:
                    raise
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                warnings.warn(f"torch.compile of the int8 model failed ({first[:200]}); running it eagerly", stacklevel=1)
                self.compiled_ok = False
        return self.eager(*args, **kwargs)


def _inductor_freezing():
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


def compile_int8(model: nn.Module) -> CompiledInt8:
    """Wrap a model from :func:`to_int8` in :class:`CompiledInt8`."""
    if not getattr(model, "int8_report", None):
        raise ConfigError("compile_int8() expects a model returned by to_int8()")
    return CompiledInt8(model)
