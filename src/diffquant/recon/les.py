"""DMQ's Learned Equivalent Scaling (LES, docs/methods.md §5.1), layer by layer or block by block,
and the SmoothQuant baseline that fills the same τ slot without learning (§5.1, §8).

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

Scopes (:attr:`LESOptions.scope`):

- ``layer`` (the paper and the code): each layer's τ on its own, against the layer's float
  output (:func:`learn_layer_scale`);
- ``block``: for each reconstruction unit (:func:`~diffquant.recon.units.make_units`, granularity
  ``block``: the outermost blocks, leftover layers as units of their own) the τ of all its LES
  layers are learned jointly against the **block's** float output, on the block's float inputs
  (:func:`learn_block_scales`). Every quantized layer in the block runs with the dynamic
  quantizers above (those without τ included); other quantizers in the block (attention
  matmuls) stay in floating point. Optimiser, schedule, batches and timestep weighting are the
  layer scope's.

SmoothQuant (:func:`run_smoothquant`) instead sets τ_c = max|X_c|^α / max|W_c|^(1−α) from one
pass of the float model over the calibration set (:func:`~diffquant.quant.omq.smooth_scales`:
X's maximum over batch and space, W's over output channels and kernel positions, both floored at
1e-5 so τ is finite and nonzero).

The stored quantizers are not touched here: after LES the recipe re-initialises the weight
quantizers on W·τ and calibrates the activation quantizers on x/τ.

Determinism: layer (block) i is trained inside ``torch.random.fork_rng`` with a seed derived
from (seed, "les", i) and its batches come from a generator with the same seed, so a run resumed
from a per-layer (per-block) checkpoint ends where an uninterrupted one does.
"""
from __future__ import annotations

import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calib.stop import run_stoppable, stop_forward
from ..errors import ConfigError, DiffquantError
from ..model.qmodel import QuantModel
from ..nn.layers import QuantLayer, attach_input_scale
from ..quant.affine import MIN_STEP, round_ste
from ..quant.omq import smooth_scales
from .cache import (
    CACHE_DTYPES,
    CacheOptions,
    CalibrationCalls,
    TensorStore,
    UnitCache,
    _Budget,
    build_unit_cache,
    first_tensor,
)
from .engine import UnitRecord, _fork_devices, eval_indices, unit_seed
from .progress import ReconProgress
from .state import quant_state
from .time_weight import TIME_WEIGHTS, TimestepWeighting, per_sample_loss
from .units import Unit, make_units
from ..config import checked, knob

log = logging.getLogger("diffquant.recon")
PASS_NAME = "les"
SMOOTHQUANT_PASS = "smoothquant"
#: layer: each layer's τ against its own output | block: a unit's τ jointly against its output
LES_SCOPES = ("layer", "block")
#: sample indices -> per-sample losses [B] (what one LES problem minimises)
LossFn = Callable[[Tensor], Tensor]


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
                stop_forward()  # every hooked layer seen
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
                run_stoppable(data.run, model, index)
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
@checked
class LESSettings:
    """The knobs of LES (docs/methods.md §5.1, §5.2), with their one default."""

    scope: str = knob("layer", doc="layer: each layer's τ against its own output (the paper) | block: a unit's τ jointly")
    iters: int = knob(6000, doc="Adam iterations per layer (block)")
    lr: float = knob(1e-3, gt=0, doc="learning rate of τ")
    batch_size: int = knob(32, ge=1, doc="cached samples per iteration")
    time_weight: str = knob("focal", doc="adaptive timestep weighting: focal | linear | quadratic | uniform (§5.2)")
    alpha: float = knob(20.0, doc="α of the timestep weighting")
    momentum: float = knob(0.95, lt=1, doc="momentum of the per-step loss estimate")

    def __post_init__(self) -> None:
        if self.time_weight not in TIME_WEIGHTS:
            raise ConfigError(f"time_weight must be one of {', '.join(TIME_WEIGHTS)}, got {self.time_weight!r}")
        if self.scope not in LES_SCOPES:
            raise ConfigError(f"LES scope must be one of {', '.join(LES_SCOPES)}, got {self.scope!r}")


@dataclass
@checked
class LESOptions(LESSettings):
    """The LES pass: its knobs (:class:`LESSettings`) and how the engine runs it."""

    #: keep the starting τ when the learned one scores worse on the evaluation samples (off: the
    #: paper's LES, which keeps whatever the last step gives)
    revert_if_worse: bool = False
    seed: int = 0
    device: str | torch.device = "cpu"
    #: cached samples on which each layer's initial / final (unweighted) loss is reported
    eval_samples: int = 256
    cache: CacheOptions = field(default_factory=CacheOptions)
    progress: bool = True



@torch.no_grad()
def _mean_loss(losses_of: LossFn, index: Tensor, batch_size: int = 64) -> float:
    """Mean of ``losses_of`` over the samples at ``index``, in chunks of ``batch_size``."""
    total = 0.0
    for chunk in index.split(batch_size):
        total += float(losses_of(chunk).sum())
    return total / max(len(index), 1)


@contextmanager
def _only_trainable(module: nn.Module, scales: list[nn.Parameter]) -> Iterator[None]:
    """Inside: ``scales`` require gradients and no other parameter of ``module`` does; afterwards
    every flag is restored and the scales' gradients are dropped."""
    ids = {id(t) for t in scales}
    others = [p for p in module.parameters() if id(p) not in ids and p.requires_grad]
    for p in others:
        p.requires_grad_(False)
    for t in scales:
        t.requires_grad_(True)
    try:
        yield
    finally:
        for t in scales:
            t.requires_grad_(False)
            t.grad = None
        for p in others:
            p.requires_grad_(True)


def _fit_scales(scales: list[nn.Parameter], losses_of: LossFn, n: int, buckets: Tensor, num_buckets: int,
                options: LESOptions, generator: torch.Generator) -> None:
    """Adam on ``scales`` with cosine annealing; each iteration B distinct random samples of the
    ``n`` cached ones, their losses weighted by timestep bucket."""
    weighting = TimestepWeighting(num_buckets, options.time_weight, options.alpha, options.momentum)
    batch = min(options.batch_size, n)
    opt = torch.optim.Adam(scales, lr=options.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(options.iters, 1), eta_min=0.0)
    for _ in range(options.iters):
        index = torch.randperm(n, generator=generator)[:batch]
        loss = weighting(losses_of(index), buckets[index].to(options.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def _learn_scales(name: str, kind: str, module: nn.Module, layers: list[QuantLayer], losses_of: LossFn, n: int,
                  buckets: Tensor, num_buckets: int, options: LESOptions, seed: int) -> UnitRecord:
    """Learn the τ of ``layers`` (inside ``module``) by minimising ``losses_of`` over ``n`` cached
    samples; the loss on the evaluation subset before and after goes into the record.

    With ``options.revert_if_worse`` the evaluation loss never ends above where it started: when
    the learned τ scores worse than the starting τ (gradient steps through rounding can), the
    starting τ is restored.
    """
    start = time.perf_counter()
    scales = [layer.input_scale for layer in layers]
    starting = [t.detach().clone() for t in scales]
    eval_index = eval_indices(n, options.eval_samples)
    with torch.random.fork_rng(devices=_fork_devices(options.device)):
        torch.manual_seed(seed)
        initial = _mean_loss(losses_of, eval_index)
        try:
            with _only_trainable(module, scales):
                _fit_scales(scales, losses_of, n, buckets, num_buckets, options, torch.Generator().manual_seed(seed))
        finally:
            for layer in layers:
                layer.clear_cache()
        if not all(bool(torch.isfinite(t).all()) for t in scales):
            raise DiffquantError(f"{name}: LES diverged (non-finite τ); lower the LES learning rate")
        final = _mean_loss(losses_of, eval_index)
        if options.revert_if_worse and final > initial:
            with torch.no_grad():
                for t, t0 in zip(scales, starting):
                    t.copy_(t0)
            for layer in layers:
                layer.clear_cache()
            log.info("LES %s: learned τ scored %.4g > %.4g at the start; the starting τ is kept", name, final, initial)
            final = initial
    return UnitRecord(name, kind, PASS_NAME, options.iters, initial, final, seconds=time.perf_counter() - start)


def _layer_losses(layer: QuantLayer, io: LayerIO, index: Tensor, *, weights: bool, acts: bool, device) -> Tensor:
    x, y = io.batch(index, device)
    return per_sample_loss(les_forward(layer, x, weights=weights, acts=acts), y)


@torch.no_grad()
def les_loss(layer: QuantLayer, io: LayerIO, index: Tensor, *, weights: bool, acts: bool, device,
             batch_size: int = 64) -> float:
    """Mean per-sample L2 error of the dynamically quantized layer on the samples at ``index``."""
    return _mean_loss(functools.partial(_layer_losses, layer, io, weights=weights, acts=acts, device=device),
                      index, batch_size)


def learn_layer_scale(layer: QuantLayer, io: LayerIO, buckets: Tensor, num_buckets: int, options: LESOptions, *,
                      seed: int, weights: bool = True, acts: bool = True, name: str = "layer") -> UnitRecord:
    """Learn ``layer.input_scale`` on its cached float inputs/outputs (see the module docstring).

    ``buckets`` holds each cached sample's timestep bucket (index in the calibration schedule).
    """
    if layer.input_scale is None:
        raise ConfigError(f"{name}: LES needs an input scale; attach one with attach_input_scale")
    losses_of = functools.partial(_layer_losses, layer, io, weights=weights, acts=acts, device=options.device)
    return _learn_scales(name, "layer", layer, [layer], losses_of, io.n, buckets, num_buckets, options, seed)


# ---------------------------------------------------------------------- block scope
@contextmanager
def dynamic_forwards(layers: dict[str, QuantLayer], flags: dict[str, tuple[bool, bool]]) -> Iterator[None]:
    """Inside: every layer in ``layers`` computes :func:`les_forward` (dynamic quantizers, x/τ and
    W·τ) with its (weights, acts) ``flags`` instead of its stored quantizers."""
    for name, layer in layers.items():
        weights, acts = flags[name]
        layer.forward = functools.partial(les_forward, layer, weights=weights, acts=acts)
    try:
        yield
    finally:
        for layer in layers.values():
            if "forward" in layer.__dict__:
                del layer.forward


def _block_losses(unit: Unit, cache: UnitCache, index: Tensor, *, device) -> Tensor:
    args, kwargs = cache.inputs(index, "fp", device)
    return per_sample_loss(first_tensor(unit.module(*args, **kwargs)), cache.target(index, device))


def learn_block_scales(unit: Unit, cache: UnitCache, buckets: Tensor, num_buckets: int, options: LESOptions, *,
                       seed: int, layers: list[str] | None = None, weights: bool = True,
                       acts: bool = True) -> UnitRecord:
    """Learn the τ of the unit's ``layers`` (default: every layer of it carrying τ) jointly, so
    that the block with dynamically quantized layers reproduces its float output.

    ``cache`` holds the unit's float inputs (``fp``) and float outputs
    (:func:`~diffquant.recon.cache.build_unit_cache` with ``keep=("fp",)``); ``buckets`` each
    cached sample's timestep bucket. Every quantized layer of the unit runs :func:`les_forward`
    (``acts`` only where the unit quantizes the layer's input); other quantizers in the block run
    as the model's quantization state has them (:func:`run_les` switches them off).
    """
    names = [n for n, layer in unit.layers.items() if layer.input_scale is not None] if layers is None else layers
    if not names:
        raise ConfigError(f"{unit.name}: block-scope LES needs at least one layer with an input scale")
    missing = [n for n in names if n not in unit.layers or unit.layers[n].input_scale is None]
    if missing:
        raise ConfigError(f"{unit.name}: layers {missing[:3]} are not in the unit or carry no input scale "
                          "(attach one with attach_input_scale)")
    if cache.fp_inputs is None:
        raise ConfigError(f"{unit.name}: block-scope LES needs the unit's float inputs (keep=('fp',))")
    flags = {n: (weights, acts and unit.quantize_input.get(n, True)) for n in unit.layers}
    losses_of = functools.partial(_block_losses, unit, cache, device=options.device)
    with dynamic_forwards(unit.layers, flags):
        return _learn_scales(unit.name, unit.kind, unit.module, [unit.layers[n] for n in names], losses_of, cache.n,
                             buckets, num_buckets, options, seed)


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
        w = any(q.active for q in layer.weight_quantizers) and qmodel.quant_config.quantize_weights
        a = lp.quantize_input and any(q.active for q in layer.act_quantizers) and qmodel.quant_config.quantize_acts
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


def _check_buckets(buckets: Tensor, data: CalibrationCalls) -> Tensor:
    buckets = buckets.reshape(-1).long()
    if buckets.numel() != len(data):
        raise ConfigError(f"need one timestep bucket per calibration sample ({len(data)}), got {buckets.numel()}")
    return buckets


def les_units(qmodel: QuantModel, names: list[str]) -> list[Unit]:
    """The reconstruction units of granularity ``block`` (execution order) that hold layers of
    ``names``: the problems of block-scope LES."""
    wanted = set(names)
    units = [u for u in make_units(qmodel, "block", "execution") if wanted & set(u.layers)]
    covered = {n for u in units for n in u.layers}
    outside = [n for n in names if n not in covered]
    if outside:
        raise DiffquantError(f"layers {outside[:3]} belong to no reconstruction unit of the wrap plan")
    return units


def _run_block_les(qmodel: QuantModel, data: CalibrationCalls, buckets: Tensor, num_buckets: int, options: LESOptions,
                   names: list[str], fp_model: nn.Module | None, progress: ReconProgress | None) -> list[UnitRecord]:
    """Block-scope LES over the units holding ``names``, one float cache and checkpoint per unit."""
    units = les_units(qmodel, names)
    unit_names = [u.name for u in units]
    done = progress.finished_units(PASS_NAME, unit_names) if progress is not None else 0
    records = [UnitRecord(**r) for r in progress.records(PASS_NAME)[:done]] if progress is not None else []
    wanted = set(names)
    quant = qmodel.quant_config
    qmodel.eval()
    bar = tqdm(total=len(units), initial=done, desc="LES (blocks)", disable=not options.progress, leave=False)
    try:
        for i, unit in enumerate(units[done:], start=done):
            cache = build_unit_cache(qmodel, unit.name, data, keep=("fp",), fp_model=fp_model, options=options.cache)
            try:
                with quant_state(qmodel, weights=False, acts=False):
                    record = learn_block_scales(
                        unit, cache, buckets, num_buckets, options, seed=unit_seed(options.seed, PASS_NAME, i),
                        layers=[n for n in unit.layers if n in wanted], weights=quant.quantize_weights,
                        acts=quant.quantize_acts,
                    )
            finally:
                cache.close()
            records.append(record)
            log.info("LES %s (block): loss %.4g -> %.4g in %d iterations (%.1f s)", unit.name, record.initial_loss,
                     record.final_loss, record.iterations, record.seconds)
            bar.set_postfix_str(f"{unit.name}: {record.initial_loss:.3g}->{record.final_loss:.3g}")
            if progress is not None:
                progress.save(qmodel, PASS_NAME, i, unit_names, [r.to_dict() for r in records])
            bar.update(1)
    finally:
        bar.close()
    return records


def run_les(qmodel: QuantModel, data: CalibrationCalls, buckets: Tensor, num_buckets: int, options: LESOptions, *,
            layers: list[str] | None = None, fp_model: nn.Module | None = None,
            progress: ReconProgress | None = None) -> list[UnitRecord]:
    """LES over ``layers`` (default :func:`les_layers`), in execution order; each must already
    carry τ. ``buckets`` [N]: the timestep bucket of every calibration sample in ``data``.
    ``options.scope`` ``block`` learns them block by block (:func:`learn_block_scales`, one
    record per unit) instead of layer by layer.

    With ``progress`` τ is checkpointed after every layer (block) and those a restored checkpoint
    has finished are skipped.
    """
    names = les_layers(qmodel) if layers is None else list(layers)
    buckets = _check_buckets(buckets, data)
    if options.scope == "block":
        return _run_block_les(qmodel, data, buckets, num_buckets, options, names, fp_model, progress)
    done = progress.finished_units(PASS_NAME, names) if progress is not None else 0
    records = [UnitRecord(**r) for r in progress.records(PASS_NAME)[:done]] if progress is not None else []
    quant = qmodel.quant_config
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


# ---------------------------------------------------------------------- SmoothQuant baseline
def _channel_absmax(x: Tensor, axis: int) -> Tensor:
    """max |x| per index of ``axis`` (over batch, space and any other axis)."""
    x = x.detach().movedim(axis % x.dim(), 0)
    return x.reshape(x.shape[0], -1).abs().amax(dim=1).float()


@torch.no_grad()
def input_channel_absmax(model: nn.Module, axes: dict[str, int], data: CalibrationCalls, *, batch_size: int = 64,
                         one_timestep: bool = False) -> dict[str, Tensor]:
    """max |X_c| per input channel of every layer in ``axes`` (name -> the input's channel axis)
    over every call while ``data`` runs through ``model``."""
    inner = _inner(model)
    amax: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(module, args):
            m = _channel_absmax(args[0], axes[name])
            amax[name] = m if name not in amax else torch.maximum(amax[name], m)

        return hook

    handles = []
    was_training = model.training
    try:
        for name in axes:
            try:
                module = inner.get_submodule(name)
            except AttributeError:
                raise DiffquantError(f"layer {name!r} does not exist in {type(inner).__name__}") from None
            handles.append(module.register_forward_pre_hook(hook_for(name)))
        model.eval()
        for index in data.slices(batch_size, one_timestep):
            data.run(model, index)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = sorted(set(axes) - set(amax))
    if missing:
        raise DiffquantError(f"layers {missing[:3]} were not called by the denoiser")
    return amax


def smoothquant_scales(qmodel: QuantModel, names: list[str], data: CalibrationCalls, alpha: float, *,
                       fp_model: nn.Module | None = None, batch_size: int = 64) -> dict[str, Tensor]:
    """SmoothQuant's τ_c = max|X_c|^α / max|W_c|^(1−α) for each layer in ``names``, X from the
    float model (``fp_model``, default ``qmodel`` with quantization off) over all of ``data``."""
    layers = qmodel.layers()
    axes = {n: layers[n].act_axis for n in names}
    if fp_model is not None:
        amax = input_channel_absmax(fp_model, axes, data, batch_size=batch_size)
    else:
        with quant_state(qmodel, weights=False, acts=False):
            amax = input_channel_absmax(qmodel, axes, data, batch_size=batch_size,
                                        one_timestep=bool(qmodel.timestep_index.timesteps))
    out = {}
    for n in names:
        layer = layers[n]
        # the [1, C] row of channel maxima: smooth_scales' maximum over the batch axis is the value itself
        x_max = amax[n].to(layer.weight.device).reshape(1, -1)
        out[n] = smooth_scales(x_max, layer.weight, act_axis=1, in_axis=layer.in_axis, alpha=alpha)
    return out


@torch.no_grad()
def run_smoothquant(qmodel: QuantModel, data: CalibrationCalls, alpha: float, *, layers: list[str] | None = None,
                    fp_model: nn.Module | None = None, batch_size: int = 64,
                    progress: ReconProgress | None = None) -> list[UnitRecord]:
    """Set τ of ``layers`` (default :func:`les_layers`) to SmoothQuant's scales
    (:func:`smoothquant_scales`), attaching τ where a layer has none; one record per layer (no
    iterations, no loss). With ``progress`` the result is checkpointed once, and a restored
    checkpoint that has it is kept."""
    names = les_layers(qmodel) if layers is None else list(layers)
    if progress is not None and names and progress.finished_units(SMOOTHQUANT_PASS, names) == len(names):
        return [UnitRecord(**r) for r in progress.records(SMOOTHQUANT_PASS)]
    start = time.perf_counter()
    scales = smoothquant_scales(qmodel, names, data, alpha, fp_model=fp_model, batch_size=batch_size)
    all_layers = qmodel.layers()
    for n, tau in scales.items():
        layer = all_layers[n]
        if layer.input_scale is None:
            attach_input_scale(layer, tau)
        else:
            layer.input_scale.copy_(tau.reshape(layer.input_scale.shape))
            layer.clear_cache()
    seconds = (time.perf_counter() - start) / max(len(names), 1)
    records = [UnitRecord(n, "layer", SMOOTHQUANT_PASS, 0, None, None, seconds=seconds) for n in names]
    log.info("SmoothQuant (alpha %g): τ set on %d layers", alpha, len(names))
    if progress is not None and names:
        progress.save(qmodel, SMOOTHQUANT_PASS, len(names) - 1, names, [r.to_dict() for r in records])
    return records


__all__ = [
    "LES_SCOPES",
    "LESOptions",
    "LayerIO",
    "capture_layer_io",
    "dynamic_forwards",
    "dynamic_quantize",
    "input_channel_absmax",
    "learn_block_scales",
    "learn_layer_scale",
    "les_forward",
    "les_layers",
    "les_loss",
    "les_units",
    "run_les",
    "run_smoothquant",
    "smoothquant_scales",
]
