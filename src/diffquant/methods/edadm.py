"""EDA-DM (METHODS.md §4): TDAC calibration allocation, ``edadm_grid`` ranges, joint FBR reconstruction.

Pipeline, given a model wrapped with :meth:`EDADMConfig.wrap_config` (asymmetric ``edadm_grid``
ranges, split shortcuts, attention matmuls with an 8-bit softmax):

1. calibration data (:meth:`EDADMConfig.select_calibration`): N trajectories, one sample each, at
   the steps TDAC allocates (:mod:`diffquant.calib.tdac`; ``tdac=False``: the same N spread evenly);
   the trajectory capture must record the TDAC feature hook (:meth:`EDADMConfig.capture_options`);
2. the 8-bit rule (:func:`apply_eight_bit_rule`, applied to the wrapped model by :func:`run_edadm`);
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

import dataclasses
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..calib.cache import TrajectoryCache
from ..calib.select import CalibrationSet
from ..calib.tdac import TDACResult, feature_hooks, select_tdac
from ..config import QuantConfig, checked, knob
from ..errors import ConfigError
from ..model.qmodel import QuantModel
from ..quant.affine import validate_bits
from ..quant.ranges import validate_init_options
from ..recon.cache import CacheOptions, CalibrationCalls, DenoiserCall
from ..recon.engine import EngineOptions, UnitRecord, reconstruct
from ..recon.fbr import FBR_EXCLUDES, FBRPass
from ..recon.progress import ReconProgress
from ..recon.units import GRANULARITIES, UNIT_ORDERS, make_units
from .qdiffusion import _fit, _loop
from .stages import ForwardLoop, finish_recipe, init_weight_quantizers, observe_activations, recipe_fingerprint

log = logging.getLogger("diffquant.methods")

RANGE_SEARCHES = ("auto", "symmetric_1d")
#: conv_in/conv_out by role (library) | first/last registered (official) | none
EIGHT_BIT_RULES = ("conv_in_out", "registration", "none")
#: the seed evaluation sampling starts at (``diffquant sample``, the main job, bench)
EVAL_SEED = 0


@dataclass
@checked
class EDADMConfig:
    """All knobs of EDA-DM (METHODS.md §4, ablation switches §8); defaults = the library's.

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
    tdac: bool = True
    #: N: calibration samples = trajectories (each trajectory gives one sample)
    tdac_n: int = 1024
    #: B: trajectories whose features are compared
    tdac_b: int = 1024
    #: λ: weight of the diversity score (``--lamda``)
    tdac_lambda: float = 1.2
    #: r: density radius on the feature MSE (``dense_r``); its scale depends on the model's features
    #: (on mnist-resunet every step pair is within MSE 0.77, so r = 3 gives constant density and a warning)
    tdac_radius: float = 3.0
    #: feature hook: a module name, or auto (found from the traced graph: calib.tdac.default_feature_layer)
    tdac_feature_layer: str = "auto"
    #: where tdac.json and the N_k plot go (default: beside the trajectory cache)
    tdac_report_dir: str | None = None
    calib_seed: int = 0
    #: capture calibration trajectories with the evaluation seed, i.e. the head of the evaluation
    #: list, as the official code does (default: disjoint)
    calib_overlaps_eval: bool = False

    # -- activation init
    #: samples streamed through the activation search (None: the whole set)
    act_init_n: int | None = None
    act_init_batch: int = 256

    # -- reconstruction
    #: block | layer
    recon_granularity: str = "block"
    #: execution | registration (official)
    unit_order: str = "execution"
    #: one joint pass (True) or a weight pass then an activation-step pass, both with the FBR loss
    joint: bool = True
    iters: int = 5000
    batch_size: int = 32
    lr_w: float = knob(5e-1, gt=0)
    lr_a: float = knob(5e-4, gt=0)
    #: exponent of the block and layer losses (L_rec^2)
    p: float = knob(2.0, gt=0)
    #: weight of the layer losses (0 = plain block loss)
    add_loss: float = 0.8
    #: QDrop: probability that an activation quantizer keeps Q(x) per element (1.0 = QDrop off)
    qdrop_p: float = 0.5
    #: probability of taking x_in^q for each element of the unit input (1.0 = x_in^q only)
    input_mix: float = 0.5
    #: the AdaRound rounding regulariser (official: off)
    round_reg: bool = True
    round_reg_weight: float = 1e-4
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    #: layer left out of the FBR layer losses: executed (last executed) | registered (official)
    fbr_exclude: str = "executed"
    #: take ŷ_l from an extra hooked quantized forward (official: 3 forwards per iteration)
    fbr_extra_forward: bool = False

    # -- engine
    seed: int = 0
    #: float32 | float16 storage of the unit caches
    cache_dtype: str = "float32"
    #: auto | memory | disk
    cache_storage: str = "auto"
    cache_memory_mb: float = 4096.0
    #: cached samples on which each unit's initial/final loss is reported
    eval_samples: int = 256
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

    # ------------------------------------------------------------------ wrapping
    def wrap_config(self, quant: QuantConfig) -> QuantConfig:
        """``quant`` with EDA-DM's wrapping knobs applied (a new object): asymmetric grids with
        ``edadm_grid`` ranges for weights and activations, split, attention matmuls and softmax
        bits. The 8-bit rule depends on the traced and registration order of the wrapped model,
        so :func:`run_edadm` applies it (:func:`apply_eight_bit_rule`)."""
        quant = dataclasses.replace(
            quant,
            split=self.split,
            softmax_bits=self.softmax_bits,
            attn_matmul=self.attn_matmul,
            weight_init="edadm_grid",
            act_init="edadm_grid",
            weight_grid="asymmetric",
            act_grid="asymmetric",
            quantize_acts=False if self.weight_only else quant.quantize_acts,
        )
        quant.__post_init__()
        return quant

    # ------------------------------------------------------------------ calibration data
    def capture_options(self, unet: nn.Module, example_inputs: tuple[tuple, dict] | None = None) -> dict:
        """Extra ``capture_trajectories`` arguments this recipe needs: the TDAC feature hook (found
        from a forward on ``example_inputs`` unless named) and, with ``calib_overlaps_eval``, the
        evaluation seed."""
        options: dict = {}
        if self.tdac:
            options["feature_hooks"] = feature_hooks(unet, self.tdac_feature_layer, example_inputs)
        if self.calib_overlaps_eval:
            options["seed"] = EVAL_SEED
        return options

    def allocate(self, cache: TrajectoryCache) -> tuple[CalibrationSet, TDACResult]:
        """The calibration set and its TDAC allocation (N is reduced to the cache's trajectories,
        with a warning)."""
        n = _fit("tdac_n", self.tdac_n, cache.num_samples, "trajectories")
        return select_tdac(cache, n, batch=self.tdac_b, lam=self.tdac_lambda, radius=self.tdac_radius,
                           layer=self.tdac_feature_layer, seed=self.calib_seed, enabled=self.tdac)

    def select_calibration(self, cache: TrajectoryCache) -> CalibrationSet:
        """TDAC's calibration set from captured FP trajectories (§4.1); tdac.json and the N_k plot
        are written to ``tdac_report_dir`` or beside the cache."""
        calib_set, result = self.allocate(cache)
        try:
            directory = self._report_dir(cache, result)
            result.save(directory)
            log.info("TDAC allocation written to %s", directory)
        except OSError as exc:  # a read-only cache directory must not stop calibration
            warnings.warn(f"could not write the TDAC report: {exc}", stacklevel=2)
        return calib_set

    def _report_dir(self, cache: TrajectoryCache, result: TDACResult) -> Path:
        if self.tdac_report_dir is not None:
            return Path(self.tdac_report_dir)
        digest = hashlib.sha256(json.dumps(result.settings, sort_keys=True).encode()).hexdigest()[:12]
        return Path(cache.path) / f"tdac-{digest}"


@dataclass
class EDADMOfficialConfig(EDADMConfig):
    """``edadm_official``: the official code's switches (METHODS.md §4.4)."""

    range_search: str = "symmetric_1d"
    eight_bit: str = "registration"
    round_reg: bool = False
    fbr_exclude: str = "registered"
    fbr_extra_forward: bool = True
    unit_order: str = "registration"
    calib_overlaps_eval: bool = True
    official: bool = True


# ---------------------------------------------------------------------- stages
def _set_layer_bits(qmodel: QuantModel, name: str, *, weights: int | None = None, input_fp: bool = False) -> None:
    """Raise one layer's weight bits (plan and quantizers) and/or keep its input in FP."""
    plan = qmodel.plan.layer(name)
    layer = qmodel.layers()[name]
    if weights is not None and plan.weight_bits <= 8:
        plan.weight_bits = max(plan.weight_bits, weights)
        for q in layer.weight_quantizers:
            q.set_bits(plan.weight_bits)
        layer.clear_cache()
    if input_fp:
        plan.quantize_input = False
        layer.use_act_quant = False


def apply_eight_bit_rule(qmodel: QuantModel, rule: str = "conv_in_out") -> dict[str, list[str]]:
    """EDA-DM's higher-precision layers, applied to a wrapped model in place (plan included, so
    a saved model reloads with them). Returns what was changed.

    - ``conv_in_out`` (library): conv_in — the layer named ``conv_in``, else the first executed
      layer outside the time embedding — and conv_out (the last executed layer) at W8; conv_out's
      input stays FP;
    - ``registration`` (official ``set_first_last_layer_to_8bit`` +
      ``disable_network_output_quantization``): the first and last layers in registration order
      at W8, the second-to-last activation quantizer in registration order at 8 bit, the last
      registered layer's input FP;
    - ``none``: nothing.
    Layers kept at 16/32 bit stay there; 8 bit is never lowered.
    """
    if rule not in EIGHT_BIT_RULES:
        raise ConfigError(f"eight_bit must be one of {', '.join(EIGHT_BIT_RULES)}, got {rule!r}")
    changed: dict[str, list[str]] = {"weights_8bit": [], "acts_8bit": [], "input_fp": []}
    plans = qmodel.plan.layers
    if rule == "none" or not plans:
        return changed
    if rule == "conv_in_out":
        names = [lp.name for lp in plans]
        first = "conv_in" if "conv_in" in names else next(
            (lp.name for lp in plans if "time_embedding" not in lp.roles), names[0])
        last = next((lp.name for lp in plans if "last" in lp.roles), names[-1])  # last *called* layer
    else:
        position = {name: i for i, (name, _) in enumerate(qmodel.model.named_modules())}
        ordered = sorted((lp.name for lp in plans), key=position.__getitem__)
        first, last = ordered[0], ordered[-1]
        acts = list(qmodel.quantizers("act").items())  # registration order
        if len(acts) >= 2:
            name, q = acts[-2]
            if q.bits <= 8:
                q.set_bits(max(q.bits, 8))
                changed["acts_8bit"].append(name)
                owner = name.split(".act_quantizers.")[0]
                if owner in qmodel.layers() and qmodel.layers()[owner].split is None:
                    qmodel.plan.layer(owner).act_bits = q.bits  # keeps the summary truthful
    for name in dict.fromkeys((first, last)):
        _set_layer_bits(qmodel, name, weights=8)
        changed["weights_8bit"].append(name)
    _set_layer_bits(qmodel, last, input_fp=True)
    changed["input_fp"].append(last)
    return changed


def configure_range_search(qmodel: QuantModel, mode: str = "auto") -> None:
    """``symmetric_1d``: every ``edadm_grid`` quantizer searches symmetric 1-D candidates (the
    official code's inverted flag); ``auto`` leaves the 1-D/2-D choice to the data's side."""
    if mode not in RANGE_SEARCHES:
        raise ConfigError(f"range_search must be one of {', '.join(RANGE_SEARCHES)}, got {mode!r}")
    for q in qmodel.quantizers().values():
        if q.init != "edadm_grid":
            continue
        options = {k: v for k, v in q.init_options.items() if k != "symmetric"}
        if mode == "symmetric_1d":
            options["symmetric"] = True
        q.init_options = validate_init_options(q.init, options)


def init_activations(qmodel: QuantModel, data: CalibrationCalls | None, config: EDADMConfig,
                     forward_loop: ForwardLoop | None = None, progress: bool = False) -> None:
    """§4.2: stream ``act_init_n`` samples (all by default) in batches of ``act_init_batch`` with
    weights and activations quantized; each batch runs every activation search and smooths the
    range (``edadm_grid``: 0.9·old + 0.1·batch). Without data the ``forward_loop`` is used."""
    if data is None:
        if forward_loop is None:
            raise ConfigError("activation quantization needs calibration data: pass calib_set or a forward_loop")
        observe_activations(qmodel, forward_loop)
        return
    n = len(data) if config.act_init_n is None else min(config.act_init_n, len(data))
    subset = data if n == len(data) else data.subset(slice(0, n))
    desc = f"activation ranges ({config.range_search})" if progress else None
    observe_activations(qmodel, _loop(subset, config.act_init_batch, bool(qmodel.timestep_index.timesteps), desc))


def _check_wrapping(qmodel: QuantModel, config: EDADMConfig) -> None:
    expected = config.wrap_config(dataclasses.replace(qmodel.quant_config))
    fields = ("split", "softmax_bits", "attn_matmul", "weight_init", "act_init", "act_grid", "weight_grid",
              "quantize_acts")
    differ = [f for f in fields if getattr(expected, f) != getattr(qmodel.quant_config, f)]
    if differ:
        warnings.warn(
            f"the model was wrapped with other {', '.join(differ)} than this EDA-DM config asks for; "
            "wrap it with EDADMConfig.wrap_config(quant_config) to get them", stacklevel=3)


def fbr_passes(config: EDADMConfig, quantize_acts: bool) -> list[FBRPass]:
    """The reconstruction pass(es) of ``config``: one joint pass, or weights then steps."""
    common = dict(
        iters=config.iters, batch_size=config.batch_size, lr_w=config.lr_w, lr_a=config.lr_a, p=config.p,
        add_loss=config.add_loss, qdrop_p=config.qdrop_p, input_mix=config.input_mix,
        round_reg_weight=config.round_reg_weight if config.round_reg else 0.0, beta_start=config.beta_start,
        beta_end=config.beta_end, warmup=config.warmup, exclude=config.fbr_exclude,
        extra_forward=config.fbr_extra_forward, quantize_acts=quantize_acts,
    )
    if config.joint or not quantize_acts:
        return [FBRPass(**common)]
    return [FBRPass(**common, learn_acts=False, name="fbr_weights"),
            FBRPass(**common, learn_weights=False, name="fbr_acts")]


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
    if calib_set is None and config.iters > 0:
        raise ConfigError("EDA-DM reconstruction needs the calibration set: pass calib_set=")
    _check_wrapping(qmodel, config)
    quant = qmodel.quant_config
    for p in qmodel.parameters():  # only what a pass trains gets gradients
        p.requires_grad_(False)
    apply_eight_bit_rule(qmodel, config.eight_bit)
    configure_range_search(qmodel, config.range_search)

    data = None if calib_set is None else CalibrationCalls(calib_set, call, device)
    passes = fbr_passes(config, quant.quantize_acts and bool(qmodel.quantizers("act")))
    checkpoints = None
    if work_dir is not None and calib_set is not None:
        checkpoints = ReconProgress(work_dir, [p.name for p in passes], recipe_fingerprint(qmodel, config, calib_set))
    resumed = checkpoints.restore(qmodel) if checkpoints is not None else False

    if not resumed:
        init_weight_quantizers(qmodel)
        if quant.quantize_acts and qmodel.quantizers("act"):
            init_activations(qmodel, data, config, forward_loop, progress=progress)

    records: list[UnitRecord] = []
    if data is not None:
        units = make_units(qmodel, config.recon_granularity, config.unit_order)
        options = EngineOptions(
            seed=config.seed, device=device, eval_samples=config.eval_samples, progress=progress,
            cache=CacheOptions(dtype=config.cache_dtype, storage=config.cache_storage,
                               memory_limit_mb=config.cache_memory_mb,
                               directory=None if work_dir is None else str(Path(work_dir) / "unit_cache")),
        )
        for recon_pass in passes:
            records += reconstruct(qmodel, units, data, recon_pass, fp_model=fp_model, options=options,
                                   progress=checkpoints)

    return finish_recipe(qmodel, config.recipe_name, config, quant, records, work_dir)


__all__ = [
    "EDADMConfig",
    "EDADMOfficialConfig",
    "EIGHT_BIT_RULES",
    "RANGE_SEARCHES",
    "apply_eight_bit_rule",
    "configure_range_search",
    "fbr_passes",
    "init_activations",
    "run_edadm",
]
