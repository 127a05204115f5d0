"""Q-Diffusion (docs/methods.md §3): timestep-uniform calibration, BRECQ/AdaRound weights, LSQ activations.

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

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..calib.cache import TrajectoryCache
from ..calib.select import PICKS, CalibrationSet
from ..config import QuantConfig, checked, default_of
from ..errors import ConfigError
from ..model.qmodel import QuantModel
from ..quant.affine import validate_bits
from ..quant.ranges import validate_policy
from ..recipes import EngineSettings, ForwardLoop, Recipe, StageContext, run_recipe
from ..recon.cache import CacheOptions, CalibrationCalls, DenoiserCall
from ..recon.units import GRANULARITIES, UNIT_ORDERS
from .stages import (
    LSQ, ActInit, ActInitOptions, AdaRound, AdaRoundOptions, LSQOptions, RoundToNearest, SingleStepOptions,
    SingleStepSelection, UniformSelection, UniformSelectionOptions, WindowSelection, Wrap, stream_ema,
)

CALIB_POLICIES = ("uniform_interval", "first_n", "middle_n", "last_n", "single_t")
PASSES = ["weights", "acts"]


@dataclass
@checked
class QDiffusionConfig:
    """All knobs of Q-Diffusion (docs/methods.md §3, ablation switches §8); defaults = the library's."""

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
    a_symmetric: bool = default_of(ActInitOptions, "symmetric")
    #: W-only (e.g. W4A32): no activation quantization, steps 3-4 skipped
    weight_only: bool = False

    # -- calibration data (select_calibration)
    #: uniform_interval | first_n | middle_n | last_n | single_t
    calib_policy: str = "uniform_interval"
    #: number of selected steps (single_t: ignored)
    cali_st: int = default_of(UniformSelectionOptions, "cali_st")
    #: samples per selected step
    cali_n: int = default_of(UniformSelectionOptions, "cali_n")
    #: first | random samples per step
    pick: str = default_of(UniformSelectionOptions, "pick")
    #: the step of ``single_t`` (negative: from the end, -1 = the last step)
    single_step: int = default_of(SingleStepOptions, "step")
    calib_seed: int = default_of(UniformSelectionOptions, "seed")

    # -- activation init
    act_init_n: int = 64
    #: random | first samples for the init forward
    act_init_pick: str = "random"
    #: then stream the whole set under ema_minmax (``--running_stat``)
    act_ema: bool = default_of(ActInitOptions, "ema")
    act_ema_momentum: float = default_of(ActInitOptions, "ema_momentum")
    act_ema_batch: int = default_of(ActInitOptions, "ema_batch")

    # -- reconstruction
    weight_recon: bool = True
    #: the LSQ activation pass (False: keep the init ranges)
    act_recon: bool = True
    #: block | layer
    recon_granularity: str = default_of(AdaRoundOptions, "granularity")
    #: execution | registration (official)
    unit_order: str = default_of(AdaRoundOptions, "unit_order")
    # (defaults: the adaround / lsq stages' own, written once there)
    iters_w: int = default_of(AdaRoundOptions, "iters")
    iters_a: int = default_of(LSQOptions, "iters")
    batch_size: int = default_of(AdaRoundOptions, "batch_size")
    lr_w: float = default_of(AdaRoundOptions, "lr")
    lr_a: float = default_of(LSQOptions, "lr")
    p_w: float = default_of(AdaRoundOptions, "p")
    p_act: float = default_of(LSQOptions, "p")
    round_reg_weight: float = default_of(AdaRoundOptions, "reg_weight")
    beta_start: float = default_of(AdaRoundOptions, "beta_start")
    beta_end: float = default_of(AdaRoundOptions, "beta_end")
    warmup: float = default_of(AdaRoundOptions, "warmup")
    #: official quirk: only the first half of a split layer is regularised / softened (§3.4)
    split_reg_first_half_only: bool = default_of(AdaRoundOptions, "first_half_only")

    # -- engine (EngineSettings' defaults)
    seed: int = default_of(EngineSettings, "seed")
    #: float32 | float16 storage of the unit caches
    cache_dtype: str = default_of(EngineSettings, "cache_dtype")
    #: auto | memory | disk
    cache_storage: str = default_of(EngineSettings, "cache_storage")
    cache_memory_mb: float = default_of(EngineSettings, "cache_memory_mb")
    #: cached samples on which each unit's initial/final loss is reported
    eval_samples: int = default_of(EngineSettings, "eval_samples")
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
                              "(the official symmetric mse search is broken, docs/methods.md §3.4)")
        CacheOptions(dtype=self.cache_dtype, storage=self.cache_storage, memory_limit_mb=self.cache_memory_mb)

    @property
    def recipe_name(self) -> str:
        return "qdiffusion_official" if self.official else "qdiffusion"

    def check_calibration(self, steps: int) -> None:
        """Options that depend on the calibration schedule, checked before anything is captured."""
        if self.calib_policy == "single_t" and not -steps <= self.single_step < steps:
            raise ConfigError(f"single_step={self.single_step} is outside the calibration schedule's {steps} steps "
                              f"(use 0..{steps - 1}, or -1 for the last)")

    # ------------------------------------------------------------------ as stages
    def to_recipe(self) -> Recipe:
        """These knobs as the stage list of the ``qdiffusion`` preset (``recipes/presets``)."""
        sel = {"cali_st": self.cali_st, "cali_n": self.cali_n, "pick": self.pick, "seed": self.calib_seed}
        if self.calib_policy == "uniform_interval":
            selection = UniformSelection(sel)
        elif self.calib_policy == "single_t":
            selection = SingleStepSelection(step=self.single_step, cali_n=self.cali_n, pick=self.pick,
                                            seed=self.calib_seed)
        else:
            selection = WindowSelection(sel, where=self.calib_policy.split("_")[0])
        units = {"granularity": self.recon_granularity, "unit_order": self.unit_order}
        stages = [
            selection,
            Wrap(split=self.split, softmax_bits=self.softmax_bits, attn_matmul=self.attn_matmul,
                 weight_only=self.weight_only),
            RoundToNearest(policy=self.w_init),
        ]
        if self.weight_recon:
            stages.append(AdaRound(iters=self.iters_w, batch_size=self.batch_size, lr=self.lr_w, p=self.p_w,
                                   reg_weight=self.round_reg_weight, beta_start=self.beta_start,
                                   beta_end=self.beta_end, warmup=self.warmup,
                                   first_half_only=self.split_reg_first_half_only, **units))
        stages.append(ActInit(policy=self.a_init, symmetric=self.a_symmetric, n=self.act_init_n,
                              pick=self.act_init_pick, ema=self.act_ema, ema_momentum=self.act_ema_momentum,
                              ema_batch=self.act_ema_batch))
        if self.act_recon:
            stages.append(LSQ(iters=self.iters_a, batch_size=self.batch_size, lr=self.lr_a, p=self.p_act, **units))
        engine = EngineSettings(seed=self.seed, cache_dtype=self.cache_dtype, cache_storage=self.cache_storage,
                                cache_memory_mb=self.cache_memory_mb, eval_samples=self.eval_samples)
        return Recipe(self.recipe_name, stages, engine, description=_DESCRIPTION[self.official])

    def wrap_config(self, quant: QuantConfig) -> QuantConfig:
        """``quant`` with Q-Diffusion's wrapping knobs applied (a new object)."""
        return self.to_recipe().wrap_config(quant)

    def select_calibration(self, cache: TrajectoryCache) -> CalibrationSet:
        """The calibration set of ``calib_policy`` from captured FP trajectories (§3.1).

        Counts larger than the cache holds are reduced to what it holds, with a warning.
        """
        return self.to_recipe().select(cache)


_DESCRIPTION = {
    False: "Q-Diffusion (arXiv 2302.04304): timestep-uniform calibration, BRECQ/AdaRound weights, LSQ activations",
    True: "Q-Diffusion with the official code's switches (registration unit order, split regulariser quirk)",
}


@dataclass
class QDiffusionOfficialConfig(QDiffusionConfig):
    """``qdiffusion_official``: the official code's switches (docs/methods.md §3.4)."""

    unit_order: str = "registration"
    split_reg_first_half_only: bool = True
    official: bool = True


# ---------------------------------------------------------------------- stages
def init_activations(qmodel: QuantModel, data: CalibrationCalls | None, config: QDiffusionConfig,
                     forward_loop: ForwardLoop | None = None) -> None:
    """§3.2 step 4 (the recipe's ``act_init`` stage): one forward of ``act_init_n`` samples with
    weights and activations on, then the optional EMA stream. Without ``data`` the
    ``forward_loop`` provides the init forward."""
    stage = config.to_recipe().stage("act_init")
    ctx = StageContext(calib_set=None if data is None else data.calib_set, forward_loop=forward_loop,
                       engine=EngineSettings(seed=config.seed), progress=False)
    ctx.data = data
    stage.run(qmodel, ctx)


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
    ctx = StageContext(calib_set=calib_set, call=call, fp_model=fp_model, forward_loop=forward_loop,
                       work_dir=work_dir, device=device, progress=progress)
    return run_recipe(qmodel, config.to_recipe(), ctx, recipe_config=config)


__all__ = [
    "CALIB_POLICIES",
    "QDiffusionConfig",
    "QDiffusionOfficialConfig",
    "init_activations",
    "run_qdiffusion",
    "stream_ema",
]
