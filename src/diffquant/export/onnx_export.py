"""ONNX export of a quantized denoiser (and of the float one, for comparison).

The export works on a deep copy of the QuantModel: every QuantLayer becomes an
:class:`~.onnx_modules.OnnxQuantLayer` and every quantized attention processor an
:class:`~.onnx_modules.OnnxAttnProcessor`, holding int8 weight initializers and the activation
parameters as constants; ``torch.onnx.export(dynamo=False)`` (the TorchScript exporter — the
dynamo exporter needs onnxscript, which is not installed) traces it. See :mod:`.onnx_modules` for
the two node layouts (``qdq``: QuantizeLinear/DequantizeLinear pairs, portable; ``integer``:
ConvInteger/MatMulInteger, integer kernels in onnxruntime; ``fused``: ``qdq`` with 8-bit conv
outputs calibrated here, the form onnxruntime fuses into QLinearConv — faster, not exact).

Per-timestep activation parameters (docs/methods.md §1.7): **one graph per timestep group**. Rows of
the tables that hold identical parameters for every quantizer form a group; each group is
exported as its own graph with constant parameters (so runtimes can fuse them into integer
kernels). ``path`` holds the group of the first calibrated timestep and ``<stem>.g<j>.onnx`` the
others; the sidecar ``<stem>.json`` lists the timesteps of every graph, and
:class:`~.onnx_runtime.OnnxDenoiser` picks the graph for each call's timestep. Each graph carries
a full copy of the weights.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..model.qmodel import QuantModel, remove_wrapper_hooks
from ..bundle import denoiser_output_tensor
from .codes import ExportError
from .prepare import ExportPreparation, call_denoiser, prepare_for_export, relative_rms
from .onnx_modules import MODES, OnnxAttnProcessor, OnnxQuantLayer
from ..jsonio import write_json

DEFAULT_OPSET = 17
SIDECAR_FORMAT = "diffquant-onnx"
POSITIONAL_NAMES = ("sample", "timestep")


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    paths: list[Path]
    #: the calibrated timesteps served by each graph (None: one graph for every timestep)
    timesteps: list[list[int]] | None
    sidecar: Path
    mode: str
    #: layer name -> why it is not on an integer operator (``integer`` mode; empty = all are)
    not_integer: dict[str, str] = field(default_factory=dict)
    #: what was done to the recipe's result before exporting (:func:`.prepare.prepare_for_export`)
    preparation: ExportPreparation | None = None
    #: ``fused`` mode, per graph: convs whose outputs were requantized and the change it makes
    requantized: list[dict] = field(default_factory=list)


class _Denoiser(nn.Module):
    """Calls ``model`` with positional tensors mapped back to (args, kwargs); returns a tensor."""

    def __init__(self, model: nn.Module, n_args: int, kw_names: list[str], constants: dict):
        super().__init__()
        self.model = model
        self.n_args = n_args
        self.kw_names = kw_names
        self.constants = constants

    def forward(self, *inputs: Tensor) -> Tensor:
        kwargs = dict(zip(self.kw_names, inputs[self.n_args:]))
        kwargs.update(self.constants)
        return denoiser_output_tensor(self.model(*inputs[: self.n_args], **kwargs))


def _split_inputs(example_inputs) -> tuple[tuple, dict]:
    if not (isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2
            and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], dict)):
        raise ConfigError("example_inputs must be (args, kwargs), e.g. ((x, t), {'class_labels': y})")
    args, kwargs = example_inputs
    if not all(isinstance(a, Tensor) for a in args):
        raise ConfigError("positional example inputs must be tensors")
    return tuple(args), dict(kwargs)


def _input_names(n_args: int, kw_names: list[str]) -> list[str]:
    return [POSITIONAL_NAMES[i] if i < len(POSITIONAL_NAMES) else f"input{i}" for i in range(n_args)] + kw_names


def _torch_export(module: nn.Module, example_inputs, path: Path, opset: int) -> None:
    args, kwargs = _split_inputs(example_inputs)
    tensor_kw = {k: v for k, v in kwargs.items() if isinstance(v, Tensor)}
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, Tensor)}
    kw_names = list(tensor_kw)
    wrapper = _Denoiser(module, len(args), kw_names, constants).eval()
    inputs = tuple(a.detach().cpu() for a in args) + tuple(v.detach().cpu() for v in tensor_kw.values())
    names = _input_names(len(args), kw_names)
    dynamic = {n: {0: "batch"} for n, t in zip(names, inputs) if t.dim() >= 1}
    dynamic["out"] = {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")  # recorded, not shown: the exporter's deprecation notes are noise
        # autograd_inlining=False keeps the .onnx_ops functions as PythonOps so that their
        # symbolics run (inlining them breaks the exporter's peephole pass)
        torch.onnx.export(
            wrapper, inputs, str(path), dynamo=False, opset_version=opset, input_names=names,
            output_names=["out"], dynamic_axes=dynamic, do_constant_folding=True, autograd_inlining=False,
        )
    tracer = [str(w.message).strip().splitlines()[0] for w in caught
              if issubclass(w.category, torch.jit.TracerWarning)]
    check_batch_axis(path, names, inputs, tracer)


def _grown_batch(t: Tensor) -> Tensor:
    """``t`` with its first row appended once more along the batch axis."""
    return torch.cat([t, t[:1]]) if t.dim() >= 1 else t


def check_batch_axis(path: Path, names: list[str], inputs: tuple[Tensor, ...], tracer: list[str]) -> None:
    """Refuse a graph whose batch axis is frozen (the tracer's notes, usually harmless constants, are
    shown only then, or when onnxruntime is missing and the check cannot run).

    The graph is run by onnxruntime at the export batch B and at B + 1 (the first row repeated);
    a real dynamic batch gives B + 1 output rows whose first B equal the B-batch output. A model
    that reads ``len(x)`` or ``x.shape[0]`` into Python is traced with that number as a constant
    (the tracer warns) and fails this check.
    """
    if not any(t.dim() >= 1 for t in inputs):
        return
    try:
        import onnxruntime as ort
    except ImportError:  # the check needs the runtime; without it the tracer's notes are all we have
        if tracer:
            warnings.warn(f"{path.name}: the tracer reports values frozen into the graph ({tracer[0][:200]})", stacklevel=1)
        return

    def feeds(ts):
        return {n: (t.float() if t.is_floating_point() else t.to(torch.int64)).numpy() for n, t in zip(names, ts)}

    batch = next(t.shape[0] for t in inputs if t.dim() >= 1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    why = None
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        small = session.run(None, feeds(inputs))[0]
        large = session.run(None, feeds(tuple(_grown_batch(t) for t in inputs)))[0]
    except Exception as exc:  # onnxruntime raises its own exception types
        text = str(exc).strip().splitlines()
        why = f"onnxruntime fails at batch {batch + 1} ({(text[0] if text else type(exc).__name__)[:160]})"
    else:
        if large.shape[0] != batch + 1:
            why = f"batch {batch + 1} gives {large.shape[0]} output rows"
        else:
            scale = float(np.sqrt(np.mean(np.square(small, dtype=np.float64)))) or 1.0
            gap = float(np.sqrt(np.mean(np.square(large[:batch] - small, dtype=np.float64)))) / scale
            if gap > 1e-2:
                why = f"the first {batch} rows change when one more row is added (relative RMS {gap:.2g})"
    if why is not None:
        hint = f"; the tracer says: {tracer[0][:200]}" if tracer else ""
        raise ExportError(f"{path.name}: the batch axis is frozen at {batch} — {why}{hint}. Avoid Python ints "
                          "taken from tensor shapes (len(x), x.shape[0]) in the denoiser's forward")


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def export_model_at_row(qmodel: QuantModel, row: int, mode: str) -> tuple[nn.Module, dict[str, str]]:
    """A float32 deep copy of ``qmodel``'s denoiser with export modules fixed at ``row``."""
    model = copy.deepcopy(qmodel.model).float().cpu().eval()
    remove_wrapper_hooks(model)  # the rows are fixed in this copy
    blockers = {}
    for name in (lp.name for lp in qmodel.plan.layers):
        layer = model.get_submodule(name)
        export_layer = OnnxQuantLayer(layer, row, mode, name)
        if export_layer.integer_blocker is not None:
            blockers[name] = export_layer.integer_blocker
        _set_submodule(model, name, export_layer)
    for name in qmodel.plan.attention:
        attn = model.get_submodule(name)
        attn.set_processor(OnnxAttnProcessor(attn.processor, row, name))
    return model, blockers


@torch.no_grad()
def requantize_outputs(model: nn.Module, calibration: list) -> dict:
    """``fused`` mode: give every fusable conv of the export ``model`` an 8-bit output over the
    min/max its output takes on the ``calibration`` inputs; returns the layer count and the
    relative RMS change of the model output on those inputs (the price of the extra rounding)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, OnnxQuantLayer) and m.output_fusable}
    ranges = {name: [float("inf"), float("-inf")] for name in layers}

    def observe(name):
        def hook(_module, _inputs, output):
            ranges[name][0] = min(ranges[name][0], float(output.amin()))
            ranges[name][1] = max(ranges[name][1], float(output.amax()))
        return hook

    handles = [m.register_forward_hook(observe(name)) for name, m in layers.items()]
    try:
        before = torch.cat([call_denoiser(model, inputs) for inputs in calibration])
    finally:
        for h in handles:
            h.remove()
    done = [name for name, m in layers.items() if m.requantize_output(*ranges[name])]
    after = torch.cat([call_denoiser(model, inputs) for inputs in calibration])
    return {"layers": len(done), "eligible": len(layers), "rel_rms_change": relative_rms(after, before)}


def timestep_groups(qmodel: QuantModel) -> list[list[int]]:
    """Rows of the per-timestep tables grouped by identical activation parameters (in row order)."""
    rows = qmodel.timestep_index.num_steps
    if rows == 1:
        return [[0]]
    act = [q for q in qmodel.quantizers("act").values() if q.num_steps > 1]
    groups: dict[tuple, list[int]] = {}
    for k in range(rows):
        key = tuple((float(q.step[k].reshape(-1)[0]), float(q.zero_point[k].reshape(-1)[0]),
                     tuple(q.multiplier[k].reshape(-1).tolist()) if getattr(q, "multiplier", None) is not None else ())
                    for q in act)
        groups.setdefault(key, []).append(k)
    return list(groups.values())


def _group_path(path: Path, j: int) -> Path:
    return path if j == 0 else path.with_name(f"{path.stem}.g{j}{path.suffix}")


def sidecar_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}.json")


def export_onnx(
    qmodel: QuantModel,
    example_inputs,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    mode: str = "qdq",
    calibration: list | None = None,
) -> OnnxExport:
    """Export the quantized denoiser ``qmodel`` to ONNX at ``path`` (see module docstring).

    ``example_inputs`` = (args, kwargs) of one denoiser call, e.g. ``((x, t), {"class_labels": y})``;
    the batch dimension of every input is dynamic. ``mode``: ``qdq`` | ``integer`` | ``fused``.
    ``calibration``: ``fused`` mode only, a list of such (args, kwargs) inputs on which the conv
    output ranges are taken (default: ``example_inputs`` alone; give inputs from float
    trajectories at several timesteps, as for the recipe's own calibration).
    """
    if not isinstance(qmodel, QuantModel):
        raise ConfigError(f"export_onnx() needs a QuantModel, got {type(qmodel).__name__}")
    if mode not in MODES:
        raise ConfigError(f"unknown ONNX mode {mode!r}; choose one of {', '.join(MODES)}")
    if opset < 13:
        raise ConfigError(f"per-channel QuantizeLinear/DequantizeLinear need opset >= 13, got {opset}")
    path = Path(path)
    _split_inputs(example_inputs)
    if calibration is not None and mode != "fused":
        raise ConfigError(f"calibration inputs are for mode='fused' (output ranges); mode {mode!r} takes none")
    calibration = [example_inputs] if calibration is None else list(calibration)
    if not calibration:
        raise ConfigError("calibration must hold at least one (args, kwargs) input")
    for inputs in calibration:
        _split_inputs(inputs)
    qmodel, preparation = prepare_for_export(qmodel, example_inputs)
    if preparation.changed_outputs:
        warnings.warn(f"export_onnx(): {preparation.summary()}", stacklevel=2)
    groups = timestep_groups(qmodel)
    schedule = list(qmodel.timestep_index.timesteps)
    paths, blockers, requantized = [], {}, []
    for j, rows in enumerate(groups):
        model, blockers = export_model_at_row(qmodel, rows[0], mode)
        if mode == "fused":
            requantized.append(requantize_outputs(model, calibration))
        target = _group_path(path, j)
        _torch_export(model, example_inputs, target, opset)
        paths.append(target)
    if requantized:
        worst = max(r["rel_rms_change"] for r in requantized)
        warnings.warn(f"export_onnx(mode='fused'): {requantized[0]['layers']} conv outputs requantized to 8 bits "
                      f"(onnxruntime QLinearConv); output changed by relative RMS {worst:.2e} on the calibration "
                      "inputs against the exact qdq graph", stacklevel=2)
    # one graph serves every timestep unless the tables hold several parameter sets
    timesteps = None if len(groups) == 1 else [[schedule[k] for k in rows] for rows in groups]
    args, kwargs = _split_inputs(example_inputs)
    sidecar = sidecar_path(path)
    write_json(sidecar, {
        "format": SIDECAR_FORMAT,
        "mode": mode,
        "opset": opset,
        "inputs": _input_names(len(args), [k for k, v in kwargs.items() if isinstance(v, Tensor)]),
        "graphs": [{"file": p.name, "timesteps": None if timesteps is None else timesteps[j]} for j, p in enumerate(paths)],
        "timestep_lookup": qmodel.timestep_index.lookup,
        "not_integer": blockers,
        "preparation": preparation.to_dict(),
        "requantized_outputs": requantized,
    }, indent=1)
    return OnnxExport(paths=paths, timesteps=timesteps, sidecar=sidecar, mode=mode,
                      not_integer=blockers if mode == "integer" else {}, preparation=preparation,
                      requantized=requantized)


def export_float_onnx(model: nn.Module, example_inputs, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Export a float denoiser (a QuantModel is exported with quantization switched off)."""
    if isinstance(model, QuantModel):
        copy_ = copy.deepcopy(model)
        copy_.set_quant_state(weights=False, acts=False)
        inner = copy_.model
    else:
        inner = copy.deepcopy(model)
    remove_wrapper_hooks(inner)
    path = Path(path)
    _torch_export(inner.float().cpu().eval(), example_inputs, path, opset)
    return path


__all__ = ["DEFAULT_OPSET", "ExportError", "OnnxExport", "export_float_onnx", "export_onnx", "sidecar_path", "timestep_groups"]
