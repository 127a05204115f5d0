"""MPQ-DM (docs/methods.md §6) and its substrate EfficientDM, as recipes ``mpqdm``, ``mpqdm_official``
and ``efficientdm``.

Not a reconstruction method. Given a model wrapped with :meth:`MPQDMConfig.wrap_config`
(``lp_shrink`` ranges, no split, attention matmuls FP):

1. coverage rules on the plan's roles (:mod:`diffquant.finetune.coverage`, in the wrap stage):
   conv_in, the time-embedding MLP and conv_out at W8A8 (static, frozen); shortcut and downsample
   convs FP; all other layers "mixed";
2. Stage 1 (:mod:`diffquant.finetune.stage1`) on ``stage1_batch`` random tuples of the calibration
   pool (every step of the FP trajectories, :meth:`MPQDMConfig.select_calibration`): SmoothQuant
   α = 0.5, OMQ's kurtosis split N−1/N/N+1, per-channel ``lp_shrink`` weights per bit group,
   per-tensor ``lp_shrink`` activations on X/s;
3. TALSQ tables (one row per step of the K-step DDIM schedule), LoRA (rank 32, B = 0) on the mixed
   layers;
4. Stage 2 (:func:`diffquant.finetune.qalora.finetune`): data-free distillation along the FP DDIM
   trajectory, ε-loss plus TRD (:mod:`diffquant.finetune.trd`), resumable per epoch.

``efficientdm`` (:class:`EfficientDMConfig`) is the same pipeline with ``efficientdm_only``: no
smoothing, no OMQ (uniform N-bit weights), no TRD, the weight zero point frozen (EfficientDM
learns the weight step only). ``mpqdm_official`` (:class:`MPQDMOfficialConfig`) sets the official
code's switches (§6.5): candidates {0, 10%}, TRD without gradient, the LoRA lr base with
placeholder steps.

Sampling must use the fine-tuning schedule (DDIM with ``steps`` steps): the TALSQ table rows are
looked up by timestep and an unknown timestep fails loudly (§1.7).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..diffusion import distributed
from ..calib.cache import TrajectoryCache
from ..calib.select import CalibrationSet
from ..config import QuantConfig, checked, default_of, knob
from ..errors import ConfigError
from ..finetune.coverage import DEFAULT_EIGHT_BIT, DEFAULT_FP, coverage_of, coverage_rules
from ..finetune.qalora import (
    LORA_LR_MODES, FinetuneCheckpoint, FinetuneOptions, attach_adapters, build_optimizer, expand_act_tables,
    finetune, set_trainable,
)
from ..finetune.stage1 import Stage1Options, run_stage1
from ..finetune.trd import TRD_GRADS, TRD_LOSSES
from ..jsonio import write_json
from ..model.qmodel import QuantModel
from ..quant.omq import CANDIDATE_MODES, CRITERIA
from ..recipes import STAGES, EngineSettings, ForwardLoop, Recipe, Stage, StageContext, run_recipe
from ..recon.cache import DenoiserCall, default_call
from ..recon.progress import fingerprint_of
from .stages import AllStepsSelection, Wrap, acts_quantized

_FT = FinetuneOptions()


@dataclass
@checked
class OMQOptions:
    mixed: bool = knob(True, doc="OMQ: kurtosis split of the output channels into N−1 / N / N+1-bit groups (false: uniform N bits)")
    criterion: str = knob("kurtosis", doc="channel ranking: kurtosis | random | head_tail")
    candidates: str = knob("paper", doc="split sizes: paper (k = 0, g, 2g, … ≤ C/2) | code ({0, g})")
    smooth: bool = knob(True, doc="SmoothQuant pre-scaling of the mixed layers")
    smooth_alpha: float = knob(0.5, le=1, doc="α of that smoothing")
    batch: int = knob(32, ge=1, doc="random calibration tuples in the one Stage-1 forward")
    pick_seed: int = knob(0, doc="seed of that draw")

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ConfigError(f"omq_criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.candidates not in CANDIDATE_MODES:
            raise ConfigError(f"omq_candidates must be one of {', '.join(CANDIDATE_MODES)}, got {self.candidates!r}")


@dataclass
@checked
class QALoRAOptions:
    lora_rank: int = knob(32, doc="rank of the LoRA adapters on the mixed layers (0: none)")
    epochs: int = knob(_FT.epochs, doc="E: epochs of data-free distillation (ImageNet: 800)")
    steps: int | None = knob(None, ge=1, doc="K: DDIM steps of the fine-tuning (and sampling) schedule; null: the calibration schedule")
    batch_size: int = knob(_FT.batch_size, ge=1, doc="trajectories per update")
    guidance: float | None = knob(None, doc="CFG scale in the loop; null: the model's default")
    lora_lr: str = knob(_FT.lora_lr, doc="LoRA lr base ā: library (channels' own steps) | code (with placeholders)")
    lora_lr_divisor: float = knob(_FT.lora_lr_divisor, gt=0, doc="LoRA lr = ā / this")
    weight_lr: float = knob(_FT.weight_lr, gt=0, doc="lr of the weight steps (and zero points)")
    act_lr: float = knob(_FT.act_lr, gt=0, doc="lr of the TALSQ activation steps")
    weight_decay: float = knob(_FT.weight_decay, doc="AdamW weight decay")
    learn_weight_zero_point: bool = knob(_FT.learn_weight_zero_point, doc="learn the weight zero point (EfficientDM: step only)")
    trd: bool = knob(_FT.trd, doc="TRD: time-smoothed relation distillation")
    trd_grad: str = knob(_FT.trd_grad, doc="current | window | none (official: detached)")
    trd_n: int = knob(_FT.trd_n, ge=1, doc="steps in the TRD window")
    trd_tau: float = knob(_FT.trd_tau, gt=0, doc="temperature of the relation softmax")
    trd_weight: float = knob(_FT.trd_weight, doc="weight of the TRD loss")
    trd_loss: str = knob(_FT.trd_loss, doc="relation_kl | l2_feature")
    trd_feature: str | None = knob(_FT.trd_feature, doc="module whose output TRD compares (null: the last block before the head)")

    def __post_init__(self) -> None:
        if self.trd_grad not in TRD_GRADS:
            raise ConfigError(f"trd_grad must be one of {', '.join(TRD_GRADS)}, got {self.trd_grad!r}")
        if self.trd_loss not in TRD_LOSSES:
            raise ConfigError(f"trd_loss must be one of {', '.join(TRD_LOSSES)}, got {self.trd_loss!r}")
        if self.lora_lr not in LORA_LR_MODES:
            raise ConfigError(f"lora_lr must be one of {', '.join(LORA_LR_MODES)}, got {self.lora_lr!r}")


@dataclass
@checked
class MPQDMConfig:
    """All knobs of MPQ-DM (docs/methods.md §6, ablation switches §8); defaults = the library's."""

    # -- wrapping
    #: W-only: no activation quantization (no TALSQ)
    weight_only: bool = False
    #: 8-bit layers (W8A8, static, frozen): ``@role`` entries or name globs (finetune.coverage)
    eight_bit_layers: list[str] = field(default_factory=lambda: list(DEFAULT_EIGHT_BIT))
    #: layers kept in floating point: ``@shortcut``, ``@downsample`` or name globs
    fp_layers: list[str] = field(default_factory=lambda: list(DEFAULT_FP))

    # -- calibration pool and Stage 1
    #: trajectories per step in the pool (None: all captured)
    pool_n: int | None = None
    #: random pool tuples in the one Stage-1 forward
    stage1_batch: int = default_of(OMQOptions, "batch")
    calib_seed: int = default_of(OMQOptions, "pick_seed")
    #: OMQ (kurtosis split into N−1 / N / N+1-bit channel groups)
    omq: bool = default_of(OMQOptions, "mixed")
    #: kurtosis | random | head_tail
    omq_criterion: str = default_of(OMQOptions, "criterion")
    #: paper (k = 0, g, 2g, … ≤ C/2) | code ({0, g}); g = ⌊C_out/10⌋
    omq_candidates: str = default_of(OMQOptions, "candidates")
    #: SmoothQuant pre-scaling of the mixed layers
    smooth: bool = default_of(OMQOptions, "smooth")
    smooth_alpha: float = default_of(OMQOptions, "smooth_alpha")

    # -- Stage 2: fine-tuning
    lora_rank: int = default_of(QALoRAOptions, "lora_rank")
    #: E (ImageNet: 800)
    epochs: int = default_of(QALoRAOptions, "epochs")
    #: K: DDIM steps of the fine-tuning (and sampling) schedule; None = the calibration schedule
    steps: int | None = default_of(QALoRAOptions, "steps")
    batch_size: int = default_of(QALoRAOptions, "batch_size")
    #: CFG scale in the loop; None = the model's default (1 for unconditional models)
    guidance: float | None = default_of(QALoRAOptions, "guidance")
    seed: int = default_of(FinetuneOptions, "seed")
    #: LoRA lr = ā / lora_lr_divisor; ā: library (channels' own steps) | code (with placeholders)
    lora_lr: str = default_of(QALoRAOptions, "lora_lr")
    lora_lr_divisor: float = default_of(QALoRAOptions, "lora_lr_divisor")
    weight_lr: float = default_of(QALoRAOptions, "weight_lr")
    act_lr: float = default_of(QALoRAOptions, "act_lr")
    weight_decay: float = default_of(QALoRAOptions, "weight_decay")
    #: learn the weight zero point with the weight step (EfficientDM: step only)
    learn_weight_zero_point: bool = default_of(QALoRAOptions, "learn_weight_zero_point")
    #: TRD (time-smoothed relation distillation)
    trd: bool = default_of(QALoRAOptions, "trd")
    #: current | window | none (official: detached, no gradient)
    trd_grad: str = default_of(QALoRAOptions, "trd_grad")
    trd_n: int = default_of(QALoRAOptions, "trd_n")
    trd_tau: float = default_of(QALoRAOptions, "trd_tau")
    trd_weight: float = default_of(QALoRAOptions, "trd_weight")
    #: relation_kl | l2_feature
    trd_loss: str = default_of(QALoRAOptions, "trd_loss")
    #: module whose output TRD compares (None: the last decoder block, finetune.trd)
    trd_feature: str | None = default_of(QALoRAOptions, "trd_feature")
    #: EfficientDM alone: OMQ, smoothing and TRD off, weight zero point frozen
    efficientdm_only: bool = False
    #: set by mpqdm_official
    official: bool = False

    def __post_init__(self) -> None:
        coverage_rules(self.eight_bit_layers, self.fp_layers)  # an unknown @role: one line, now
        if self.efficientdm_only:
            self.omq = self.smooth = self.trd = self.learn_weight_zero_point = False
        if self.omq_criterion not in CRITERIA:
            raise ConfigError(f"omq_criterion must be one of {', '.join(CRITERIA)}, got {self.omq_criterion!r}")
        if self.omq_candidates not in CANDIDATE_MODES:
            raise ConfigError(f"omq_candidates must be one of {', '.join(CANDIDATE_MODES)}, got {self.omq_candidates!r}")
        if self.trd_grad not in TRD_GRADS:
            raise ConfigError(f"trd_grad must be one of {', '.join(TRD_GRADS)}, got {self.trd_grad!r}")
        if self.trd_loss not in TRD_LOSSES:
            raise ConfigError(f"trd_loss must be one of {', '.join(TRD_LOSSES)}, got {self.trd_loss!r}")
        if self.lora_lr not in LORA_LR_MODES:
            raise ConfigError(f"lora_lr must be one of {', '.join(LORA_LR_MODES)}, got {self.lora_lr!r}")
        # numeric ranges (smooth_alpha, batches, epochs, steps, trd_tau, ...) come with the stage
        # defaults (default_of) and are checked by @checked
        if self.pool_n is not None and self.pool_n < 1:
            raise ConfigError(f"pool_n must be >= 1 (or None), got {self.pool_n}")

    @property
    def recipe_name(self) -> str:
        if self.efficientdm_only:
            return "efficientdm"
        return "mpqdm_official" if self.official else "mpqdm"

    def to_recipe(self) -> Recipe:
        """These knobs as the stage list of the ``mpqdm`` preset (``recipes/presets``)."""
        stages = [
            AllStepsSelection(cali_n=self.pool_n),
            Wrap(split=False, attn_matmul=False, weight_only=self.weight_only,
                 rules=coverage_rules(self.eight_bit_layers, self.fp_layers)),
            OMQ(smooth=self.smooth, smooth_alpha=self.smooth_alpha, mixed=self.omq, criterion=self.omq_criterion,
                candidates=self.omq_candidates, batch=self.stage1_batch, pick_seed=self.calib_seed),
            QALoRA(**{f.name: getattr(self, f.name) for f in dataclasses.fields(QALoRAOptions)}),
        ]
        return Recipe(self.recipe_name, stages, EngineSettings(seed=self.seed), description=_DESCRIPTION[self.recipe_name])

    def wrap_config(self, quant: QuantConfig) -> QuantConfig:
        """``quant`` with MPQ-DM's wrapping: lp_shrink ranges, no split, attention matmuls FP."""
        return self.to_recipe().wrap_config(quant)

    def select_calibration(self, cache: TrajectoryCache) -> CalibrationSet:
        """The calibration pool: every step of the captured trajectories (``pool_n`` each)."""
        return self.to_recipe().select(cache)

    def finetune_options(self, steps: int, guidance: float) -> FinetuneOptions:
        """The loop's options: every FinetuneOptions field this config shares by name, plus K and g."""
        return self.to_recipe().stage("qalora").finetune_options(steps, guidance, self.seed)


_DESCRIPTION = {
    "mpqdm": "MPQ-DM (arXiv 2412.11549): kurtosis-driven mixed precision (OMQ), QALoRA fine-tuning with TRD",
    "mpqdm_official": "MPQ-DM with the official code's switches (§6.5)",
    "efficientdm": "EfficientDM: QALoRA/TALSQ fine-tuning alone (no smoothing, OMQ or TRD; weight zero point frozen)",
}


@dataclass
class MPQDMOfficialConfig(MPQDMConfig):
    """``mpqdm_official``: the official code's switches (docs/methods.md §6.5)."""

    omq_candidates: str = "code"
    trd_grad: str = "none"
    lora_lr: str = "code"
    official: bool = True


@dataclass
class EfficientDMConfig(MPQDMConfig):
    """``efficientdm``: the substrate alone (no OMQ, smoothing or TRD; weight z frozen)."""

    efficientdm_only: bool = True


# ---------------------------------------------------------------------- helpers
def _schedule(bundle, calib_set: CalibrationSet | None, steps: int | None) -> list[int]:
    """The K timesteps of the fine-tuning / sampling schedule (DDIM)."""
    if steps is None:
        if calib_set is None:
            raise ConfigError("set steps= or pass the calibration set (its schedule gives K)")
        steps = int(torch.unique(calib_set.ts).numel())
    if bundle is None:
        if calib_set is None or int(torch.unique(calib_set.ts).numel()) != steps:
            raise ConfigError("without a bundle the schedule comes from the calibration set, which must "
                              f"hold all {steps} steps")
        return sorted({int(t) for t in calib_set.ts.tolist()}, reverse=True)
    from ..diffusion.sampling import scheduler_timesteps

    return [int(t) for t in scheduler_timesteps(bundle.scheduler_config, "ddim", steps)]


def _stage1_runner(calib_set: CalibrationSet | None, forward_loop: ForwardLoop | None, call: DenoiserCall | None,
                   batch: int, seed: int, device):
    if calib_set is None:
        if forward_loop is None:
            raise ConfigError("MPQ-DM Stage 1 needs calibration data: pass calib_set or a forward_loop")
        return forward_loop
    n = min(batch, len(calib_set))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(calib_set), generator=gen)[:n]
    x, t, labels = calib_set[idx]
    run = call or default_call

    def loop(model: nn.Module) -> None:
        run(model, x.to(device=device, dtype=torch.float32), t.to(device), None if labels is None else labels.to(device))

    return loop


def _mixed_layers(qmodel: QuantModel, ctx: StageContext) -> list[str]:
    """The layers no coverage rule sets (:func:`~diffquant.finetune.coverage.coverage_of`)."""
    ctx.shared.setdefault("coverage", coverage_of(qmodel))
    return list(ctx.shared["coverage"]["mixed"])


def _keep_records(qmodel: QuantModel, ctx: StageContext) -> None:
    qmodel.mpq_records = {"coverage": ctx.shared.get("coverage"), "stage1": ctx.shared.get("stage1", []),
                          "history": ctx.shared.get("history", [])}
    if ctx.work_dir is not None and distributed.dist_info().is_main:
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        write_json(ctx.work_dir / "mpqdm_records.json", qmodel.mpq_records, indent=1, default=float)
    qmodel.clear_weight_cache()


# ---------------------------------------------------------------------- stages
@STAGES.register("omq")
class OMQ(Stage):
    """MPQ-DM Stage 1: smoothing, OMQ bit allocation and lp_shrink ranges of every quantizer from one forward (§6.1)."""

    family = "bit_allocation"
    Options = OMQOptions
    before = frozenset({"weights_rounded", "finetuned"})

    def facts(self):
        provides = {"weights_init", "acts_init"}
        provides |= {"bit_allocation"} if self.options.mixed else set()
        provides |= {"input_scales"} if self.options.smooth else set()
        return frozenset(provides), self.requires, self.before

    def wrap_overrides(self, quant) -> dict:
        return {"weight_init": "lp_shrink", "act_init": "lp_shrink"}

    def run(self, qmodel, ctx: StageContext) -> None:
        o = self.options
        quant = qmodel.quant_config
        runner = _stage1_runner(ctx.calib_set, ctx.forward_loop, ctx.call, o.batch, o.pick_seed, ctx.device)
        ctx.shared["stage1"] = run_stage1(
            qmodel, runner, _mixed_layers(qmodel, ctx),
            Stage1Options(smooth=o.smooth, alpha=o.smooth_alpha, omq=o.mixed, criterion=o.criterion,
                          candidates=o.candidates, seed=ctx.engine.seed),
            quantize_weights=quant.quantize_weights, quantize_acts=quant.quantize_acts,
        )

    def finish(self, qmodel, ctx: StageContext) -> None:
        _keep_records(qmodel, ctx)


@STAGES.register("qalora")
class QALoRA(Stage):
    """EfficientDM/MPQ-DM Stage 2: TALSQ tables, LoRA, distillation along the FP trajectory with optional TRD (§6.2–§6.4)."""

    family = "finetune"
    Options = QALoRAOptions
    requires = frozenset({"weights_init"})
    provides = frozenset({"finetuned"})

    def finetune_options(self, steps: int, guidance: float, seed: int) -> FinetuneOptions:
        shared = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(FinetuneOptions)
                  if hasattr(self.options, f.name) and f.name not in ("steps", "guidance")}
        return FinetuneOptions(steps=steps, guidance=guidance, seed=seed, **shared)

    def _guidance(self, ctx: StageContext) -> float:
        if self.options.guidance is not None:
            return float(self.options.guidance)
        if ctx.guidance is not None:
            return float(ctx.guidance)
        return 1.0 if ctx.bundle is None else ctx.bundle.default_guidance

    def prepare(self, qmodel, ctx: StageContext) -> None:
        o = self.options
        if o.epochs > 0 and (ctx.fp_model is None or (ctx.bundle is None and ctx.calib_set is None)):
            raise ConfigError("MPQ-DM / EfficientDM fine-tuning distils the float model along its trajectories: pass "
                              "bundle= (sampled, the paper's) or fp_model= with a recorded calib_set")
        tables = acts_quantized(qmodel)
        ctx.shared["timesteps"] = _schedule(ctx.bundle, ctx.calib_set, o.steps) if (tables or o.epochs > 0) else []
        mixed = _mixed_layers(qmodel, ctx)
        ctx.shared["trained"] = mixed
        ctx.shared["lora_layers"] = [n for n in mixed if any(q.active for q in qmodel.layers()[n].weight_quantizers)
                                     ] if o.lora_rank else []

    def _checkpoint(self, ctx: StageContext):
        if ctx.work_dir is None:
            return None, None
        if "finetune_checkpoint" not in ctx.shared:
            checkpoint = FinetuneCheckpoint(ctx.work_dir, fingerprint_of(
                {"recipe": ctx.fingerprint, "timesteps": ctx.shared["timesteps"]}),
                min_interval_s=ctx.engine.checkpoint_every_s)
            ctx.shared["finetune_checkpoint"] = (checkpoint, checkpoint.read_state())
        return ctx.shared["finetune_checkpoint"]

    def resumed(self, qmodel, ctx: StageContext) -> bool:
        return self._checkpoint(ctx)[1] is not None

    def run(self, qmodel, ctx: StageContext) -> None:
        o = self.options
        timesteps = ctx.shared["timesteps"]
        checkpoint, state = self._checkpoint(ctx)
        if acts_quantized(qmodel):
            expand_act_tables(qmodel, timesteps)
        attach_adapters(qmodel, ctx.shared["lora_layers"], o.lora_rank, seed=ctx.engine.seed)
        if state is None:
            if checkpoint is not None:
                checkpoint.save(qmodel, 0, [], extra={"stage1": ctx.shared.get("stage1", []),
                                                      "coverage": ctx.shared.get("coverage")})
            history: list[dict] = []
            start = 0
        else:
            checkpoint.restore_model(qmodel)
            ctx.shared["stage1"] = checkpoint.extra.get("stage1", [])
            history, start = state["history"], int(state["epoch"])

        trained = ctx.shared["trained"]
        if o.epochs > start:
            options = self.finetune_options(len(timesteps), self._guidance(ctx), ctx.engine.seed)
            set_trainable(qmodel, trained, options.learn_weight_zero_point)
            optimizer, scheduler, _ = build_optimizer(qmodel, trained, options)
            if state is not None:
                checkpoint.restore_optimizer(state, optimizer, scheduler)
            source = None
            if ctx.bundle is None:  # trajectories recorded from the user's pipeline or sampler
                from ..calib.conditioning import conditioned_call
                from ..finetune.qalora import RecordedTrajectories

                source = RecordedTrajectories(ctx.calib_set, ctx.call or conditioned_call, options,
                                              torch.device(ctx.device))
            history = finetune(qmodel, ctx.fp_model, ctx.bundle, trained, options, checkpoint=checkpoint,
                               start_epoch=start, history=history, optimizer=optimizer, scheduler=scheduler,
                               device=ctx.device, progress=ctx.progress, source=source)
        ctx.shared["history"] = history

    def finish(self, qmodel, ctx: StageContext) -> None:
        _keep_records(qmodel, ctx)


# ---------------------------------------------------------------------- the recipe
def run_mpqdm(
    qmodel: QuantModel,
    forward_loop: ForwardLoop | None = None,
    config: MPQDMConfig | None = None,
    *,
    calib_set: CalibrationSet | None = None,
    call: DenoiserCall | None = None,
    fp_model: nn.Module | None = None,
    bundle=None,
    work_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    guidance: float | None = None,
) -> QuantModel:
    """Quantize ``qmodel`` in place with MPQ-DM / EfficientDM (the module docstring gives the stages).

    Args:
        calib_set: the calibration pool (x_t, t, labels); for CFG models with the null-label copies
            (:meth:`CalibrationSet.with_uncond`). Stage 1 draws ``stage1_batch`` tuples from it.
        forward_loop: used for Stage 1 only when no ``calib_set`` is given.
        call: ``call(model, x, t, labels)`` for Stage 1 (default: ``bundle.predict_noise``).
        fp_model: the float denoiser for distillation (default ``bundle.unet``).
        bundle: the :class:`~diffquant.bundle.DiffusionBundle` (scheduler, sample shape,
            classes) that the fine-tuning samples with; without it (``epochs > 0``) the fine-tuning
            follows the trajectories recorded in ``calib_set`` (e.g. from
            :func:`~diffquant.calib.pipeline_capture.capture_pipeline`) with ``fp_model``.
        work_dir: progress after Stage 1 and every epoch goes to ``<work_dir>/finetune``; a run with
            the same settings resumes there. Stage-1 records and the loss history go to
            ``mpqdm_records.json``.
        guidance: CFG scale of the loop when the config leaves it open (default: the bundle's).
    """
    config = config or MPQDMConfig()
    if bundle is not None:
        fp_model = bundle.unet if fp_model is None else fp_model
        call = call or bundle.predict_noise
    ctx = StageContext(calib_set=calib_set, call=call, fp_model=fp_model, bundle=bundle, forward_loop=forward_loop,
                       guidance=guidance, work_dir=work_dir, device=device, progress=progress)
    return run_recipe(qmodel, config.to_recipe(), ctx, recipe_config=config)


#: EfficientDM runs the same pipeline (with ``EfficientDMConfig``)
run_efficientdm = run_mpqdm

__all__ = ["EfficientDMConfig", "MPQDMConfig", "MPQDMOfficialConfig", "run_efficientdm", "run_mpqdm"]
