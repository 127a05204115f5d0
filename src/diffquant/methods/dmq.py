"""DMQ (METHODS.md §5): learned equivalent scaling, adaptive timestep weighting, per-step
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

import dataclasses
import fnmatch
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calib.cache import TrajectoryCache
from ..calib.select import CalibrationSet, all_steps, uniform
from ..config import LayerRule, QuantConfig, checked, knob
from ..errors import ConfigError, DiffquantError
from ..model.qmodel import QuantModel
from ..nn.layers import QuantLayer, attach_input_scale
from ..quant.pts import PTS_SELECTIONS, PTSStatistics
from ..quant.quantizer import UniformQuantizer
from ..quant.timestep import LOOKUP_MODES
from ..quant.variants import PTSQuantizer, replace_module
from ..recon.cache import CacheOptions, CalibrationCalls, DenoiserCall
from ..recon.engine import EngineOptions, UnitRecord, reconstruct
from ..recon.les import LES_SCOPES, SMOOTHQUANT_PASS, LESOptions, les_layers, run_les, run_smoothquant
from ..recon.passes import AdaRoundPass
from ..recon.progress import ReconProgress
from ..recon.state import quant_state
from ..recon.time_weight import TIME_WEIGHTS, calibration_schedule, timestep_buckets
from ..recon.units import GRANULARITIES, UNIT_ORDERS, make_units
from .qdiffusion import _fit
from .stages import ForwardLoop, finish_recipe, init_weight_quantizers, recipe_fingerprint

log = logging.getLogger("diffquant.methods")

PASSES = ["les", SMOOTHQUANT_PASS, "weights", "acts", "pts"]
PTS_MODES = ("off",) + PTS_SELECTIONS
#: residual shortcut convs: diffusers ``conv_shortcut``, CompVis ``skip_connection``, DDIM
#: ``nin_shortcut``, mnist-resunet ``residual_conv``
DEFAULT_PTS_LAYERS = ["*shortcut*", "*skip*", "*residual_conv*"]
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


@dataclass
@checked
class DMQConfig:
    """All knobs of DMQ (METHODS.md §5, ablation switches §8); defaults = the library's."""

    # -- wrapping (wrap_config) and coverage (§1.10)
    split: bool = True
    #: W-only: no activation quantization (no tables, no PTS)
    weight_only: bool = False
    #: layers kept FP besides the time-embedding MLP and the last layer (conv_out); the first
    #: executed layer outside the time embedding (conv_in) is kept FP whatever its name
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
    les_scope: str = "layer"
    les_iters: int = 6000
    les_lr: float = knob(1e-3, gt=0)
    #: focal | linear | quadratic | uniform
    time_weight: str = "focal"
    alpha: float = 20.0
    momentum: float = 0.95
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
    iters_w: int = 20000
    #: batch of the LES and the weight pass
    batch_size: int = 32
    lr_w: float = knob(1e-3, gt=0)
    round_reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2

    # -- activations (§5.3)
    #: one activation table row per calibration step (False: one set shared by all steps)
    per_step_acts: bool = True
    act_init_n: int = 16
    act_batch: int = 16
    act_momentum: float = 0.95

    # -- PTS (§5.3)
    #: off | mse | vote
    pts: str = "vote"
    pts_kappa: float = 0.85
    pts_D: int = 3
    #: name globs of the PTS layers; "skip_connection" = the default shortcut convs, "all" = every layer
    pts_layers: list[str] = field(default_factory=lambda: list(DEFAULT_PTS_LAYERS))
    #: factors per calibration step (official) or one static vote over all steps
    pts_per_step: bool = True

    # -- export
    #: exporters fold τ into W and the activation quantizer (export.fold_input_scales); the
    #: calibrated model itself always keeps τ explicit
    fold_les: bool = True

    # -- engine
    seed: int = 0
    cache_dtype: str = "float32"
    cache_storage: str = "auto"
    cache_memory_mb: float = 4096.0
    eval_samples: int = 256
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

    # ------------------------------------------------------------------ wrapping
    def wrap_config(self, quant: QuantConfig) -> QuantConfig:
        """``quant`` with DMQ's coverage and grids (a new object): time-embedding MLP, last layer
        and ``fp_layers`` FP, attention matmuls FP, split, asymmetric grids, ``lp_shrink``
        weights, ``minmax`` activations, the timestep lookup mode."""
        fp = [LayerRule("@last", weight_bits=32, act_bits=32)]
        fp += [LayerRule(p, weight_bits=32, act_bits=32) for p in self.fp_layers]
        quant = dataclasses.replace(
            quant,
            split=self.split,
            attn_matmul=False,
            weight_init="lp_shrink",
            act_init="minmax",
            weight_grid="asymmetric",
            act_grid="asymmetric",
            time_embedding="fp",
            rules=list(quant.rules) + [r for r in fp if r not in quant.rules],
            timestep_lookup=self.timestep_lookup,
            quantize_acts=False if self.weight_only else quant.quantize_acts,
        )
        quant.__post_init__()
        return quant

    # ------------------------------------------------------------------ calibration data
    def select_calibration(self, cache: TrajectoryCache) -> CalibrationSet:
        """``cali_n`` trajectories at every step (``all_steps``), or at ``cali_st`` uniformly
        spaced steps; counts above what the cache holds are reduced with a warning."""
        n = _fit("cali_n", self.cali_n, cache.num_samples, "trajectories")
        if self.cali_st is None:
            return all_steps(cache, n)
        return uniform(cache, n_per_step=n, n_steps=_fit("cali_st", self.cali_st, cache.num_steps, "steps"))


@dataclass
class DMQOfficialConfig(DMQConfig):
    """``dmq_official``: the official code's switches the library reproduces (METHODS.md §5.5)."""

    unit_order: str = "registration"
    fold_les: bool = False
    official: bool = True


# ---------------------------------------------------------------------- model preparation
def _check_wrapping(qmodel: QuantModel, config: DMQConfig) -> None:
    expected = config.wrap_config(dataclasses.replace(qmodel.quant_config))
    fields = ("split", "attn_matmul", "weight_init", "act_init", "act_grid", "weight_grid", "time_embedding",
              "quantize_acts", "rules")
    differ = [f for f in fields if getattr(expected, f) != getattr(qmodel.quant_config, f)]
    if differ:
        warnings.warn(
            f"the model was wrapped with other {', '.join(differ)} than this DMQ config asks for; "
            "wrap it with DMQConfig.wrap_config(quant_config) to get DMQ's coverage", stacklevel=3)


def keep_first_layer_fp(qmodel: QuantModel) -> str | None:
    """DMQ keeps conv_in FP: the layer named ``conv_in``, else the first executed layer outside the
    time embedding (e.g. CompVis ``input_blocks.0.0``). Plan and quantizers are changed in place
    (a saved model reloads with it). Returns the layer's name."""
    plans = qmodel.plan.layers
    names = [lp.name for lp in plans]
    if not names:
        return None
    first = "conv_in" if "conv_in" in names else next(
        (lp.name for lp in plans if "time_embedding" not in lp.roles), None)
    if first is None:
        return None
    plan, layer = qmodel.plan.layer(first), qmodel.layers()[first]
    plan.weight_bits = plan.act_bits = 32
    for q in list(layer.weight_quantizers) + list(layer.act_quantizers):
        q.set_bits(32)
    layer.clear_cache()
    return first


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
        if not any(fnmatch.fnmatchcase(lp.name, p) for p in patterns):
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
def calibrate_step(qmodel: QuantModel, data: CalibrationCalls, config: DMQConfig, row: int | None,
                   generator: torch.Generator) -> None:
    """§5.3 activation calibration of one table row (``row``; None: every row of a shared table)
    on the samples of ``data``: reset, ``minmax`` on ``act_init_n`` random samples, then
    ema_minmax over all of them in batches of ``act_batch``."""
    acts = [q for q in qmodel.quantizers("act").values() if q.active]
    rows = slice(None) if row is None else row
    saved = [(q.init, q.momentum) for q in acts]
    for q in acts:
        q.initialized[rows] = False
        q.batches_seen[rows] = 0
    one_t = bool(qmodel.timestep_index.timesteps)
    init = torch.randperm(len(data), generator=generator)[:config.act_init_n].sort().values
    try:
        with quant_state(qmodel, weights=True, acts=True):
            for q in acts:
                q.init, q.mode = "minmax", "observe"
            _run(data.subset(init), qmodel, config.act_init_n, one_t)
            for q in acts:
                q.init, q.momentum = "ema_minmax", config.act_momentum
            _run(data, qmodel, config.act_batch, one_t)
    finally:
        for q, (init_policy, momentum) in zip(acts, saved):
            q.init, q.momentum, q.mode = init_policy, momentum, "quantize"


def _disable_unreached(qmodel: QuantModel) -> None:
    for name, q in qmodel.quantizers("act").items():
        if q.active and not bool(q.initialized.any()):
            q.enabled = False  # never called by the calibration data (e.g. an FP-input layer)
        elif q.active and not bool(q.initialized.all()):
            raise DiffquantError(f"{name}: some activation table rows were never calibrated")


def calibrate_activations(qmodel: QuantModel, calib_set: CalibrationSet, data: CalibrationCalls, buckets: Tensor,
                          config: DMQConfig, *, progress: ReconProgress | None = None, bar: bool = True,
                          ) -> list[UnitRecord]:
    """Per-step (or shared) activation calibration, one checkpoint per row."""
    num_rows = max(1, len(qmodel.timestep_index.timesteps))
    groups = _step_groups(buckets, config.per_step_acts, num_rows)
    names = [g[0] for g in groups]
    done = progress.finished_units("acts", names) if progress is not None else 0
    records = [UnitRecord(**r) for r in progress.records("acts")[:done]] if progress is not None else []
    qmodel.eval()
    with tqdm(total=len(groups), initial=done, desc="calibrate activations", disable=not bar, leave=False) as pbar:
        for i, (name, row, index) in enumerate(groups[done:], start=done):
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + i)
            calibrate_step(qmodel, data.subset(index), config, row, gen)
            records.append(UnitRecord(name, "step", "acts", 0, None, None))
            if progress is not None:
                progress.save(qmodel, "acts", i, names, [r.to_dict() for r in records])
            pbar.update(1)
    _disable_unreached(qmodel)
    return records


# ---------------------------------------------------------------------- PTS
class _LayerDone(Exception):
    """Ends a PTS forward once the layer has run."""


@torch.no_grad()
def pts_for_layer(qmodel: QuantModel, name: str, data: CalibrationCalls, groups: list[tuple[str, int | None, Tensor]],
                  config: DMQConfig, batch_size: int = 64) -> None:
    """Set the PTS factors of layer ``name`` (both halves): one vote per group of samples, whose
    result goes into the group's table row (its step; row None: every row, a static vote). The model runs quantized up to the layer, with earlier layers' factors on."""
    layer: QuantLayer = qmodel.layers()[name]
    quantizers = list(layer.act_quantizers)
    if not all(isinstance(q, PTSQuantizer) for q in quantizers):
        raise DiffquantError(f"{name}: PTS needs PTSQuantizer inputs (use_pts_quantizers)")
    one_t = bool(qmodel.timestep_index.timesteps)
    for _, row, index in groups:
        stats = [PTSStatistics(q.pts_channels, config.pts_D) for q in quantizers]

        def vote(q, stat):
            def hook(module, args):
                x = args[0]
                k = module.row()
                stat.add(x, module.step[k], module.zero_point[k], module.spec.qmin, module.spec.qmax,
                         channel_axis=module.pts_axis)
            return hook

        def stop(module, args, output):
            raise _LayerDone

        handles = [q.register_forward_pre_hook(vote(q, s)) for q, s in zip(quantizers, stats)]
        handles.append(layer.register_forward_hook(stop))
        subset = data.subset(index)
        try:
            with quant_state(qmodel, weights=True, acts=True):
                for sl in subset.slices(batch_size, one_t):
                    try:
                        subset.run(qmodel, sl)
                    except _LayerDone:
                        pass
        finally:
            for h in handles:
                h.remove()
        rows = slice(None) if row is None else row
        for q, stat in zip(quantizers, stats):
            if stat.samples == 0:
                raise DiffquantError(f"{name}: the calibration data never reached its input quantizer")
            q.multiplier[rows] = stat.multipliers(config.pts, config.pts_kappa).to(q.multiplier)
    layer.clear_cache()


def apply_pts(qmodel: QuantModel, names: list[str], calib_set: CalibrationSet, data: CalibrationCalls,
              buckets: Tensor, config: DMQConfig, *, progress: ReconProgress | None = None, bar: bool = True,
              ) -> list[UnitRecord]:
    """PTS over ``names`` in execution order, one checkpoint per layer."""
    num_rows = max(1, len(qmodel.timestep_index.timesteps))
    groups = _step_groups(buckets, config.pts_per_step, num_rows)
    done = progress.finished_units("pts", names) if progress is not None else 0
    records = [UnitRecord(**r) for r in progress.records("pts")[:done]] if progress is not None else []
    qmodel.eval()
    with tqdm(total=len(names), initial=done, desc="PTS", disable=not bar, leave=False) as pbar:
        for i, name in enumerate(names[done:], start=done):
            pts_for_layer(qmodel, name, data, groups, config)
            refined = sum(int((q.multiplier < 1).sum()) for q in qmodel.layers()[name].act_quantizers)
            log.info("PTS %s: %d (row, channel) factors below 1", name, refined)
            records.append(UnitRecord(name, "layer", "pts", 0, None, None))
            if progress is not None:
                progress.save(qmodel, "pts", i, names, [r.to_dict() for r in records])
            pbar.update(1)
    return records


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
    _check_wrapping(qmodel, config)
    quant = qmodel.quant_config
    for p in qmodel.parameters():  # only what a stage trains gets gradients
        p.requires_grad_(False)

    # -- structure first (it must match a checkpoint before restoring it)
    keep_first_layer_fp(qmodel)
    schedule = calibration_schedule(calib_set.ts, calib_set.steps)
    buckets = timestep_buckets(calib_set.ts, schedule)
    acts = quant.quantize_acts and bool(qmodel.quantizers("act"))
    if acts:
        use_activation_tables(qmodel, schedule if config.per_step_acts else None)
    layers = qmodel.layers()
    smoothquant = config.smoothquant_alpha is not None
    les_names = les_layers(qmodel) if config.les or smoothquant else []
    for name in les_names:
        if layers[name].input_scale is None:
            attach_input_scale(layers[name])
    pts_names = pts_layer_names(qmodel, config.pts_layers) if acts and config.pts != "off" else []
    if acts and config.pts != "off" and not pts_names:
        warnings.warn(f"no layer matches pts_layers={config.pts_layers}; PTS does nothing", stacklevel=2)
    use_pts_quantizers(qmodel, pts_names)

    data = CalibrationCalls(calib_set, call, device)
    cache = CacheOptions(dtype=config.cache_dtype, storage=config.cache_storage, memory_limit_mb=config.cache_memory_mb,
                         directory=None if work_dir is None else str(Path(work_dir) / "unit_cache"))
    checkpoints = None
    if work_dir is not None:
        checkpoints = ReconProgress(work_dir, PASSES, recipe_fingerprint(qmodel, config, calib_set))
        checkpoints.restore(qmodel)

    records: list[UnitRecord] = []
    if les_names and smoothquant:
        records += run_smoothquant(qmodel, data, config.smoothquant_alpha, layers=les_names, fp_model=fp_model,
                                   batch_size=cache.batch_size, progress=checkpoints)
    elif les_names:
        les_options = LESOptions(
            iters=config.les_iters, batch_size=config.batch_size, lr=config.les_lr, time_weight=config.time_weight,
            alpha=config.alpha, momentum=config.momentum, scope=config.les_scope, seed=config.seed, device=device,
            eval_samples=config.eval_samples, cache=cache, progress=progress,
        )
        records += run_les(qmodel, data, buckets, len(schedule), les_options, layers=les_names, fp_model=fp_model,
                           progress=checkpoints)
    if not (checkpoints is not None and checkpoints.started("weights")):
        init_weight_quantizers(qmodel)  # lp_shrink per channel on W·τ
    if quant.quantize_weights and config.weight_recon:
        units = make_units(qmodel, config.recon_granularity, config.unit_order)
        options = EngineOptions(seed=config.seed, device=device, eval_samples=config.eval_samples,
                                progress=progress, cache=cache)
        weight_pass = AdaRoundPass(
            iters=config.iters_w, batch_size=config.batch_size, lr=config.lr_w, p=2.0,
            reg_weight=config.round_reg_weight, beta_start=config.beta_start, beta_end=config.beta_end,
            warmup=config.warmup,
        )
        records += reconstruct(qmodel, units, data, weight_pass, fp_model=fp_model, options=options,
                               progress=checkpoints)
    if acts:
        records += calibrate_activations(qmodel, calib_set, data, buckets, config, progress=checkpoints, bar=progress)
        if pts_names:
            records += apply_pts(qmodel, pts_names, calib_set, data, buckets, config, progress=checkpoints,
                                 bar=progress)

    return finish_recipe(qmodel, config.recipe_name, config, quant, records, work_dir)


__all__ = [
    "DEFAULT_FP_LAYERS",
    "DEFAULT_PTS_LAYERS",
    "DMQConfig",
    "DMQOfficialConfig",
    "apply_pts",
    "calibrate_activations",
    "calibrate_step",
    "keep_first_layer_fp",
    "pts_for_layer",
    "pts_layer_names",
    "run_dmq",
    "use_activation_tables",
    "use_pts_quantizers",
]
