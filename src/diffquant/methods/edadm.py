"""EDA-DM (docs/methods.md §4): TDAC calibration allocation, ``edadm_grid`` ranges, joint FBR reconstruction.

Pipeline, given a model wrapped with :meth:`EDADMConfig.wrap_config` (asymmetric ``edadm_grid``
ranges, split shortcuts, attention matmuls with an 8-bit softmax):

1. calibration data (:meth:`EDADMConfig.select_calibration`): N trajectories, one sample each, at
   the steps TDAC allocates (:mod:`diffquant.calib.tdac`; ``tdac=False``: the same N spread evenly);
   the trajectory capture must record the TDAC feature hook (:meth:`EDADMConfig.capture_options`);
2. the 8-bit rule (:func:`eight_bit_rules`: coverage rules of the wrap stage);
3. weight init: ``edadm_grid`` per channel on every weight (1-D/2-D search, ``range_search``);
4. activation init: the calibration set streamed in batches of ``act_init_batch`` with weights and
   activations quantized; every batch runs the search and the range is smoothed 0.9/0.1;
5. FBR reconstruction, unit by unit (:class:`~diffquant.recon.fbr.FBRPass`): AdaRound V and the
   activation steps jointly, QDrop p = 0.5, input mixing, the layer-augmented loss; hardened;
6. one parameter set for all timesteps.

``edadm_official`` (:class:`EDADMOfficialConfig`) sets the official code's switches (§4.4): no
rounding regulariser, the symmetric 1-D range search, the last *registered* layer left out of the
FBR loss, a third (extra hooked) forward per iteration, the registration-order 8-bit rule,
registration unit order and calibration trajectories that overlap the evaluation ones.
"""
from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import torch
from torch import nn

from ..calib.cache import TrajectoryCache
from ..calib.select import CalibrationSet
from ..calib.tdac import TDACResult, feature_hooks, select_tdac
from ..config import LayerRule, QuantConfig, checked, default_of, knob
from ..errors import ConfigError
from ..model.qmodel import QuantModel
from ..quant.affine import validate_bits
from ..recipes import STAGES, EngineSettings, ForwardLoop, Recipe, Stage, StageContext, run_recipe
from ..recon.cache import CacheOptions, CalibrationCalls, DenoiserCall
from ..recon.engine import reconstruct
from ..recon.fbr import FBR_EXCLUDES, FBRPass, FBRSettings
from ..recon.units import GRANULARITIES, UNIT_ORDERS, make_units
from .stages import (
    RANGE_SEARCHES, ActInit, AdaRoundOptions, RoundToNearest, Wrap, acts_quantized, configure_range_search, fit_count,
)

log = logging.getLogger("diffquant.methods")

#: conv_in/conv_out by role (library) | first/last registered (official) | none
EIGHT_BIT_RULES = ("conv_in_out", "registration", "none")
#: the seed evaluation sampling starts at (``diffquant sample``, the main job, bench)
EVAL_SEED = 0


# ---------------------------------------------------------------------- stage options
@dataclass
@checked
class FBROptions(FBRSettings):
    """The pass's knobs (:class:`~diffquant.recon.fbr.FBRSettings`), one or two passes, the units."""

    joint: bool = knob(True, doc="one joint pass (true) or a weight pass then an activation-step pass")
    granularity: Literal["block", "layer"] = default_of(AdaRoundOptions, "granularity")
    unit_order: Literal["execution", "registration"] = default_of(AdaRoundOptions, "unit_order")


@dataclass
@checked
class TDACOptions:
    n: int = knob(1024, ge=1, doc="N: calibration samples = trajectories (one sample each)")
    batch: int = knob(1024, ge=1, doc="B: trajectories whose features are compared")
    lam: float = knob(1.2, doc="λ: weight of the diversity score (--lamda)")
    radius: float = knob(3.0, doc="r: density radius on the feature MSE (dense_r; model-dependent scale)")
    feature_layer: str = knob("auto", doc="feature hook: a module name, or auto (from the traced graph)")
    report_dir: str | None = knob(None, doc="where tdac.json and the N_k plot go (null: beside the cache)")
    seed: int = knob(0, doc="seed of the trajectory choice")
    enabled: bool = knob(True, doc="density/diversity allocation; false: the same N spread evenly")
    overlaps_eval: bool = knob(False, doc="capture with the evaluation seed, as the official code does")


@dataclass
@checked
class EDADMConfig:
    """All knobs of EDA-DM (docs/methods.md §4, ablation switches §8); defaults = the library's.

    The reconstruction hyperparameters default to the DDIM CIFAR-10 W4A8 row of §4.3 (the
    official setting closest to the small pixel-space models this library ships with).
    """

    # -- wrapping (wrap_config) and the 8-bit rule (run_edadm)
    #: split-shortcut quantization of concatenated inputs (§1.9)
    split: bool = True
    #: bits of the attention softmax output (EDA-DM: 8)
    softmax_bits: int = 8
    #: quantize the attention act-to-act matmuls
    attn_matmul: bool = True
    #: W-only (e.g. W4A32): no activation quantization, no QDrop, weights only
    weight_only: bool = False
    #: auto: 1-D for one-sided data, 2-D otherwise | symmetric_1d: the official code (§4.4)
    range_search: str = "auto"
    #: conv_in_out: conv_in and conv_out at W8, conv_out input FP | registration (official) | none
    eight_bit: str = "conv_in_out"

    # -- calibration data: TDAC (select_calibration)
    #: density/diversity allocation; False = uniform allocation of the same N
    tdac: bool = default_of(TDACOptions, "enabled")
    #: N: calibration samples = trajectories (each trajectory gives one sample)
    tdac_n: int = default_of(TDACOptions, "n")
    #: B: trajectories whose features are compared
    tdac_b: int = default_of(TDACOptions, "batch")
    #: λ: weight of the diversity score (``--lamda``)
    tdac_lambda: float = default_of(TDACOptions, "lam")
    #: r: density radius on the feature MSE (``dense_r``); its scale depends on the model's features
    #: (on mnist-resunet every step pair is within MSE 0.77, so r = 3 gives constant density and a warning)
    tdac_radius: float = default_of(TDACOptions, "radius")
    #: feature hook: a module name, or auto (found from the traced graph: calib.tdac.default_feature_layer)
    tdac_feature_layer: str = default_of(TDACOptions, "feature_layer")
    #: where tdac.json and the N_k plot go (default: beside the trajectory cache)
    tdac_report_dir: str | None = default_of(TDACOptions, "report_dir")
    calib_seed: int = default_of(TDACOptions, "seed")
    #: capture calibration trajectories with the evaluation seed, i.e. the head of the evaluation
    #: list, as the official code does (default: disjoint)
    calib_overlaps_eval: bool = default_of(TDACOptions, "overlaps_eval")

    # -- activation init
    #: samples streamed through the activation search (None: the whole set)
    act_init_n: int | None = None
    act_init_batch: int = 256

    # -- reconstruction
    #: block | layer
    recon_granularity: str = default_of(FBROptions, "granularity")
    #: execution | registration (official)
    unit_order: str = default_of(FBROptions, "unit_order")
    #: one joint pass (True) or a weight pass then an activation-step pass, both with the FBR loss
    joint: bool = default_of(FBROptions, "joint")
    iters: int = default_of(FBROptions, "iters")
    batch_size: int = default_of(FBROptions, "batch_size")
    lr_w: float = default_of(FBROptions, "lr_w")
    lr_a: float = default_of(FBROptions, "lr_a")
    #: exponent of the block and layer losses (L_rec^2)
    p: float = default_of(FBROptions, "p")
    #: weight of the layer losses (0 = plain block loss)
    add_loss: float = default_of(FBROptions, "add_loss")
    #: QDrop: probability that an activation quantizer keeps Q(x) per element (1.0 = QDrop off)
    qdrop_p: float = default_of(FBROptions, "qdrop_p")
    #: probability of taking x_in^q for each element of the unit input (1.0 = x_in^q only)
    input_mix: float = default_of(FBROptions, "input_mix")
    #: the AdaRound rounding regulariser (official: off)
    round_reg: bool = True
    round_reg_weight: float = default_of(FBROptions, "round_reg_weight")
    beta_start: float = default_of(FBROptions, "beta_start")
    beta_end: float = default_of(FBROptions, "beta_end")
    warmup: float = default_of(FBROptions, "warmup")
    #: layer left out of the FBR layer losses: executed (last executed) | registered (official)
    fbr_exclude: str = default_of(FBROptions, "exclude")
    #: take ŷ_l from an extra hooked quantized forward (official: 3 forwards per iteration)
    fbr_extra_forward: bool = default_of(FBROptions, "extra_forward")

    # -- engine (EngineSettings' defaults)
    seed: int = default_of(EngineSettings, "seed")
    #: float32 | float16 storage of the unit caches
    cache_dtype: str = default_of(EngineSettings, "cache_dtype")
    #: auto | memory | disk
    cache_storage: str = default_of(EngineSettings, "cache_storage")
    cache_memory_mb: float = default_of(EngineSettings, "cache_memory_mb")
    #: cached samples on which each unit's initial/final loss is reported
    eval_samples: int = default_of(EngineSettings, "eval_samples")
    #: set by edadm_official
    official: bool = False

    def __post_init__(self) -> None:
        validate_bits(self.softmax_bits, "softmax_bits")
        choices = {"range_search": RANGE_SEARCHES, "eight_bit": EIGHT_BIT_RULES, "fbr_exclude": FBR_EXCLUDES,
                   "recon_granularity": GRANULARITIES, "unit_order": UNIT_ORDERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("tdac_n", "tdac_b", "act_init_batch", "batch_size", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.act_init_n is not None and self.act_init_n < 1:
            raise ConfigError(f"act_init_n must be >= 1 or null, got {self.act_init_n}")
        if self.iters < 0:
            raise ConfigError(f"iters must be >= 0, got {self.iters}")
        for name in ("qdrop_p", "input_mix", "warmup"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.warmup >= 1.0:
            raise ConfigError(f"warmup must be < 1, got {self.warmup}")
        for name in ("add_loss", "tdac_lambda", "tdac_radius", "round_reg_weight", "lr_w", "lr_a"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        CacheOptions(dtype=self.cache_dtype, storage=self.cache_storage, memory_limit_mb=self.cache_memory_mb)

    @property
    def recipe_name(self) -> str:
        return "edadm_official" if self.official else "edadm"

    # ------------------------------------------------------------------ as stages
    def to_recipe(self) -> Recipe:
        """These knobs as the stage list of the ``edadm`` preset (``recipes/presets``)."""
        stages = [
            TDACSelection(n=self.tdac_n, batch=self.tdac_b, lam=self.tdac_lambda, radius=self.tdac_radius,
                          feature_layer=self.tdac_feature_layer, report_dir=self.tdac_report_dir,
                          seed=self.calib_seed, enabled=self.tdac, overlaps_eval=self.calib_overlaps_eval),
            Wrap(split=self.split, softmax_bits=self.softmax_bits, attn_matmul=self.attn_matmul,
                 weight_grid="asymmetric", act_grid="asymmetric", weight_only=self.weight_only,
                 rules=eight_bit_rules(self.eight_bit)),
            *([RegistrationActQuirk()] if self.eight_bit == "registration" else []),
            RoundToNearest(policy="edadm_grid", range_search=self.range_search),
            ActInit(policy="edadm_grid", n=self.act_init_n, batch=self.act_init_batch),
            FBR(joint=self.joint, iters=self.iters, batch_size=self.batch_size, lr_w=self.lr_w, lr_a=self.lr_a,
                p=self.p, add_loss=self.add_loss, qdrop_p=self.qdrop_p, input_mix=self.input_mix,
                round_reg_weight=self.round_reg_weight if self.round_reg else 0.0, beta_start=self.beta_start,
                beta_end=self.beta_end, warmup=self.warmup, exclude=self.fbr_exclude,
                extra_forward=self.fbr_extra_forward, granularity=self.recon_granularity,
                unit_order=self.unit_order),
        ]
        engine = EngineSettings(seed=self.seed, cache_dtype=self.cache_dtype, cache_storage=self.cache_storage,
                                cache_memory_mb=self.cache_memory_mb, eval_samples=self.eval_samples)
        return Recipe(self.recipe_name, stages, engine, description=_DESCRIPTION[self.official])

    def wrap_config(self, quant: QuantConfig) -> QuantConfig:
        """``quant`` with EDA-DM's wrapping knobs applied (a new object): asymmetric grids with
        ``edadm_grid`` ranges for weights and activations, split, attention matmuls and softmax
        bits, and the 8-bit rule as coverage rules (:func:`eight_bit_rules`)."""
        return self.to_recipe().wrap_config(quant)

    def capture_options(self, unet: nn.Module, example_inputs: tuple[tuple, dict] | None = None) -> dict:
        """Extra ``capture_trajectories`` arguments: the TDAC feature hook and, with
        ``calib_overlaps_eval``, the evaluation seed."""
        return self.to_recipe().capture_options(unet, example_inputs)

    def allocate(self, cache: TrajectoryCache) -> tuple[CalibrationSet, TDACResult]:
        """The calibration set and its TDAC allocation (N is reduced to the cache's trajectories)."""
        return self.to_recipe().stages[0].allocate(cache)

    def select_calibration(self, cache: TrajectoryCache) -> CalibrationSet:
        """TDAC's calibration set from captured FP trajectories (§4.1); tdac.json and the N_k plot
        are written to ``tdac_report_dir`` or beside the cache."""
        return self.to_recipe().select(cache)


_DESCRIPTION = {
    False: "EDA-DM (arXiv 2401.04585): TDAC calibration, edadm_grid ranges, joint FBR reconstruction",
    True: "EDA-DM with the official code's switches (§4.4)",
}


@dataclass
class EDADMOfficialConfig(EDADMConfig):
    """``edadm_official``: the official code's switches (docs/methods.md §4.4)."""

    range_search: str = "symmetric_1d"
    eight_bit: str = "registration"
    round_reg: bool = False
    fbr_exclude: str = "registered"
    fbr_extra_forward: bool = True
    unit_order: str = "registration"
    calib_overlaps_eval: bool = True
    official: bool = True


# ---------------------------------------------------------------------- stages
def eight_bit_rules(rule: str = "conv_in_out") -> list[LayerRule]:
    """EDA-DM's higher-precision layers as coverage rules (docs/methods.md §4.2, §4.4); 8 bits is a
    floor (a layer kept at 16/32 bit stays there):

    - ``conv_in_out`` (library): the input layer (``@input``: conv_in) and the last executed layer
      (``@last``: conv_out) with 8-bit weights; conv_out's input stays FP;
    - ``registration`` (official ``set_first_last_layer_to_8bit`` +
      ``disable_network_output_quantization``): the first and last layers in registration order
      at W8, the last one's input FP (the official code's second-to-last activation quantizer at
      8 bit is the ``registration_act_quirk`` stage);
    - ``none``: no rule.
    """
    if rule not in EIGHT_BIT_RULES:
        raise ConfigError(f"eight_bit must be one of {', '.join(EIGHT_BIT_RULES)}, got {rule!r}")
    if rule == "none":
        return []
    first, last = ("@input", "@last") if rule == "conv_in_out" else ("@first_registered", "@last_registered")
    return [LayerRule(first, weight_bits=8, at_least=True),
            LayerRule(last, weight_bits=8, at_least=True, quantize_input=False)]


def raise_registration_act_quirk(qmodel: QuantModel) -> str | None:
    """The official EDA-DM code's ``set_first_last_layer_to_8bit`` also sets the second-to-last
    activation quantizer in registration order to 8 bit (for a split layer: one half only); this
    is a quantizer-level artifact of that code, not a layer rule. Returns the quantizer's name."""
    acts = list(qmodel.quantizers("act").items())  # registration order
    if len(acts) < 2:
        return None
    name, q = acts[-2]
    if q.bits > 8:
        return None
    q.set_bits(8)
    owner = name.split(".act_quantizers.")[0]
    if owner in qmodel.layers() and qmodel.layers()[owner].split is None:
        qmodel.plan.layer(owner).act_bits = q.bits  # keeps the summary truthful
    return name


def init_activations(qmodel: QuantModel, data: CalibrationCalls | None, config: EDADMConfig,
                     forward_loop: ForwardLoop | None = None, progress: bool = False) -> None:
    """§4.2 (the recipe's ``act_init`` stage): stream ``act_init_n`` samples (all by default) in
    batches of ``act_init_batch`` with weights and activations quantized; each batch runs every
    activation search and smooths the range (``edadm_grid``: 0.9·old + 0.1·batch)."""
    ctx = StageContext(calib_set=None if data is None else data.calib_set, forward_loop=forward_loop,
                       engine=EngineSettings(seed=config.seed), progress=progress)
    ctx.data = data
    config.to_recipe().stage("act_init").run(qmodel, ctx)


def fbr_passes(config: EDADMConfig, quantize_acts: bool) -> list[FBRPass]:
    """The reconstruction pass(es) of ``config``: one joint pass, or weights then steps."""
    return config.to_recipe().stage("fbr").recon_passes(quantize_acts)


# ---------------------------------------------------------------------- stages
@STAGES.register("select_tdac")
class TDACSelection(Stage):
    """EDA-DM's TDAC: N trajectories, one sample each, at steps allocated by feature density and diversity (§4.1)."""

    family = "selection"
    Options = TDACOptions
    provides = frozenset({"calibration_set"})

    def capture_options(self, unet: nn.Module, example_inputs) -> dict:
        options: dict = {}
        if self.options.enabled:
            options["feature_hooks"] = feature_hooks(unet, self.options.feature_layer, example_inputs)
        if self.options.overlaps_eval:
            options["seed"] = EVAL_SEED
        return options

    def allocate(self, cache: TrajectoryCache) -> tuple[CalibrationSet, TDACResult]:
        o = self.options
        n = fit_count("n", o.n, cache.num_samples, "trajectories")
        return select_tdac(cache, n, batch=o.batch, lam=o.lam, radius=o.radius, layer=o.feature_layer,
                           seed=o.seed, enabled=o.enabled)

    def select(self, cache: TrajectoryCache) -> CalibrationSet:
        calib_set, result = self.allocate(cache)
        try:
            directory = self._report_dir(cache, result)
            result.save(directory)
            log.info("TDAC allocation written to %s", directory)
        except OSError as exc:  # a read-only cache directory must not stop calibration
            warnings.warn(f"could not write the TDAC report: {exc}", stacklevel=2)
        return calib_set

    def _report_dir(self, cache: TrajectoryCache, result: TDACResult) -> Path:
        if self.options.report_dir is not None:
            return Path(self.options.report_dir)
        digest = hashlib.sha256(json.dumps(result.settings, sort_keys=True).encode()).hexdigest()[:12]
        return Path(cache.path) / f"tdac-{digest}"


@STAGES.register("registration_act_quirk")
class RegistrationActQuirk(Stage):
    """The official EDA-DM code's second-to-last activation quantizer (registration order) at 8
    bit (:func:`raise_registration_act_quirk`); only ``edadm_official`` runs it."""

    family = "coverage"
    before = frozenset({"acts_init"})

    def prepare(self, qmodel, ctx: StageContext) -> None:
        raise_registration_act_quirk(qmodel)


@STAGES.register("fbr")
class FBR(Stage):
    """EDA-DM's fine-grained block reconstruction: AdaRound V and activation steps jointly, QDrop, layer-augmented loss (§4.2)."""

    family = "weight_rounding"
    Options = FBROptions
    requires = frozenset({"weights_init"})
    provides = frozenset({"weights_rounded", "acts_learned"})
    before = frozenset({"finetuned"})
    pass_names = ("fbr", "fbr_weights", "fbr_acts")

    def needs_calib_set(self, qmodel) -> bool:
        return self.options.iters > 0

    def recon_passes(self, quantize_acts: bool) -> list[FBRPass]:
        o = self.options
        if o.joint or not quantize_acts:
            return [FBRPass(o, quantize_acts=quantize_acts)]
        return [FBRPass(o, quantize_acts=quantize_acts, learn_acts=False, name="fbr_weights"),
                FBRPass(o, quantize_acts=quantize_acts, learn_weights=False, name="fbr_acts")]

    def passes(self, qmodel) -> list[str]:
        return [p.name for p in self.recon_passes(acts_quantized(qmodel))]

    def run(self, qmodel, ctx: StageContext) -> None:
        if ctx.data is None:
            return
        units = make_units(qmodel, self.options.granularity, self.options.unit_order)
        for recon_pass in self.recon_passes(acts_quantized(qmodel)):
            ctx.records += reconstruct(qmodel, units, ctx.data, recon_pass, fp_model=ctx.fp_model,
                                       options=ctx.engine_options(), progress=ctx.checkpoints)


def run_edadm(
    qmodel: QuantModel,
    forward_loop: ForwardLoop | None = None,
    config: EDADMConfig | None = None,
    *,
    calib_set: CalibrationSet | None = None,
    call: DenoiserCall | None = None,
    fp_model: nn.Module | None = None,
    work_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> QuantModel:
    """Calibrate ``qmodel`` in place with EDA-DM (the module docstring gives the stages).

    Args:
        forward_loop: used only without ``calib_set`` and with ``iters=0`` (activation init from
            the loop); the reconstruction needs the set itself.
        calib_set: the calibration inputs (x_t, t, labels), e.g. from
            :meth:`EDADMConfig.select_calibration`; for CFG models with each (x_t, t) once with its
            label and once with the null label (:meth:`CalibrationSet.with_uncond`).
        call: ``call(model, x, t, labels)`` runs the denoiser (e.g. ``bundle.predict_noise``).
        fp_model: the float model (same module names) for x_in^fp and y^fp; default: ``qmodel``
            with quantization switched off.
        work_dir: checkpoints after every unit go to ``<work_dir>/progress``; a run with the same
            ``work_dir`` and settings resumes there. Per-unit records go to ``records.json``.
    """
    config = config or EDADMConfig()
    ctx = StageContext(calib_set=calib_set, call=call, fp_model=fp_model, forward_loop=forward_loop,
                       work_dir=work_dir, device=device, progress=progress)
    return run_recipe(qmodel, config.to_recipe(), ctx, recipe_config=config)


__all__ = [
    "EDADMConfig",
    "EDADMOfficialConfig",
    "EIGHT_BIT_RULES",
    "RANGE_SEARCHES",
    "eight_bit_rules",
    "raise_registration_act_quirk",
    "configure_range_search",
    "fbr_passes",
    "init_activations",
    "run_edadm",
]
