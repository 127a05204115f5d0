"""Q-Diffusion (METHODS.md §3): timestep-uniform calibration, BRECQ/AdaRound weights, LSQ activations.

Pipeline (§3.2), given a model wrapped with :meth:`QDiffusionConfig.wrap_config` (split shortcuts,
attention matmul quantizers, softmax bits):

1. weight init: every weight quantizer from its own weight (per channel; depends on no data);
2. weight pass, unit by unit in execution order: AdaRound (λ=0.01, β 20→2, warm-up 0.2), Adam
   lr 1e-3 on V, L_rec^2, inputs x_in^q from the weight-quantized prefix, targets y^fp; harden;
3. activation init: one forward of ``act_init_n`` calibration samples with weights and activations
   on, ranges under ``a_init``; with ``act_ema`` the whole set is then streamed under
   ema_minmax(0.95), overwriting the init (as the official ``--running_stat`` does);
4. activation pass, unit by unit: LSQ on every activation step in the unit (split halves,
   attention q/k/v, the softmax unless it is 16 bit), Adam lr 4e-4 with cosine annealing,
   L_rec^2.4, inputs x_in^fp;
5. one parameter set for all timesteps.

Weight-only settings (W4A32) skip 3–4. Units without quantized weights are skipped by the weight
pass (the official code crashes there, §3.4). ``qdiffusion_official`` (:class:`QDiffusionOfficialConfig`)
sets the official code's switches: registration unit order, the split regulariser quirk, and
``a_symmetric`` only with minmax activation init.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calib.cache import TrajectoryCache
from ..calib.select import PICKS, CalibrationSet, from_pairs, uniform
from ..config import QuantConfig, checked, knob
from ..errors import ConfigError
from ..model.qmodel import QuantModel
from ..quant.affine import validate_bits
from ..quant.ranges import validate_policy
from ..recon.cache import CacheOptions, CalibrationCalls, DenoiserCall
from ..recon.engine import EngineOptions, UnitRecord, reconstruct
from ..recon.passes import AdaRoundPass, LSQPass
from ..recon.progress import ReconProgress
from ..recon.units import GRANULARITIES, UNIT_ORDERS, make_units
from .stages import ForwardLoop, finish_recipe, init_weight_quantizers, observe_activations, recipe_fingerprint

CALIB_POLICIES = ("uniform_interval", "first_n", "middle_n", "last_n", "single_t")
PASSES = ["weights", "acts"]


@dataclass
@checked
class QDiffusionConfig:
    """All knobs of Q-Diffusion (METHODS.md §3, ablation switches §8); defaults = the library's."""

    # -- wrapping (applied by wrap_config before the model is wrapped)
    #: split-shortcut quantization of concatenated inputs (§1.9)
    split: bool = True
    #: bits of the attention softmax output; 16 = FP and not learned
    softmax_bits: int = 8
    #: quantize the attention act-to-act matmuls
    attn_matmul: bool = True
    #: weight range init: minmax | lp_shrink
    w_init: str = "minmax"
    #: activation range init: minmax | lp_shrink
    a_init: str = "minmax"
    #: symmetric activation grid (``--a_sym``)
    a_symmetric: bool = False
    #: W-only (e.g. W4A32): no activation quantization, steps 3-4 skipped
    weight_only: bool = False

    # -- calibration data (select_calibration)
    #: uniform_interval | first_n | middle_n | last_n | single_t
    calib_policy: str = "uniform_interval"
    #: number of selected steps (single_t: ignored)
    cali_st: int = 20
    #: samples per selected step
    cali_n: int = 256
    #: first | random samples per step
    pick: str = "first"
    #: the step of ``single_t`` (negative: from the end, -1 = the last step)
    single_step: int = knob(-1, ge=None)
    calib_seed: int = 0

    # -- activation init
    act_init_n: int = 64
    #: random | first samples for the init forward
    act_init_pick: str = "random"
    #: then stream the whole set under ema_minmax (``--running_stat``)
    act_ema: bool = False
    act_ema_momentum: float = 0.95
    act_ema_batch: int = 64

    # -- reconstruction
    weight_recon: bool = True
    #: the LSQ activation pass (False: keep the init ranges)
    act_recon: bool = True
    #: block | layer
    recon_granularity: str = "block"
    #: execution | registration (official)
    unit_order: str = "execution"
    iters_w: int = 20000
    iters_a: int = 5000
    batch_size: int = 32
    lr_w: float = knob(1e-3, gt=0)
    lr_a: float = knob(4e-4, gt=0)
    p_w: float = knob(2.0, gt=0)
    p_act: float = knob(2.4, gt=0)
    round_reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    #: official quirk: only the first half of a split layer is regularised / softened (§3.4)
    split_reg_first_half_only: bool = False

    # -- engine
    seed: int = 0
    #: float32 | float16 storage of the unit caches
    cache_dtype: str = "float32"
    #: auto | memory | disk
    cache_storage: str = "auto"
    cache_memory_mb: float = 4096.0
    #: cached samples on which each unit's initial/final loss is reported
    eval_samples: int = 256
    #: official-code compatibility checks (set by qdiffusion_official)
    official: bool = False

    def __post_init__(self) -> None:
        validate_bits(self.softmax_bits, "softmax_bits")
        for name in ("w_init", "a_init"):
            if validate_policy(getattr(self, name)) not in ("minmax", "lp_shrink"):
                raise ConfigError(f"Q-Diffusion {name} must be minmax or lp_shrink, got {getattr(self, name)!r}")
        if self.calib_policy not in CALIB_POLICIES:
            raise ConfigError(f"calib_policy must be one of {', '.join(CALIB_POLICIES)}, got {self.calib_policy!r}")
        for name in ("pick", "act_init_pick"):
            if getattr(self, name) not in PICKS:
                raise ConfigError(f"{name} must be one of {', '.join(PICKS)}, got {getattr(self, name)!r}")
        if self.recon_granularity not in GRANULARITIES:
            raise ConfigError(f"recon_granularity must be one of {GRANULARITIES}, got {self.recon_granularity!r}")
        if self.unit_order not in UNIT_ORDERS:
            raise ConfigError(f"unit_order must be one of {UNIT_ORDERS}, got {self.unit_order!r}")
        for name in ("cali_st", "cali_n", "act_init_n", "act_ema_batch", "batch_size", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("iters_w", "iters_a"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup}")
        if not 0.0 < self.act_ema_momentum < 1.0:
            raise ConfigError(f"act_ema_momentum must be in (0, 1), got {self.act_ema_momentum}")
        if self.official and self.a_symmetric and self.a_init != "minmax":
            raise ConfigError("qdiffusion_official allows a_symmetric only with a_init=minmax "
                              "(the official symmetric mse search is broken, METHODS.md §3.4)")
        CacheOptions(dtype=self.cache_dtype, storage=self.cache_storage, memory_limit_mb=self.cache_memory_mb)

    @property
    def recipe_name(self) -> str:
        return "qdiffusion_official" if self.official else "qdiffusion"

    def check_calibration(self, steps: int) -> None:
        """Options that depend on the calibration schedule, checked before anything is captured."""
        if self.calib_policy == "single_t" and not -steps <= self.single_step < steps:
            raise ConfigError(f"single_step={self.single_step} is outside the calibration schedule's {steps} steps "
                              f"(use 0..{steps - 1}, or -1 for the last)")

    # ------------------------------------------------------------------ wrapping
    def wrap_config(self, quant: QuantConfig) -> QuantConfig:
        """``quant`` with Q-Diffusion's wrapping knobs applied (a new object)."""
        quant = dataclasses.replace(
            quant,
            split=self.split,
            softmax_bits=self.softmax_bits,
            attn_matmul=self.attn_matmul,
            weight_init=self.w_init,
            act_init=self.a_init,
            act_grid="symmetric" if self.a_symmetric else quant.act_grid,
            quantize_acts=False if self.weight_only else quant.quantize_acts,
        )
        quant.__post_init__()
        return quant

    # ------------------------------------------------------------------ calibration data
    def select_calibration(self, cache: TrajectoryCache) -> CalibrationSet:
        """The calibration set of ``calib_policy`` from captured FP trajectories (§3.1).

        Counts larger than the cache holds are reduced to what it holds, with a warning.
        """
        k_total, n_total = cache.num_steps, cache.num_samples
        n = _fit("cali_n", self.cali_n, n_total, "trajectories")
        if self.calib_policy == "uniform_interval":
            return uniform(cache, n_per_step=n, n_steps=_fit("cali_st", self.cali_st, k_total, "steps"),
                           pick=self.pick, seed=self.calib_seed)
        if self.calib_policy == "single_t":
            if not -k_total <= self.single_step < k_total:
                raise ConfigError(f"single_step={self.single_step} outside the cache's {k_total} steps")
            steps = [self.single_step % k_total]
        else:
            count = _fit("cali_st", self.cali_st, k_total, "steps")
            first = {"first_n": 0, "middle_n": (k_total - count) // 2, "last_n": k_total - count}[self.calib_policy]
            steps = list(range(first, first + count))
        gen = torch.Generator().manual_seed(self.calib_seed)
        all_steps, all_ids = [], []
        for k in steps:
            ids = torch.arange(n) if self.pick == "first" else torch.randperm(n_total, generator=gen)[:n].sort().values
            all_steps.append(torch.full((n,), k, dtype=torch.long))
            all_ids.append(ids)
        return from_pairs(cache, torch.cat(all_steps), torch.cat(all_ids))


def _fit(name: str, wanted: int, available: int, what: str) -> int:
    if wanted > available:
        warnings.warn(f"{name}={wanted} but the calibration cache holds {available} {what}; using {available}",
                      stacklevel=3)
        return available
    return wanted


@dataclass
class QDiffusionOfficialConfig(QDiffusionConfig):
    """``qdiffusion_official``: the official code's switches (METHODS.md §3.4)."""

    unit_order: str = "registration"
    split_reg_first_half_only: bool = True
    official: bool = True


# ---------------------------------------------------------------------- stages
def _check_wrapping(qmodel: QuantModel, config: QDiffusionConfig) -> None:
    expected = config.wrap_config(dataclasses.replace(qmodel.quant_config))
    fields = ("split", "softmax_bits", "attn_matmul", "weight_init", "act_init", "act_grid", "quantize_acts")
    differ = [f for f in fields if getattr(expected, f) != getattr(qmodel.quant_config, f)]
    if differ:
        warnings.warn(
            f"the model was wrapped with other {', '.join(differ)} than this Q-Diffusion config asks for; "
            "wrap it with QDiffusionConfig.wrap_config(quant_config) to get them", stacklevel=3)


def _init_subset(data: CalibrationCalls, config: QDiffusionConfig) -> CalibrationCalls:
    n = min(config.act_init_n, len(data))
    if config.act_init_pick == "first":
        return data.subset(slice(0, n))
    gen = torch.Generator().manual_seed(config.seed)
    return data.subset(torch.randperm(len(data), generator=gen)[:n].sort().values)


def _loop(data: CalibrationCalls, batch_size: int, one_timestep: bool, desc: str | None = None) -> ForwardLoop:
    """Every calibration call once, in batches; a progress bar titled ``desc`` unless it is None."""
    def loop(model: nn.Module) -> None:
        index_slices = list(data.slices(batch_size, one_timestep))
        for index in tqdm(index_slices, desc=desc, disable=desc is None, leave=False):
            data.run(model, index)

    return loop


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
        _loop(data, batch_size, bool(qmodel.timestep_index.timesteps))(qmodel)
    finally:
        for q, (init, mom) in zip(acts, saved):
            q.init, q.momentum, q.mode = init, mom, "quantize"


def init_activations(qmodel: QuantModel, data: CalibrationCalls | None, config: QDiffusionConfig,
                     forward_loop: ForwardLoop | None = None) -> None:
    """§3.2 step 4: one forward of ``act_init_n`` samples with weights and activations on, then
    the optional EMA stream. Without ``data`` the ``forward_loop`` provides the init forward."""
    if data is None:
        if forward_loop is None:
            raise ConfigError("activation quantization needs calibration data: pass calib_set or a forward_loop")
        observe_activations(qmodel, forward_loop)
        return
    subset = _init_subset(data, config)
    one_t = bool(qmodel.timestep_index.timesteps)
    observe_activations(qmodel, _loop(subset, len(subset), one_t))
    if config.act_ema:
        if config.a_init == "lp_shrink":
            warnings.warn("act_ema overwrites the lp_shrink activation ranges with EMA min/max ranges "
                          "(as the official --running_stat does)", stacklevel=2)
        stream_ema(qmodel, data, config.act_ema_momentum, config.act_ema_batch)


def run_qdiffusion(
    qmodel: QuantModel,
    forward_loop: ForwardLoop | None = None,
    config: QDiffusionConfig | None = None,
    *,
    calib_set: CalibrationSet | None = None,
    call: DenoiserCall | None = None,
    fp_model: nn.Module | None = None,
    work_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> QuantModel:
    """Calibrate ``qmodel`` in place with Q-Diffusion.

    Args:
        forward_loop: used only when no ``calib_set`` is given and nothing is reconstructed
            (activation init from the loop); the reconstruction needs the set itself.
        calib_set: the calibration inputs (x_t, t, labels); for CFG models with each (x_t, t)
            once with its label and once with the null label (:meth:`CalibrationSet.with_uncond`).
        call: ``call(model, x, t, labels)`` runs the denoiser (e.g. ``bundle.predict_noise``);
            default ``model(x, t[, class_labels=labels])``.
        fp_model: the float model (same module names) for x_in^fp and y^fp; default: ``qmodel``
            with quantization switched off.
        work_dir: checkpoints after every unit go to ``<work_dir>/progress``; a run with the same
            ``work_dir`` and settings resumes there. Per-unit records go to ``records.json``.
    """
    config = config or QDiffusionConfig()
    _check_wrapping(qmodel, config)
    quant = qmodel.quant_config
    reconstructs = quant.quantize_weights and config.weight_recon or quant.quantize_acts and config.act_recon
    if calib_set is None and reconstructs:
        raise ConfigError("Q-Diffusion reconstruction needs the calibration set: pass calib_set=")
    for p in qmodel.parameters():  # only what a pass trains gets gradients
        p.requires_grad_(False)

    data = None if calib_set is None else CalibrationCalls(calib_set, call, device)
    units = make_units(qmodel, config.recon_granularity, config.unit_order)
    options = EngineOptions(
        seed=config.seed, device=device, eval_samples=config.eval_samples, progress=progress,
        cache=CacheOptions(dtype=config.cache_dtype, storage=config.cache_storage,
                           memory_limit_mb=config.cache_memory_mb,
                           directory=None if work_dir is None else str(Path(work_dir) / "unit_cache")),
    )
    checkpoints = None
    if work_dir is not None and calib_set is not None:
        checkpoints = ReconProgress(work_dir, PASSES, recipe_fingerprint(qmodel, config, calib_set))
    resumed = checkpoints.restore(qmodel) if checkpoints is not None else False

    records: list[UnitRecord] = []
    if not resumed:
        init_weight_quantizers(qmodel)
    if quant.quantize_weights and config.weight_recon:
        weight_pass = AdaRoundPass(
            iters=config.iters_w, batch_size=config.batch_size, lr=config.lr_w, p=config.p_w,
            reg_weight=config.round_reg_weight, beta_start=config.beta_start, beta_end=config.beta_end,
            warmup=config.warmup, first_half_only=config.split_reg_first_half_only,
        )
        records += reconstruct(qmodel, units, data, weight_pass, fp_model=fp_model, options=options,
                               progress=checkpoints)
    if quant.quantize_acts and qmodel.quantizers("act"):
        if not (checkpoints is not None and checkpoints.started("acts")):
            init_activations(qmodel, data, config, forward_loop)
        if config.act_recon:
            act_pass = LSQPass(iters=config.iters_a, batch_size=config.batch_size, lr=config.lr_a, p=config.p_act)
            records += reconstruct(qmodel, units, data, act_pass, fp_model=fp_model, options=options,
                                   progress=checkpoints)

    return finish_recipe(qmodel, config.recipe_name, config, quant, records, work_dir)


__all__ = [
    "CALIB_POLICIES",
    "QDiffusionConfig",
    "QDiffusionOfficialConfig",
    "init_activations",
    "run_qdiffusion",
    "stream_ema",
]
