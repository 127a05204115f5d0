"""Stages shared by several papers: calibration selection, wrapping, round-to-nearest weights,
AdaRound/BRECQ, activation range init and LSQ (docs/methods.md §1–§3).

Each stage is registered under its name (:data:`diffquant.recipes.STAGES`) with an option block
whose every knob has its one default here; the papers' presets (``recipes/presets``) set the
values they need.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calib.select import from_pairs, uniform, all_steps
from ..config import LayerRule, checked, default_of, knob
from ..errors import ConfigError
from ..model.qmodel import QuantModel
from ..quant.affine import validate_bits
from ..quant.ranges import validate_init_options, validate_policy
from ..recipes import STAGES, ForwardLoop, Stage, StageContext
from ..recon.cache import CalibrationCalls
from ..recon.engine import reconstruct
from ..recon.passes import AdaRoundPass, AdaRoundSettings, LSQPass, LSQSettings
from ..recon.units import make_units

Granularity = Literal["block", "layer"]
UnitOrder = Literal["execution", "registration"]
Pick = Literal["first", "random"]


# ---------------------------------------------------------------------- building blocks
@torch.no_grad()
def init_weight_quantizers(qmodel: QuantModel) -> None:
    """Initialise every weight quantizer from its own weight (part), under its init policy."""
    for layer in qmodel.layers().values():
        for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
            if not q.is_float:
                q.init_from(w.detach())
        layer.clear_cache()


@torch.no_grad()
def observe_activations(qmodel: QuantModel, forward_loop: ForwardLoop, *, weights: bool = True) -> None:
    """Run calibration data with every activation quantizer in ``observe`` mode.

    Ranges accumulate over all batches under each quantizer's init policy (``minmax``: the
    global min/max over all batches and timesteps); weights are quantized meanwhile unless
    ``weights=False``.
    """
    qmodel.eval()
    qmodel.set_quant_state(weights=weights, acts=True)
    for q in qmodel.quantizers("act").values():
        q.reset()
    qmodel.set_act_mode("observe")
    try:
        forward_loop(qmodel)
    finally:
        qmodel.set_act_mode("quantize")
    missing = [n for n, q in qmodel.quantizers("act").items() if q.active and not bool(q.initialized.all())]
    if missing:
        # a quantizer the calibration data never reached (e.g. an unused layer): keep it FP
        for name in missing:
            qmodel.quantizers("act")[name].enabled = False


def fit_count(name: str, wanted: int, available: int, what: str) -> int:
    """``wanted``, reduced (with a warning) to what the calibration cache holds."""
    if wanted > available:
        warnings.warn(f"{name}={wanted} but the calibration cache holds {available} {what}; using {available}",
                      stacklevel=3)
        return available
    return wanted


def calibration_loop(data: CalibrationCalls, batch_size: int, one_timestep: bool,
                     desc: str | None = None) -> ForwardLoop:
    """Every calibration call once, in batches; a progress bar titled ``desc`` unless it is None."""
    def loop(model: nn.Module) -> None:
        index_slices = list(data.slices(batch_size, one_timestep))
        for index in tqdm(index_slices, desc=desc, disable=desc is None, leave=False):
            data.run(model, index)

    return loop


def acts_quantized(qmodel: QuantModel) -> bool:
    return qmodel.quant_config.quantize_acts and bool(qmodel.quantizers("act"))


def one_timestep(qmodel: QuantModel) -> bool:
    """Batches must hold one timestep each (per-timestep tables)."""
    return bool(qmodel.timestep_index.timesteps)


RANGE_SEARCHES = ("auto", "symmetric_1d")


def configure_range_search(qmodel: QuantModel, mode: str = "auto") -> None:
    """``symmetric_1d``: every ``edadm_grid`` quantizer searches symmetric 1-D candidates (the
    official EDA-DM code's inverted flag); ``auto`` leaves the 1-D/2-D choice to the data's side."""
    if mode not in RANGE_SEARCHES:
        raise ConfigError(f"range_search must be one of {', '.join(RANGE_SEARCHES)}, got {mode!r}")
    for q in qmodel.quantizers().values():
        if q.init != "edadm_grid":
            continue
        options = {k: v for k, v in q.init_options.items() if k != "symmetric"}
        if mode == "symmetric_1d":
            options["symmetric"] = True
        q.init_options = validate_init_options(q.init, options)


# ---------------------------------------------------------------------- selection
class _Selection(Stage):
    family = "selection"
    provides = frozenset({"calibration_set"})


def _per_step(cache, steps: list[int], n: int, pick: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    all_steps_, all_ids = [], []
    for k in steps:
        ids = torch.arange(n) if pick == "first" else torch.randperm(cache.num_samples, generator=gen)[:n].sort().values
        all_steps_.append(torch.full((n,), k, dtype=torch.long))
        all_ids.append(ids)
    return from_pairs(cache, torch.cat(all_steps_), torch.cat(all_ids))


@dataclass
@checked
class UniformSelectionOptions:
    cali_st: int = knob(20, ge=1, doc="steps selected, uniformly spaced over the schedule")
    cali_n: int = knob(256, ge=1, doc="trajectories (samples) per selected step")
    pick: Pick = knob("first", doc="first | random trajectories per step")
    seed: int = knob(0, doc="seed of the random pick")


@STAGES.register("select_uniform")
class UniformSelection(_Selection):
    """Q-Diffusion's timestep-uniform calibration set: cali_st evenly spaced steps × cali_n samples (§3.1)."""

    Options = UniformSelectionOptions

    def select(self, cache):
        o = self.options
        n = fit_count("cali_n", o.cali_n, cache.num_samples, "trajectories")
        return uniform(cache, n_per_step=n, n_steps=fit_count("cali_st", o.cali_st, cache.num_steps, "steps"),
                       pick=o.pick, seed=o.seed)


@dataclass
@checked
class WindowSelectionOptions:
    where: Literal["first", "middle", "last"] = knob("last", doc="which run of consecutive steps")
    cali_st: int = default_of(UniformSelectionOptions, "cali_st", doc="consecutive steps selected")
    cali_n: int = default_of(UniformSelectionOptions, "cali_n")
    pick: Pick = default_of(UniformSelectionOptions, "pick")
    seed: int = default_of(UniformSelectionOptions, "seed")


@STAGES.register("select_window")
class WindowSelection(_Selection):
    """cali_st consecutive steps at the start, middle or end of the schedule (Q-Diffusion's first_n / middle_n / last_n ablations)."""

    Options = WindowSelectionOptions

    def select(self, cache):
        o = self.options
        k_total = cache.num_steps
        n = fit_count("cali_n", o.cali_n, cache.num_samples, "trajectories")
        count = fit_count("cali_st", o.cali_st, k_total, "steps")
        first = {"first": 0, "middle": (k_total - count) // 2, "last": k_total - count}[o.where]
        return _per_step(cache, list(range(first, first + count)), n, o.pick, o.seed)


@dataclass
@checked
class SingleStepOptions:
    step: int = knob(-1, ge=None, doc="the step (negative: from the end; -1 = the last)")
    cali_n: int = default_of(UniformSelectionOptions, "cali_n", doc="trajectories (samples) at that step")
    pick: Pick = default_of(UniformSelectionOptions, "pick", doc="first | random trajectories")
    seed: int = default_of(UniformSelectionOptions, "seed")


@STAGES.register("select_single_step")
class SingleStepSelection(_Selection):
    """All calibration samples from one step (Q-Diffusion's single_t ablation)."""

    Options = SingleStepOptions

    def check_calibration(self, steps: int) -> None:
        if not -steps <= self.options.step < steps:
            raise ConfigError(f"single_step={self.options.step} is outside the calibration schedule's {steps} steps "
                              f"(use 0..{steps - 1}, or -1 for the last)")

    def select(self, cache):
        o = self.options
        k_total = cache.num_steps
        if not -k_total <= o.step < k_total:
            raise ConfigError(f"single_step={o.step} outside the cache's {k_total} steps")
        n = fit_count("cali_n", o.cali_n, cache.num_samples, "trajectories")
        return _per_step(cache, [o.step % k_total], n, o.pick, o.seed)


@dataclass
@checked
class AllStepsOptions:
    cali_n: int | None = knob(None, ge=1, doc="trajectories per step (null: all captured)")


@STAGES.register("select_all_steps")
class AllStepsSelection(_Selection):
    """Every step of the captured trajectories, cali_n samples each (DMQ, MPQ-DM's pool)."""

    Options = AllStepsOptions

    def select(self, cache):
        n = self.options.cali_n
        n = None if n is None else fit_count("cali_n", n, cache.num_samples, "trajectories")
        return all_steps(cache, n)


@dataclass
@checked
class RandomSelectionOptions:
    n: int = knob(1024, ge=1, doc="(step, trajectory) pairs drawn without replacement")
    seed: int = knob(0, doc="seed of the draw")


@STAGES.register("select_random")
class RandomSelection(_Selection):
    """n (step, trajectory) pairs drawn uniformly at random from the captured trajectories."""

    Options = RandomSelectionOptions

    def select(self, cache):
        total = cache.num_steps * cache.num_samples
        n = fit_count("n", self.options.n, total, "(step, trajectory) pairs")
        flat = torch.randperm(total, generator=torch.Generator().manual_seed(self.options.seed))[:n].sort().values
        return from_pairs(cache, flat // cache.num_samples, flat % cache.num_samples)


# ---------------------------------------------------------------------- wrapping / coverage
@dataclass
@checked
class WrapOptions:
    split: bool | None = knob(None, doc="split-shortcut quantization of concatenated inputs (§1.9); null: the wrap config's")
    softmax_bits: int | None = knob(None, ge=2, doc="bits of the attention softmax output (16: FP); null: the wrap config's")
    attn_matmul: bool | None = knob(None, doc="quantize the attention act-to-act matmuls; null: the wrap config's")
    weight_grid: Literal["symmetric", "asymmetric"] | None = knob(None, doc="weight grid; null: the wrap config's")
    act_grid: Literal["symmetric", "asymmetric"] | None = knob(None, doc="activation grid; null: the wrap config's")
    time_embedding: str | None = knob(None, doc="time-embedding MLP treatment (e.g. fp); null: the wrap config's")
    timestep_lookup: str | None = knob(None, doc="exact | nearest per-timestep table lookup (§1.7); null: the wrap config's")
    weight_only: bool = knob(False, doc="no activation quantization (e.g. W4A32)")
    rules: list[LayerRule] = knob([], doc="coverage rules in order, a later one wins: {pattern: @role or glob, weight_bits, act_bits, at_least, quantize_input, skip} (§1.10)")

    def __post_init__(self) -> None:
        if self.softmax_bits is not None:
            validate_bits(self.softmax_bits, "softmax_bits")


@STAGES.register("wrap")
class Wrap(Stage):
    """Wrapping knobs and the coverage rules, fixed before the model is wrapped: every paper's
    choice of layers kept at higher precision is a rule list here (roles come from the plan)."""

    family = "coverage"
    Options = WrapOptions

    def wrap_overrides(self, quant) -> dict:
        o = self.options
        out = {k: getattr(o, k) for k in ("split", "softmax_bits", "attn_matmul", "weight_grid", "act_grid",
                                          "time_embedding", "timestep_lookup") if getattr(o, k) is not None}
        if o.weight_only:
            out["quantize_acts"] = False
        if o.rules:
            out["rules"] = list(o.rules)
        return out


# ---------------------------------------------------------------------- weights
@dataclass
@checked
class RTNOptions:
    policy: str | None = knob(None, doc="weight range policy: minmax | lp_shrink | edadm_grid; null: the wrap config's")
    range_search: Literal["auto", "symmetric_1d"] | None = knob(
        None, doc="edadm_grid candidates of every quantizer: auto (1-D/2-D by the data) | symmetric_1d (EDA-DM code)")

    def __post_init__(self) -> None:
        if self.policy is not None:
            validate_policy(self.policy)


@STAGES.register("rtn")
class RoundToNearest(Stage):
    """Every weight quantizer's range from its own weight (per channel); rounding to nearest."""

    family = "weight_init"
    Options = RTNOptions
    provides = frozenset({"weights_init"})
    before = frozenset({"weights_rounded", "finetuned"})

    def wrap_overrides(self, quant) -> dict:
        return {} if self.options.policy is None else {"weight_init": self.options.policy}

    def prepare(self, qmodel, ctx: StageContext) -> None:
        if self.options.range_search is not None:
            configure_range_search(qmodel, self.options.range_search)

    def run(self, qmodel, ctx: StageContext) -> None:
        init_weight_quantizers(qmodel)


@dataclass
@checked
class AdaRoundOptions(AdaRoundSettings):
    """The pass's knobs (:class:`~diffquant.recon.passes.AdaRoundSettings`) and the units."""

    granularity: Granularity = knob("block", doc="reconstruction unit: block | layer")
    unit_order: UnitOrder = knob("execution", doc="unit order: execution | registration (official codes)")


@STAGES.register("adaround")
class AdaRound(Stage):
    """BRECQ/AdaRound weight reconstruction, unit by unit: inputs from the weight-quantized prefix, targets y^fp (§1.6, §3.2)."""

    family = "weight_rounding"
    Options = AdaRoundOptions
    requires = frozenset({"weights_init"})
    provides = frozenset({"weights_rounded"})
    before = frozenset({"finetuned"})
    uses_calib_set = True
    pass_names = ("weights",)

    def active(self, qmodel) -> bool:
        return qmodel.quant_config.quantize_weights

    def run(self, qmodel, ctx: StageContext) -> None:
        o = self.options
        weight_pass = AdaRoundPass(o)
        units = make_units(qmodel, o.granularity, o.unit_order)
        ctx.records += reconstruct(qmodel, units, ctx.data, weight_pass, fp_model=ctx.fp_model,
                                   options=ctx.engine_options(), progress=ctx.checkpoints)


# ---------------------------------------------------------------------- activations
@dataclass
@checked
class ActInitOptions:
    policy: str | None = knob(None, doc="activation range policy: minmax | lp_shrink | edadm_grid | ema_minmax; null: the wrap config's")
    symmetric: bool = knob(False, doc="symmetric activation grid (Q-Diffusion --a_sym)")
    n: int | None = knob(None, ge=1, doc="calibration samples streamed (null: all)")
    pick: Pick = knob("first", doc="first | random samples (random: seeded by the engine seed)")
    batch: int | None = knob(None, ge=1, doc="batch of the init forward (null: all n at once; n and batch null: the calibration loop)")
    ema: bool = knob(False, doc="then stream the whole set under ema_minmax (Q-Diffusion --running_stat)")
    ema_momentum: float = knob(0.95, lt=1, doc="momentum of that stream")
    ema_batch: int = knob(64, ge=1, doc="batch of that stream")

    def __post_init__(self) -> None:
        if self.policy is not None:
            validate_policy(self.policy)
        if self.ema_momentum <= 0:
            raise ConfigError(f"ema_momentum must be in (0, 1), got {self.ema_momentum}")


@torch.no_grad()
def stream_ema(qmodel: QuantModel, data: CalibrationCalls, momentum: float = 0.95, batch_size: int = 64) -> None:
    """Fold the whole set into every active activation range under ema_minmax(μ), starting from
    the current ranges (``--running_stat``); weights and activations are quantized meanwhile."""
    acts = [q for q in qmodel.quantizers("act").values() if q.active]
    saved = [(q.init, q.momentum) for q in acts]
    qmodel.set_quant_state(weights=True, acts=True)
    for q in acts:
        q.init, q.momentum, q.mode = "ema_minmax", momentum, "observe"
    try:
        calibration_loop(data, batch_size, one_timestep(qmodel))(qmodel)
    finally:
        for q, (init, mom) in zip(acts, saved):
            q.init, q.momentum, q.mode = init, mom, "quantize"


@STAGES.register("act_init")
class ActInit(Stage):
    """Activation ranges from calibration forwards with weights and activations quantized (min-max, Lp, edadm_grid, EMA)."""

    family = "activation_init"
    Options = ActInitOptions
    provides = frozenset({"acts_init"})
    before = frozenset({"acts_learned", "finetuned"})

    def wrap_overrides(self, quant) -> dict:
        o = self.options
        out = {} if o.policy is None else {"act_init": o.policy}
        if o.symmetric:
            out["act_grid"] = "symmetric"
        return out

    def active(self, qmodel) -> bool:
        return acts_quantized(qmodel)

    def run(self, qmodel, ctx: StageContext) -> None:
        o = self.options
        data = ctx.data
        if data is None or (o.n is None and o.batch is None and ctx.forward_loop is not None):
            if ctx.forward_loop is None:
                raise ConfigError("activation quantization needs calibration data: pass calib_set or a forward_loop")
            observe_activations(qmodel, ctx.forward_loop)
            return
        n = len(data) if o.n is None else min(o.n, len(data))
        if n == len(data):
            subset = data
        elif o.pick == "first":
            subset = data.subset(slice(0, n))
        else:
            gen = torch.Generator().manual_seed(ctx.engine.seed)
            subset = data.subset(torch.randperm(len(data), generator=gen)[:n].sort().values)
        desc = f"activation ranges ({qmodel.quant_config.act_init})" if ctx.progress and o.batch is not None else None
        observe_activations(qmodel, calibration_loop(subset, o.batch or len(subset), one_timestep(qmodel), desc))
        if o.ema:
            if qmodel.quant_config.act_init == "lp_shrink":
                warnings.warn("act_ema overwrites the lp_shrink activation ranges with EMA min/max ranges "
                              "(as the official --running_stat does)", stacklevel=2)
            stream_ema(qmodel, data, o.ema_momentum, o.ema_batch)


@dataclass
@checked
class LSQOptions(LSQSettings):
    """The pass's knobs (:class:`~diffquant.recon.passes.LSQSettings`) and the units."""

    granularity: Granularity = default_of(AdaRoundOptions, "granularity")
    unit_order: UnitOrder = default_of(AdaRoundOptions, "unit_order")


@STAGES.register("lsq")
class LSQ(Stage):
    """LSQ activation step sizes learned unit by unit against y^fp, inputs x_in^fp (§3.2)."""

    family = "activation_recon"
    Options = LSQOptions
    requires = frozenset({"acts_init"})
    provides = frozenset({"acts_learned"})
    before = frozenset({"finetuned"})
    uses_calib_set = True
    pass_names = ("acts",)

    def active(self, qmodel) -> bool:
        return acts_quantized(qmodel)

    def run(self, qmodel, ctx: StageContext) -> None:
        o = self.options
        act_pass = LSQPass(o)
        units = make_units(qmodel, o.granularity, o.unit_order)
        ctx.records += reconstruct(qmodel, units, ctx.data, act_pass, fp_model=ctx.fp_model,
                                   options=ctx.engine_options(), progress=ctx.checkpoints)


__all__ = ["AdaRound", "ActInit", "AllStepsSelection", "LSQ", "RandomSelection", "RoundToNearest",
           "SingleStepSelection", "UniformSelection", "WindowSelection", "Wrap", "acts_quantized",
           "calibration_loop", "configure_range_search", "fit_count", "init_weight_quantizers", "observe_activations", "one_timestep",
           "stream_ema"]
