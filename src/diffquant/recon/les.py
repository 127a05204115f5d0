"""DMQ's Learned Equivalent Scaling (LES, METHODS.md §5.1), layer by layer.

Every layer ``l`` that LES covers carries a per-input-channel scale τ
(:func:`~diffquant.nn.layers.attach_input_scale`, init 1) and computes Q(x/τ)·Q(W·τ), which equals
the float layer for any τ when nothing is quantized. τ is learned so that the quantized layer
reproduces the float one:

- inputs x and targets y = layer(x) come from the **float** model (one capture per
  reconstruction unit records every LES layer inside it, in memory up to the cache budget and on
  disk beyond, optionally fp16 — :class:`~diffquant.recon.cache.CacheOptions`);
- both quantizers are **dynamic** and recomputed on every forward from the current tensors, with
  STE rounding and the ranges **not detached**, so τ also receives gradients through the ranges:
  per-output-channel min–max of W·τ (zero point rounded and clamped) for weights, per-tensor
  min–max of the current batch of x/τ (zero point rounded, unclamped) for activations; split
  layers quantize each input part on its own (§1.9); the grid is asymmetric;
- the loss is the per-sample L2 reconstruction error weighted by timestep
  (:class:`~diffquant.recon.time_weight.TimestepWeighting`);
- Adam on τ only, cosine annealing to 0 over the iterations; each iteration takes B distinct
  random cached samples. τ has no positivity constraint (as in the official code).

The stored quantizers are not touched here: after LES the recipe re-initialises the weight
quantizers on W·τ and calibrates the activation quantizers on x/τ.

Determinism: layer i is trained inside ``torch.random.fork_rng`` with a seed derived from
(seed, "les", i) and its batches come from a generator with the same seed, so a run resumed from
a per-layer checkpoint ends where an uninterrupted one does.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import ConfigError, DiffquantError
from ..model.qmodel import QuantModel
from ..nn.layers import QuantLayer
from ..quant.affine import MIN_STEP, round_ste
from .cache import CacheOptions, CalibrationCalls, TensorStore, _Budget, CACHE_DTYPES
from .engine import UnitRecord, _fork_devices, eval_indices, unit_seed
from .progress import ReconProgress
from .state import quant_state
from .time_weight import TIME_WEIGHTS, TimestepWeighting, per_sample_loss

log = logging.getLogger("diffquant.recon")
PASS_NAME = "les"


# ---------------------------------------------------------------------- dynamic quantizers
def dynamic_quantize(x: Tensor, bits: int, channel_axis: int | None = None, *,
                     clamp_zero_point: bool = True) -> Tensor:
    """Asymmetric fake quantization with the range of ``x`` itself (per tensor, or per channel
    along ``channel_axis``): s = (max − min)/(2^b − 1), z = ⌊−min/s⌉, STE rounding.

    The min and max are *not* detached, so gradients reach whatever ``x`` depends on through the
    step as well as through the values; the zero point is rounded without STE (no gradient).
    """
    if channel_axis is None:
        lo, hi = x.min(), x.max()
    else:
        axis = channel_axis % x.dim()
        dims = [d for d in range(x.dim()) if d != axis]
        lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    qmax = 2**bits - 1
    step = ((hi - lo) / qmax).clamp_min(MIN_STEP)
    zero = torch.round(-lo / step).detach()
    if clamp_zero_point:
        zero = zero.clamp(0, qmax)
    q = torch.clamp(round_ste(x / step) + zero, 0, qmax)
    return (q - zero) * step


def _op(layer: QuantLayer, x: Tensor, w: Tensor) -> Tensor:
    if layer.kind == "Linear":
        return F.linear(x, w, layer.bias)
    if layer.kind == "Conv2d":
        return F.conv2d(x, w, layer.bias, **layer.op_args)
    if layer.kind == "Conv1d":
        return F.conv1d(x, w, layer.bias, **layer.op_args)
    return F.conv_transpose2d(x, w, layer.bias, **layer.op_args)


def les_forward(layer: QuantLayer, x: Tensor, *, weights: bool = True, acts: bool = True) -> Tensor:
    """Q(x/τ)·Q(W·τ) with dynamic quantizers (see the module docstring); ``weights``/``acts``
    False leave that side in floating point. Quantizers at 16/32 bits stay FP too."""
    xs = layer.scale_input(x)
    if acts:
        if layer.split is None:
            parts = [xs]
        else:
            parts = list(torch.split(xs, [layer.split, xs.shape[layer.act_axis] - layer.split], dim=layer.act_axis))
        parts = [dynamic_quantize(p, q.bits, None, clamp_zero_point=False) if q.active else p
                 for p, q in zip(parts, layer.act_quantizers)]
        xs = parts[0] if len(parts) == 1 else torch.cat(parts, dim=layer.act_axis)
    w_parts = layer.weight_parts()
    if weights:
        w_parts = [dynamic_quantize(w, q.bits, layer.out_axis) if q.active else w
                   for w, q in zip(w_parts, layer.weight_quantizers)]
    w = w_parts[0] if len(w_parts) == 1 else torch.cat(w_parts, dim=layer.in_axis)
    return _op(layer, xs, w)


# ---------------------------------------------------------------------- float input/output capture
class _Captured(Exception):
    """Ends a capture forward once every hooked layer has been seen."""


@dataclass
class LayerIO:
    """A layer's float input and output for N calibration samples."""

    inputs: TensorStore
    outputs: TensorStore
    #: keeps the storage (and any disk files) alive as long as the cache
    budget: _Budget | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return self.inputs.n

    @classmethod
    def from_tensors(cls, x: Tensor, y: Tensor, options: CacheOptions | None = None) -> "LayerIO":
        """A cache holding given inputs ``x`` [N, …] and outputs ``y`` [N, …]."""
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"inputs ({x.shape[0]}) and outputs ({y.shape[0]}) differ in sample count")
        options = options or CacheOptions()
        budget, dtype = _Budget(options), CACHE_DTYPES[options.dtype]
        io = cls(TensorStore(x.shape[0], tuple(x.shape[1:]), dtype, budget),
                 TensorStore(y.shape[0], tuple(y.shape[1:]), dtype, budget), budget)
        io.inputs.write(slice(0, x.shape[0]), x)
        io.outputs.write(slice(0, y.shape[0]), y)
        return io

    def batch(self, index: Tensor, device) -> tuple[Tensor, Tensor]:
        x = self.inputs.read(index).to(device=device, dtype=torch.float32)
        y = self.outputs.read(index).to(device=device, dtype=torch.float32)
        return x, y


def _inner(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, QuantModel) else model


@torch.no_grad()
def capture_layer_io(model: nn.Module, names: list[str], data: CalibrationCalls, *,
                     options: CacheOptions | None = None, one_timestep: bool = False,
                     budget: _Budget | None = None) -> dict[str, LayerIO]:
    """Run ``data`` through ``model`` once, recording the first call of each layer in ``names``
    (input and output); the forward stops as soon as all of them have been seen."""
    options = options or CacheOptions()
    budget = budget or _Budget(options)
    dtype = CACHE_DTYPES[options.dtype]
    n = len(data)
    inner = _inner(model)
    stores: dict[str, LayerIO] = {}
    seen: set[str] = set()
    current: dict[str, slice] = {}

    def hook_for(name: str):
        def hook(module, args, output):
            if name in seen:
                return None
            seen.add(name)
            x, index = args[0], current["index"]
            if name not in stores:
                stores[name] = LayerIO(TensorStore(n, tuple(x.shape[1:]), dtype, budget),
                                       TensorStore(n, tuple(output.shape[1:]), dtype, budget), budget)
            stores[name].inputs.write(index, x)
            stores[name].outputs.write(index, output)
            if len(seen) == len(names):
                raise _Captured
            return None

        return hook

    handles = []
    try:
        for name in names:
            try:
                module = inner.get_submodule(name)
            except AttributeError:
                raise DiffquantError(f"layer {name!r} does not exist in {type(inner).__name__}") from None
            handles.append(module.register_forward_hook(hook_for(name)))
        was_training = model.training
        model.eval()
        try:
            for index in data.slices(options.batch_size, one_timestep):
                seen.clear()
                current["index"] = index
                try:
                    data.run(model, index)
                except _Captured:
                    pass
                if len(seen) != len(names):
                    missing = sorted(set(names) - seen)
                    raise DiffquantError(f"layers {missing[:3]} were not called by the denoiser")
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return stores


# ---------------------------------------------------------------------- training
@dataclass
class LESOptions:
    """Hyperparameters of the LES pass (METHODS.md §5.1, §5.2)."""

    iters: int = 6000
    batch_size: int = 32
    lr: float = 1e-3
    #: focal | linear | quadratic | uniform
    time_weight: str = "focal"
    alpha: float = 20.0
    momentum: float = 0.95
    seed: int = 0
    device: str | torch.device = "cpu"
    #: cached samples on which each layer's initial / final (unweighted) loss is reported
    eval_samples: int = 256
    cache: CacheOptions = field(default_factory=CacheOptions)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise ConfigError(f"LES iterations must be >= 0, got {self.iters}")
        if self.batch_size < 1:
            raise ConfigError(f"LES batch size must be >= 1, got {self.batch_size}")
        if self.lr < 0:
            raise ConfigError(f"LES learning rate must be >= 0, got {self.lr}")
        if self.time_weight not in TIME_WEIGHTS:
            raise ConfigError(f"time_weight must be one of {', '.join(TIME_WEIGHTS)}, got {self.time_weight!r}")


@torch.no_grad()
def les_loss(layer: QuantLayer, io: LayerIO, index: Tensor, *, weights: bool, acts: bool, device,
             batch_size: int = 64) -> float:
    """Mean per-sample L2 error of the dynamically quantized layer on the samples at ``index``."""
    total = 0.0
    for chunk in index.split(batch_size):
        x, y = io.batch(chunk, device)
        total += float(per_sample_loss(les_forward(layer, x, weights=weights, acts=acts), y).sum())
    return total / max(len(index), 1)


def learn_layer_scale(layer: QuantLayer, io: LayerIO, buckets: Tensor, num_buckets: int, options: LESOptions, *,
                      seed: int, weights: bool = True, acts: bool = True, name: str = "layer") -> UnitRecord:
    """Learn ``layer.input_scale`` on its cached float inputs/outputs (see the module docstring).

    ``buckets`` holds each cached sample's timestep bucket (index in the calibration schedule).
    """
    if layer.input_scale is None:
        raise ConfigError(f"{name}: LES needs an input scale; attach one with attach_input_scale")
    start = time.perf_counter()
    device = options.device
    eval_index = eval_indices(io.n, options.eval_samples)
    tau = layer.input_scale
    with torch.random.fork_rng(devices=_fork_devices(device)):
        torch.manual_seed(seed)
        initial = les_loss(layer, io, eval_index, weights=weights, acts=acts, device=device)
        weighting = TimestepWeighting(num_buckets, options.time_weight, options.alpha, options.momentum)
        gen = torch.Generator().manual_seed(seed)
        batch = min(options.batch_size, io.n)
        tau.requires_grad_(True)
        try:
            opt = torch.optim.Adam([tau], lr=options.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(options.iters, 1), eta_min=0.0)
            for _ in range(options.iters):
                index = torch.randperm(io.n, generator=gen)[:batch]
                x, y = io.batch(index, device)
                losses = per_sample_loss(les_forward(layer, x, weights=weights, acts=acts), y)
                loss = weighting(losses, buckets[index].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        finally:
            tau.requires_grad_(False)
            tau.grad = None
            layer.clear_cache()
        if not bool(torch.isfinite(tau).all()):
            raise DiffquantError(f"{name}: LES diverged (non-finite τ); lower the LES learning rate")
        final = les_loss(layer, io, eval_index, weights=weights, acts=acts, device=device)
    return UnitRecord(name, "layer", PASS_NAME, options.iters, initial, final, seconds=time.perf_counter() - start)


def les_layers(qmodel: QuantModel) -> list[str]:
    """The layers LES covers: every wrapped layer (execution order) whose weight or input is
    quantized and whose conv has groups = 1 (conv_in/out and other FP layers drop out by their
    bits, as DMQ's coverage keeps them FP)."""
    out = []
    layers = qmodel.layers()
    for lp in qmodel.plan.layers:
        layer = layers[lp.name]
        if layer.op_args.get("groups", 1) != 1:
            continue
        w = any(q.active for q in layer.weight_quantizers) and qmodel.config.quantize_weights
        a = lp.quantize_input and any(q.active for q in layer.act_quantizers) and qmodel.config.quantize_acts
        if w or a:
            out.append(lp.name)
    return out


def _groups(qmodel: QuantModel, names: list[str]) -> list[list[str]]:
    """``names`` grouped by reconstruction unit (one float capture per group), in order."""
    wanted = set(names)
    groups = []
    for unit in qmodel.plan.units:
        group = [n for n in unit.layers if n in wanted]
        if group:
            groups.append(group)
    grouped = {n for g in groups for n in g}
    groups += [[n] for n in names if n not in grouped]
    position = {n: i for i, n in enumerate(names)}
    return sorted(groups, key=lambda g: position[g[0]])


def run_les(qmodel: QuantModel, data: CalibrationCalls, buckets: Tensor, num_buckets: int, options: LESOptions, *,
            layers: list[str] | None = None, fp_model: nn.Module | None = None,
            progress: ReconProgress | None = None) -> list[UnitRecord]:
    """LES over ``layers`` (default :func:`les_layers`), in execution order; each must already
    carry τ. ``buckets`` [N]: the timestep bucket of every calibration sample in ``data``.

    With ``progress`` τ is checkpointed after every layer and layers a restored checkpoint has
    finished are skipped.
    """
    names = les_layers(qmodel) if layers is None else list(layers)
    buckets = buckets.reshape(-1).long()
    if buckets.numel() != len(data):
        raise ConfigError(f"need one timestep bucket per calibration sample ({len(data)}), got {buckets.numel()}")
    done = progress.finished_units(PASS_NAME, names) if progress is not None else 0
    records = [UnitRecord(**r) for r in progress.records(PASS_NAME)[:done]] if progress is not None else []
    quant = qmodel.config
    all_layers = qmodel.layers()
    position = {n: i for i, n in enumerate(names)}
    bar = tqdm(total=len(names), initial=done, desc="LES", disable=not options.progress, leave=False)
    one_t = bool(qmodel.timestep_index.timesteps)
    try:
        for group in _groups(qmodel, names[done:]):
            budget = _Budget(options.cache)
            try:
                if fp_model is not None:
                    ios = capture_layer_io(fp_model, group, data, options=options.cache, budget=budget)
                else:
                    with quant_state(qmodel, weights=False, acts=False):
                        ios = capture_layer_io(qmodel, group, data, options=options.cache, one_timestep=one_t,
                                               budget=budget)
                for name in group:
                    layer, lp = all_layers[name], qmodel.plan.layer(name)
                    record = learn_layer_scale(
                        layer, ios[name], buckets, num_buckets, options,
                        seed=unit_seed(options.seed, PASS_NAME, position[name]), name=name,
                        weights=quant.quantize_weights,
                        acts=quant.quantize_acts and lp.quantize_input,
                    )
                    records.append(record)
                    log.info("LES %s: loss %.4g -> %.4g in %d iterations (%.1f s)", name, record.initial_loss,
                             record.final_loss, record.iterations, record.seconds)
                    bar.set_postfix_str(f"{name}: {record.initial_loss:.3g}->{record.final_loss:.3g}")
                    if progress is not None:
                        progress.save(qmodel, PASS_NAME, position[name], names, [r.to_dict() for r in records])
                    bar.update(1)
            finally:
                budget.close()
    finally:
        bar.close()
    return records


__all__ = [
    "LESOptions",
    "LayerIO",
    "capture_layer_io",
    "dynamic_quantize",
    "learn_layer_scale",
    "les_forward",
    "les_layers",
    "les_loss",
    "run_les",
]
