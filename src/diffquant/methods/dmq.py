"""DMQ (docs/methods.md §5): learned equivalent scaling, adaptive timestep weighting, per-step
activation tables with power-of-two channel scaling (PTS).

Pipeline, given a model wrapped with :meth:`DMQConfig.wrap_config` (coverage §1.10: conv_in,
conv_out, the time-embedding MLP and the ResBlock embedding projections FP, attention matmuls FP,
split shortcuts on; asymmetric grids, ``lp_shrink`` weights):

1. calibration data (:meth:`DMQConfig.select_calibration`): every sampling step (``all_steps``),
   ``cali_n`` trajectories each; the steps' timesteps become the model's schedule, and every
   activation quantizer gets one table row per step (``per_step_acts``), looked up from the t
   given to the denoiser (§1.7: an unknown t raises; ``timestep_lookup="nearest"`` maps it to the
   nearest calibrated step);
2. LES (:mod:`diffquant.recon.les`), layer by layer (``les_scope="layer"``) or with the τ of
   each block learned jointly against the block's float output (``les_scope="block"``), with
   adaptive timestep weighting (:mod:`diffquant.recon.time_weight`): τ for every quantized layer,
   PTS layers included. The SmoothQuant baseline (``smoothquant_alpha``, with ``les=False``) puts
   τ_c = max|X_c|^α / max|W_c|^(1−α) from the float calibration inputs in the same slot instead;
3. the weight quantizers re-initialised on W·τ (``lp_shrink``, per channel), then the shared
   BRECQ/AdaRound weight pass (inputs x_in^q of the weight-quantized prefix, targets y^fp, L2,
   no timestep weighting);
4. per step k: reset row k; ``minmax`` (no zero widening, unclamped zero point) on ``act_init_n``
   random samples of the step; then the step's slice streamed in batches of ``act_batch`` under
   ema_minmax(``act_momentum``); per tensor, asymmetric, on x/τ; weights and activations
   quantized meanwhile;
5. PTS on the layers matching ``pts_layers`` (default: residual shortcut convs, both split
   halves), layer by layer in execution order with the earlier layers' factors in place; per
   step (``pts_per_step``) or one vote over all steps;
6. τ, the weight state and the K activation tables are saved with the model (τ stays explicit
   so the checkpoint loads onto the original float weights; :func:`diffquant.export.fold_input_scales`
   gives the folded deployment form, which ``fold_les`` asks exporters for).

Every stage checkpoints into ``work_dir`` (per LES layer or block, after SmoothQuant, per weight
unit, per calibrated step, per PTS layer) and a rerun resumes there.

``dmq_official`` (:class:`DMQOfficialConfig`) sets what the official code does differently and
the library can reproduce: registration unit order and explicit (unfolded) τ. Its fresh noise per
calibration step (``independent_trajectories_per_step``) is not available: the one-pass capture
cannot run trajectory group k only up to step k, so asking for it is a ConfigError.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calib.cache import TrajectoryCache
from ..calib.select import CalibrationSet
from ..calib.stop import run_stoppable, stop_after
from ..config import LayerRule, QuantConfig, checked, default_of, knob
from ..errors import ConfigError, DiffquantError
from ..model.plan import rule_applies
from ..model.qmodel import QuantModel
from ..nn.layers import QuantLayer, attach_input_scale
from ..quant.pts import PTS_SELECTIONS, PTSStatistics
from ..quant.quantizer import UniformQuantizer
from ..quant.timestep import LOOKUP_MODES
from ..quant.variants import PTSQuantizer, replace_module
from ..recipes import STAGES, EngineSettings, ForwardLoop, Recipe, Stage, StageContext, run_recipe
from ..recon.cache import CacheOptions, CalibrationCalls, DenoiserCall
from ..recon.engine import UnitRecord
from ..recon.les import LES_SCOPES, SMOOTHQUANT_PASS, LESOptions, LESSettings, les_layers, run_les, run_smoothquant
from ..recon.passes import settings_of
from ..recon.progress import ReconProgress
from ..recon.state import quant_state
from ..recon.time_weight import TIME_WEIGHTS
from ..recon.units import GRANULARITIES, UNIT_ORDERS
from .stages import AdaRound, AdaRoundOptions, AllStepsSelection, RoundToNearest, UniformSelection, Wrap, acts_quantized, one_timestep

log = logging.getLogger("diffquant.methods")

PTS_MODES = ("off",) + PTS_SELECTIONS
#: residual shortcut convs: diffusers ``conv_shortcut``, CompVis ``skip_connection``, DDIM
#: ``nin_shortcut``, mnist-resunet ``residual_conv``
DEFAULT_PTS_LAYERS = ["@shortcut"]
#: ResBlock embedding projections (diffusers, CompVis, DDIM, mnist-resunet) and conv_in by name
#: DMQ keeps the first layer and the ResBlocks' time-embedding projections in FP: found from the
#: traced graph (``@input``: conv_in of a UNet, a DiT's patch embedding, any model's first
#: x-consuming layer; ``@time_projection``: time_emb_proj / emb_layers / temb_proj / ...)
DEFAULT_FP_LAYERS = ["@input", "@time_projection"]


def _globs(name: str, value, named: dict[str, list[str]]) -> list[str]:
    if isinstance(value, str):
        value = named.get(value, [value])
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of name globs, got {value!r}")
    out: list[str] = []
    for v in value:
        out += named.get(v, [v])
    return out


# ---------------------------------------------------------------------- stage options
@dataclass
@checked
class LESStageOptions(LESSettings):
    """LES's knobs (:class:`~diffquant.recon.les.LESSettings`)."""


@dataclass
@checked
class StepTablesOptions:
    per_step: bool = knob(True, doc="one activation table row per calibration step (false: one shared row)")
    init_n: int = knob(16, ge=1, doc="random samples of a step for the minmax init")
    batch: int = knob(16, ge=1, doc="batch of the ema_minmax stream over the step")
    momentum: float = knob(0.95, lt=1, doc="momentum of that stream")


@dataclass
@checked
class PTSOptions:
    mode: Literal["mse", "vote"] = knob("vote", doc="per-channel power-of-two factor: vote (DMQ) | mse")
    kappa: float = knob(0.85, le=1, doc="κ: vote threshold")
    D: int = knob(3, doc="largest exponent: factors 2^-d, d ≤ D")
    layers: list[str] = knob(list(DEFAULT_PTS_LAYERS), doc="the PTS layers: @roles or name globs; skip_connection | all")
    per_step: bool = knob(True, doc="factors per calibration step (official) or one static vote")

    def __post_init__(self) -> None:
        self.layers = _globs("layers", self.layers, {"skip_connection": DEFAULT_PTS_LAYERS, "all": ["*"]})


@dataclass
@checked
class DMQConfig:
    """All knobs of DMQ (docs/methods.md §5, ablation switches §8); defaults = the library's."""

    # -- wrapping (wrap_config) and coverage (§1.10)
    split: bool = True
    #: W-only: no activation quantization (no tables, no PTS)
    weight_only: bool = False
    #: layers kept FP besides the time-embedding MLP, the last layer (conv_out) and the input
    #: layer (``@input``: conv_in, found from the traced graph), which are FP whatever this says
    fp_layers: list[str] = field(default_factory=lambda: list(DEFAULT_FP_LAYERS))
    #: exact (unknown timesteps raise) | nearest (§1.7)
    timestep_lookup: str = "exact"

    # -- calibration data (select_calibration)
    #: trajectories per step
    cali_n: int = 256
    #: None = every step of the trajectories (all_steps); a number = that many uniformly spaced steps
    cali_st: int | None = None
    calib_seed: int = 0
    #: the official code's fresh noise per step: not supported by the one-pass capture
    independent_trajectories_per_step: bool = False

    # -- LES (§5.1) and timestep weighting (§5.2)
    les: bool = True
    #: layer (each layer's τ against its own float output; the paper's) | block (the τ of a
    #: reconstruction block's layers learned jointly against the block's float output)
    les_scope: str = default_of(LESStageOptions, "scope")
    les_iters: int = default_of(LESStageOptions, "iters")
    les_lr: float = default_of(LESStageOptions, "lr")
    #: focal | linear | quadratic | uniform
    time_weight: str = default_of(LESStageOptions, "time_weight")
    alpha: float = default_of(LESStageOptions, "alpha")
    momentum: float = default_of(LESStageOptions, "momentum")
    #: SmoothQuant baseline (§5.1, §8 smoothquant_baseline(alpha)): None = off; α in [0, 1] sets
    #: τ_c = max|X_c|^α / max|W_c|^(1−α) (float calibration inputs) on every layer LES would
    #: cover instead of learning it. It replaces LES, so it needs les=False (both set: ConfigError)
    smoothquant_alpha: float | None = None

    # -- weight reconstruction (§5.3)
    weight_recon: bool = True
    #: block | layer
    recon_granularity: str = "block"
    #: execution | registration (official)
    unit_order: str = "execution"
    iters_w: int = default_of(AdaRoundOptions, "iters")
    #: batch of the LES and the weight pass
    batch_size: int = default_of(AdaRoundOptions, "batch_size")
    lr_w: float = default_of(AdaRoundOptions, "lr")
    round_reg_weight: float = default_of(AdaRoundOptions, "reg_weight")
    beta_start: float = default_of(AdaRoundOptions, "beta_start")
    beta_end: float = default_of(AdaRoundOptions, "beta_end")
    warmup: float = default_of(AdaRoundOptions, "warmup")

    # -- activations (§5.3)
    #: one activation table row per calibration step (False: one set shared by all steps)
    per_step_acts: bool = default_of(StepTablesOptions, "per_step")
    act_init_n: int = default_of(StepTablesOptions, "init_n")
    act_batch: int = default_of(StepTablesOptions, "batch")
    act_momentum: float = default_of(StepTablesOptions, "momentum")

    # -- PTS (§5.3)
    #: off | mse | vote
    pts: str = "vote"
    pts_kappa: float = default_of(PTSOptions, "kappa")
    pts_D: int = default_of(PTSOptions, "D")
    #: the PTS layers (@roles or name globs); "skip_connection" = @shortcut, "all" = every layer
    pts_layers: list[str] = default_of(PTSOptions, "layers")
    #: factors per calibration step (official) or one static vote over all steps
    pts_per_step: bool = default_of(PTSOptions, "per_step")

    # -- export
    #: exporters fold τ into W and the activation quantizer (export.fold_input_scales); the
    #: calibrated model itself always keeps τ explicit
    fold_les: bool = True

    # -- engine (EngineSettings' defaults)
    seed: int = default_of(EngineSettings, "seed")
    cache_dtype: str = default_of(EngineSettings, "cache_dtype")
    cache_storage: str = default_of(EngineSettings, "cache_storage")
    cache_memory_mb: float = default_of(EngineSettings, "cache_memory_mb")
    eval_samples: int = default_of(EngineSettings, "eval_samples")
    official: bool = False

    def __post_init__(self) -> None:
        self.fp_layers = _globs("fp_layers", self.fp_layers, {})
        self.pts_layers = _globs("pts_layers", self.pts_layers,
                                 {"skip_connection": DEFAULT_PTS_LAYERS, "all": ["*"]})
        choices = {"time_weight": TIME_WEIGHTS, "pts": PTS_MODES, "les_scope": LES_SCOPES,
                   "recon_granularity": GRANULARITIES, "unit_order": UNIT_ORDERS, "timestep_lookup": LOOKUP_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.independent_trajectories_per_step:
            raise ConfigError(
                "independent_trajectories_per_step=True (the official DMQ code's fresh noise per calibration "
                "step, O(K²) sampling) is not supported: diffquant's capture records all steps in one pass "
                "per trajectory batch (calib.capture); leave it False")
        for name in ("cali_n", "batch_size", "act_init_n", "act_batch", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cali_st is not None and self.cali_st < 1:
            raise ConfigError(f"cali_st must be >= 1 or null (all steps), got {self.cali_st}")
        for name in ("les_iters", "iters_w", "pts_D"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("les_lr", "lr_w", "alpha", "round_reg_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("momentum", "act_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.pts_kappa <= 1.0:
            raise ConfigError(f"pts_kappa must be in [0, 1], got {self.pts_kappa}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup}")
        self._check_smoothquant()
        CacheOptions(dtype=self.cache_dtype, storage=self.cache_storage, memory_limit_mb=self.cache_memory_mb)

    def _check_smoothquant(self) -> None:
        a = self.smoothquant_alpha
        if a is None:
            return
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise ConfigError(f"smoothquant_alpha must be a number in [0, 1] or null (off), got {a!r}")
        if not 0.0 <= a <= 1.0:
            raise ConfigError(f"smoothquant_alpha must be in [0, 1], got {a}")
        if self.les:
            raise ConfigError(
                "smoothquant_alpha replaces LES's learned τ with SmoothQuant's fixed τ, so the two are exclusive: "
                "set les=False to run the SmoothQuant baseline, or smoothquant_alpha=None to learn τ")
        self.smoothquant_alpha = float(a)

    @property
    def recipe_name(self) -> str:
        return "dmq_official" if self.official else "dmq"

    # ------------------------------------------------------------------ as stages
    def to_recipe(self) -> Recipe:
        """These knobs as the stage list of the ``dmq`` preset (``recipes/presets``)."""
        if self.cali_st is None:
            selection = AllStepsSelection(cali_n=self.cali_n)
        else:
            selection = UniformSelection(cali_st=self.cali_st, cali_n=self.cali_n)
        stages = [
            selection,
            Wrap(split=self.split, attn_matmul=False, weight_grid="asymmetric", act_grid="asymmetric",
                 time_embedding="fp", timestep_lookup=self.timestep_lookup, weight_only=self.weight_only,
                 rules=[LayerRule(p, weight_bits=32, act_bits=32)
                        for p in dict.fromkeys(["@last", "@input", *self.fp_layers])]),
        ]
        if self.smoothquant_alpha is not None:
            stages.append(SmoothQuant(alpha=self.smoothquant_alpha))
        elif self.les:
            stages.append(LES(scope=self.les_scope, iters=self.les_iters, lr=self.les_lr, batch_size=self.batch_size,
                              time_weight=self.time_weight, alpha=self.alpha, momentum=self.momentum))
        stages.append(RoundToNearest(policy="lp_shrink"))
        if self.weight_recon:
            stages.append(AdaRound(iters=self.iters_w, batch_size=self.batch_size, lr=self.lr_w, p=2.0,
                                   reg_weight=self.round_reg_weight, beta_start=self.beta_start,
                                   beta_end=self.beta_end, warmup=self.warmup, granularity=self.recon_granularity,
                                   unit_order=self.unit_order))
        stages.append(StepTables(per_step=self.per_step_acts, init_n=self.act_init_n, batch=self.act_batch,
                                 momentum=self.act_momentum))
        if self.pts != "off":
            stages.append(PTS(mode=self.pts, kappa=self.pts_kappa, D=self.pts_D, layers=self.pts_layers,
                              per_step=self.pts_per_step))
        engine = EngineSettings(seed=self.seed, cache_dtype=self.cache_dtype, cache_storage=self.cache_storage,
                                cache_memory_mb=self.cache_memory_mb, eval_samples=self.eval_samples)
        return Recipe(self.recipe_name, stages, engine, description=_DESCRIPTION[self.official])

    def wrap_config(self, quant: QuantConfig) -> QuantConfig:
        """``quant`` with DMQ's coverage and grids (a new object): time-embedding MLP, last layer
        and ``fp_layers`` FP, attention matmuls FP, split, asymmetric grids, ``lp_shrink``
        weights, ``minmax`` activations, the timestep lookup mode."""
        return self.to_recipe().wrap_config(quant)

    def select_calibration(self, cache: TrajectoryCache) -> CalibrationSet:
        """``cali_n`` trajectories at every step (``all_steps``), or at ``cali_st`` uniformly
        spaced steps; counts above what the cache holds are reduced with a warning."""
        return self.to_recipe().select(cache)


_DESCRIPTION = {
    False: "DMQ (arXiv 2507.12933): LES with adaptive timestep weighting, per-step tables, PTS by voting",
    True: "DMQ with the official code's switches (registration unit order, unfolded τ)",
}


@dataclass
class DMQOfficialConfig(DMQConfig):
    """``dmq_official``: the official code's switches the library reproduces (docs/methods.md §5.5)."""

    unit_order: str = "registration"
    fold_les: bool = False
    official: bool = True


# ---------------------------------------------------------------------- model preparation
@torch.no_grad()
def use_activation_tables(qmodel: QuantModel, schedule: list[int] | None) -> None:
    """Rebuild every activation quantizer for DMQ: one table row per timestep of ``schedule``
    (None: a single shared row), ``minmax`` without zero widening and with an unclamped zero
    point, uncalibrated. Sets the model's timestep schedule (saved in the plan)."""
    rows = len(schedule) if schedule else 1
    for name, q in qmodel.quantizers("act").items():
        new = UniformQuantizer(q.bits, grid=q.grid, init="minmax", num_steps=rows, include_zero=False,
                               clamp_zero_point=False, momentum=q.momentum, init_options=q.init_options)
        new = new.to(q.step.device)
        new.enabled = q.enabled
        new.timestep_index = qmodel.timestep_index
        replace_module(qmodel.model, name, new)
    if schedule:
        qmodel.set_timesteps(schedule)
    else:
        qmodel.timestep_index.set_timesteps([])
        qmodel.plan.timesteps = None


def pts_layer_names(qmodel: QuantModel, patterns: list[str]) -> list[str]:
    """Layers (execution order) matching ``patterns`` whose input is quantized."""
    out = []
    layers = qmodel.layers()
    for lp in qmodel.plan.layers:
        if not any(rule_applies(p, lp.name, lp.roles) for p in patterns):
            continue
        layer = layers[lp.name]
        if lp.quantize_input and any(q.active for q in layer.act_quantizers):
            out.append(lp.name)
    return out


def use_pts_quantizers(qmodel: QuantModel, names: list[str]) -> None:
    """Swap the input quantizers of ``names`` (both split halves) for :class:`PTSQuantizer`s
    with factors 1 (the same quantization until :func:`apply_pts` sets them)."""
    layers = qmodel.layers()
    for name in names:
        layer = layers[name]
        sizes = [layer.in_channels] if layer.split is None else [layer.split, layer.in_channels - layer.split]
        for i, (q, channels) in enumerate(zip(list(layer.act_quantizers), sizes)):
            if isinstance(q, PTSQuantizer):
                continue
            replace_module(qmodel.model, f"{name}.act_quantizers.{i}", PTSQuantizer.from_quantizer(q, layer.act_axis, channels))


# ---------------------------------------------------------------------- activation calibration
def _step_groups(buckets: Tensor, per_step: bool, num_rows: int) -> list[tuple[str, int | None, Tensor]]:
    """(name, table row, sample indices) per calibration step; with a shared table or a static
    choice one group of every sample whose result goes to every row (row None)."""
    if not per_step or num_rows == 1:
        return [("shared", None, torch.arange(buckets.numel()))]
    groups = []
    for k in range(num_rows):
        index = torch.nonzero(buckets == k).reshape(-1)
        if index.numel() == 0:
            raise DiffquantError(f"calibration step {k} has no samples")
        groups.append((f"step{k}", k, index))
    return groups


def _run(data: CalibrationCalls, model: nn.Module, batch: int, one_t: bool) -> None:
    for index in data.slices(batch, one_t):
        data.run(model, index)


@torch.no_grad()
def calibrate_step(qmodel: QuantModel, data: CalibrationCalls, row: int | None, generator: torch.Generator, *,
                   init_n: int = 16, batch: int = 16, momentum: float = 0.95) -> None:
    """§5.3 activation calibration of one table row (``row``; None: every row of a shared table)
    on the samples of ``data``: reset, ``minmax`` on ``init_n`` random samples, then
    ema_minmax(``momentum``) over all of them in batches of ``batch``."""
    acts = [q for q in qmodel.quantizers("act").values() if q.active]
    rows = slice(None) if row is None else row
    saved = [(q.init, q.momentum) for q in acts]
    for q in acts:
        q.initialized[rows] = False
        q.batches_seen[rows] = 0
    one_t = one_timestep(qmodel)
    init = torch.randperm(len(data), generator=generator)[:init_n].sort().values
    try:
        with quant_state(qmodel, weights=True, acts=True):
            for q in acts:
                q.init, q.mode = "minmax", "observe"
            _run(data.subset(init), qmodel, init_n, one_t)
            for q in acts:
                q.init, q.momentum = "ema_minmax", momentum
            _run(data, qmodel, batch, one_t)
    finally:
        for q, (init_policy, mom) in zip(acts, saved):
            q.init, q.momentum, q.mode = init_policy, mom, "quantize"


def _disable_unreached(qmodel: QuantModel) -> None:
    for name, q in qmodel.quantizers("act").items():
        if q.active and not bool(q.initialized.any()):
            q.enabled = False  # never called by the calibration data (e.g. an FP-input layer)
        elif q.active and not bool(q.initialized.all()):
            raise DiffquantError(f"{name}: some activation table rows were never calibrated")


def calibrate_activations(qmodel: QuantModel, data: CalibrationCalls, buckets: Tensor, options: "StepTablesOptions",
                          seed: int = 0, *, progress: ReconProgress | None = None, bar: bool = True,
                          ) -> list[UnitRecord]:
    """Per-step (or shared) activation calibration, one checkpoint per row."""
    num_rows = max(1, len(qmodel.timestep_index.timesteps))
    groups = _step_groups(buckets, options.per_step, num_rows)
    names = [g[0] for g in groups]
    done = progress.finished_units("acts", names) if progress is not None else 0
    records = [UnitRecord(**r) for r in progress.records("acts")[:done]] if progress is not None else []
    qmodel.eval()
    with tqdm(total=len(groups), initial=done, desc="calibrate activations", disable=not bar, leave=False) as pbar:
        for i, (name, row, index) in enumerate(groups[done:], start=done):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            calibrate_step(qmodel, data.subset(index), row, gen, init_n=options.init_n, batch=options.batch,
                           momentum=options.momentum)
            records.append(UnitRecord(name, "step", "acts", 0, None, None))
            if progress is not None:
                progress.save(qmodel, "acts", i, names, [r.to_dict() for r in records])
            pbar.update(1)
    _disable_unreached(qmodel)
    return records


# ---------------------------------------------------------------------- PTS
@torch.no_grad()
def pts_for_layer(qmodel: QuantModel, name: str, data: CalibrationCalls, groups: list[tuple[str, int | None, Tensor]],
                  options: "PTSOptions", batch_size: int = 64) -> None:
    """Set the PTS factors of layer ``name`` (both halves): one vote per group of samples, whose
    result goes into the group's table row (its step; row None: every row, a static vote). The
    model runs quantized up to the layer, with earlier layers' factors on."""
    layer: QuantLayer = qmodel.layers()[name]
    quantizers = list(layer.act_quantizers)
    if not all(isinstance(q, PTSQuantizer) for q in quantizers):
        raise DiffquantError(f"{name}: PTS needs PTSQuantizer inputs (use_pts_quantizers)")
    one_t = one_timestep(qmodel)
    for _, row, index in groups:
        stats = [PTSStatistics(q.pts_channels, options.D) for q in quantizers]

        def vote(q, stat):
            def hook(module, args):
                x = args[0]
                k = module.row()
                stat.add(x, module.step[k], module.zero_point[k], module.spec.qmin, module.spec.qmax,
                         channel_axis=module.pts_axis)
            return hook

        handles = [q.register_forward_pre_hook(vote(q, s)) for q, s in zip(quantizers, stats)]
        handles.append(stop_after(layer))
        subset = data.subset(index)
        try:
            with quant_state(qmodel, weights=True, acts=True):
                for sl in subset.slices(batch_size, one_t):
                    run_stoppable(subset.run, qmodel, sl)
        finally:
            for h in handles:
                h.remove()
        rows = slice(None) if row is None else row
        for q, stat in zip(quantizers, stats):
            if stat.samples == 0:
                raise DiffquantError(f"{name}: the calibration data never reached its input quantizer")
            q.multiplier[rows] = stat.multipliers(options.mode, options.kappa).to(q.multiplier)
    layer.clear_cache()


def apply_pts(qmodel: QuantModel, names: list[str], data: CalibrationCalls, buckets: Tensor, options: "PTSOptions",
              *, progress: ReconProgress | None = None, bar: bool = True) -> list[UnitRecord]:
    """PTS over ``names`` in execution order, one checkpoint per layer."""
    num_rows = max(1, len(qmodel.timestep_index.timesteps))
    groups = _step_groups(buckets, options.per_step, num_rows)
    done = progress.finished_units("pts", names) if progress is not None else 0
    records = [UnitRecord(**r) for r in progress.records("pts")[:done]] if progress is not None else []
    qmodel.eval()
    with tqdm(total=len(names), initial=done, desc="PTS", disable=not bar, leave=False) as pbar:
        for i, name in enumerate(names[done:], start=done):
            pts_for_layer(qmodel, name, data, groups, options)
            refined = sum(int((q.multiplier < 1).sum()) for q in qmodel.layers()[name].act_quantizers)
            log.info("PTS %s: %d (row, channel) factors below 1", name, refined)
            records.append(UnitRecord(name, "layer", "pts", 0, None, None))
            if progress is not None:
                progress.save(qmodel, "pts", i, names, [r.to_dict() for r in records])
            pbar.update(1)
    return records


# ---------------------------------------------------------------------- stages
def _attach_scales(qmodel: QuantModel, ctx: StageContext) -> list[str]:
    names = les_layers(qmodel)
    layers = qmodel.layers()
    for name in names:
        if layers[name].input_scale is None:
            attach_input_scale(layers[name])
    ctx.shared["les_layers"] = names
    return names


@STAGES.register("les")
class LES(Stage):
    """DMQ's learned equivalent scaling τ per input channel, with adaptive timestep weighting (§5.1, §5.2)."""

    family = "scaling"
    Options = LESStageOptions
    provides = frozenset({"input_scales"})
    before = frozenset({"weights_init"})
    uses_calib_set = True
    pass_names = ("les",)

    def prepare(self, qmodel, ctx: StageContext) -> None:
        _attach_scales(qmodel, ctx)

    def run(self, qmodel, ctx: StageContext) -> None:
        o = self.options
        options = settings_of(LESOptions, o, dict(seed=ctx.engine.seed, device=ctx.device, progress=ctx.progress,
                                                  eval_samples=ctx.engine.eval_samples, cache=ctx.cache_options()))
        ctx.records += run_les(qmodel, ctx.data, ctx.buckets(), len(ctx.schedule()), options,
                               layers=ctx.shared["les_layers"], fp_model=ctx.fp_model, progress=ctx.checkpoints)


@dataclass
@checked
class SmoothQuantOptions:
    alpha: float = knob(0.5, le=1, doc="τ_c = max|X_c|^α / max|W_c|^(1−α) from the float calibration inputs")


@STAGES.register("smoothquant")
class SmoothQuant(Stage):
    """SmoothQuant's fixed per-channel scales in LES's slot (the baseline of §5.1)."""

    family = "scaling"
    Options = SmoothQuantOptions
    provides = frozenset({"input_scales"})
    before = frozenset({"weights_init"})
    uses_calib_set = True
    pass_names = (SMOOTHQUANT_PASS,)

    def prepare(self, qmodel, ctx: StageContext) -> None:
        _attach_scales(qmodel, ctx)

    def run(self, qmodel, ctx: StageContext) -> None:
        ctx.records += run_smoothquant(qmodel, ctx.data, self.options.alpha, layers=ctx.shared["les_layers"],
                                       fp_model=ctx.fp_model, batch_size=ctx.cache_options().batch_size,
                                       progress=ctx.checkpoints)


@STAGES.register("step_tables")
class StepTables(Stage):
    """DMQ's per-timestep activation tables: per step, minmax on a few samples then EMA over the step (§5.3)."""

    family = "activation_init"
    Options = StepTablesOptions
    provides = frozenset({"acts_init", "act_tables"})
    before = frozenset({"acts_learned", "finetuned"})
    uses_calib_set = True
    pass_names = ("acts",)

    def active(self, qmodel) -> bool:
        return acts_quantized(qmodel)

    def prepare(self, qmodel, ctx: StageContext) -> None:
        use_activation_tables(qmodel, ctx.schedule() if self.options.per_step else None)

    def run(self, qmodel, ctx: StageContext) -> None:
        ctx.records += calibrate_activations(qmodel, ctx.data, ctx.buckets(), self.options, ctx.engine.seed,
                                             progress=ctx.checkpoints, bar=ctx.progress)


@STAGES.register("pts")
class PTS(Stage):
    """DMQ's channel-wise power-of-two activation scaling, chosen layer by layer by voting (§5.3)."""

    family = "pts"
    Options = PTSOptions
    requires = frozenset({"acts_init"})
    provides = frozenset({"pts"})
    before = frozenset({"finetuned"})
    uses_calib_set = True
    pass_names = ("pts",)

    def active(self, qmodel) -> bool:
        return acts_quantized(qmodel)

    def prepare(self, qmodel, ctx: StageContext) -> None:
        names = pts_layer_names(qmodel, self.options.layers)
        if not names:
            warnings.warn(f"no layer matches pts layers={self.options.layers}; PTS does nothing", stacklevel=2)
        use_pts_quantizers(qmodel, names)
        ctx.shared["pts_layers"] = names

    def run(self, qmodel, ctx: StageContext) -> None:
        names = ctx.shared["pts_layers"]
        if names:
            ctx.records += apply_pts(qmodel, names, ctx.data, ctx.buckets(), self.options,
                                     progress=ctx.checkpoints, bar=ctx.progress)


# ---------------------------------------------------------------------- the recipe
def run_dmq(
    qmodel: QuantModel,
    forward_loop: ForwardLoop | None = None,
    config: DMQConfig | None = None,
    *,
    calib_set: CalibrationSet | None = None,
    call: DenoiserCall | None = None,
    fp_model: nn.Module | None = None,
    work_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> QuantModel:
    """Calibrate ``qmodel`` in place with DMQ (the module docstring gives the stages).

    Args:
        forward_loop: unused (DMQ needs the calibration set itself: its timesteps key the
            activation tables); accepted for the common recipe signature.
        calib_set: the calibration inputs (x_t, t, labels, steps), e.g. from
            :meth:`DMQConfig.select_calibration`; for CFG models with each (x_t, t) once with its
            label and once with the null label (:meth:`CalibrationSet.with_uncond`).
        call: ``call(model, x, t, labels)`` runs the denoiser (e.g. ``bundle.predict_noise``).
        fp_model: the float model (same module names) for LES inputs/targets (SmoothQuant's
            input maxima), x_in^fp and y^fp; default: ``qmodel`` with quantization switched off.
        work_dir: checkpoints after every LES layer (block), SmoothQuant, every weight unit,
            calibrated step and PTS layer go to ``<work_dir>/progress``; a run with the same
            ``work_dir`` and settings resumes there.
    """
    config = config or DMQConfig()
    if calib_set is None:
        raise ConfigError("DMQ needs the calibration set (its timesteps key the per-step tables): pass calib_set=")
    ctx = StageContext(calib_set=calib_set, call=call, fp_model=fp_model, forward_loop=forward_loop,
                       work_dir=work_dir, device=device, progress=progress)
    return run_recipe(qmodel, config.to_recipe(), ctx, recipe_config=config)


__all__ = [
    "DEFAULT_FP_LAYERS",
    "DEFAULT_PTS_LAYERS",
    "DMQConfig",
    "DMQOfficialConfig",
    "apply_pts",
    "calibrate_activations",
    "calibrate_step",
    "pts_for_layer",
    "pts_layer_names",
    "run_dmq",
    "use_activation_tables",
    "use_pts_quantizers",
]
