"""Reusable reconstruction passes: AdaRound weights (§1.3) and LSQ activation steps (§1.4).

Each pass's knobs and their one default live in its settings block (:class:`AdaRoundSettings`,
:class:`LSQSettings`); the recipe stages' option blocks extend those blocks instead of restating
them, and a pass built with keyword arguments takes the rest from the same block.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import checked, default_of, knob
from ..nn.layers import QuantLayer, attach_adaround
from ..quant.adaround import AdaRound, BetaSchedule
from ..quant.affine import MIN_STEP
from .engine import ReconPass, UnitOptim
from .loss import rounding_regularizer
from .units import Unit


@dataclass
@checked
class AdaRoundSettings:
    """The knobs of :class:`AdaRoundPass`."""

    iters: int = knob(20000, doc="Adam iterations per unit")
    batch_size: int = knob(32, ge=1, doc="cached samples per iteration")
    lr: float = knob(1e-3, gt=0, doc="Adam learning rate of the rounding variables V")
    p: float = knob(2.0, gt=0, doc="exponent of the reconstruction loss ‖·‖_p^p")
    reg_weight: float = knob(0.01, doc="λ of the rounding regulariser")
    beta_start: float = default_of(BetaSchedule, "start", doc="β of the regulariser at the end of the warm-up")
    beta_end: float = default_of(BetaSchedule, "end", doc="β at the last iteration")
    warmup: float = default_of(BetaSchedule, "warmup", lt=1, doc="fraction of iterations without the regulariser")
    first_half_only: bool = knob(False, doc="official quirk: only the first half of a split layer regularised (§3.4)")


@dataclass
@checked
class LSQSettings:
    """The knobs of :class:`LSQPass`."""

    iters: int = knob(5000, doc="Adam iterations per unit")
    batch_size: int = knob(32, ge=1, doc="cached samples per iteration")
    lr: float = knob(4e-4, gt=0, doc="Adam learning rate of the activation steps (cosine annealed)")
    p: float = knob(2.4, gt=0, doc="exponent of the reconstruction loss")


def settings_of(cls: type, given, overrides: dict):
    """A validated ``cls`` from the fields of ``given`` that ``cls`` has (an options block that
    extends or shares them; None: the defaults), with ``overrides`` applied."""
    base = {f.name: getattr(given, f.name) for f in dataclasses.fields(cls) if hasattr(given, f.name)}
    return cls(**{**base, **overrides})


class AdaRoundPass(ReconPass):
    """BRECQ/AdaRound weight reconstruction (docs/methods.md §1.3, §3.2 step 3).

    Per unit: attach AdaRound to every quantized weight part and initialise V from the frozen
    (s, z) so that h(V₀) = W/s − ⌊W/s⌋; Adam on V only; loss = L_rec^p + λ·Σ(1 − |2h(V)−1|^β)
    with β annealed after the warm-up; then harden h = 1[V ≥ 0]. Activations are off; inputs are
    x_in^q from the weight-quantized prefix, targets y^fp. Units without quantized weights (e.g.
    attention matmuls only) are skipped.

    ``first_half_only`` reproduces Q-Diffusion's split quirk: only the first weight half of a split
    layer enters the regulariser, and in a *layer* unit the second half is not softened at all
    (it keeps round-to-nearest).
    """

    name = "weights"
    inputs = "q"
    quant_state = (True, False)

    def __init__(self, settings: AdaRoundSettings | None = None, /, **overrides):
        self.settings = s = settings_of(AdaRoundSettings, settings, overrides)
        super().__init__(s.iters, s.batch_size, s.p)
        self.lr = s.lr
        self.reg_weight = s.reg_weight
        self.beta_start = s.beta_start
        self.beta_end = s.beta_end
        self.warmup = s.warmup
        self.first_half_only = s.first_half_only
        self._schedule = BetaSchedule(max(self.iters, 1), self.warmup, self.beta_start, self.beta_end)
        self._regularized: list[AdaRound] = []

    def applies(self, unit: Unit) -> bool:
        return unit.has_weights

    def _is_frozen_half(self, unit: Unit, layer: QuantLayer, part: int) -> bool:
        return self.first_half_only and unit.kind == "layer" and layer.split is not None and part == 1

    def setup(self, unit: Unit) -> UnitOptim:
        trained, self._regularized = [], []
        active = {(id(layer), i) for layer, i in unit.weight_parts()}
        for layer in unit.layers.values():
            if not any((id(layer), i) in active for i in range(len(layer.weight_quantizers))):
                continue
            roundings = attach_adaround(layer)
            for i, (w, q, r) in enumerate(zip(layer.weight_parts(), layer.weight_quantizers, roundings)):
                r.V.requires_grad_(False)
                if (id(layer), i) not in active:
                    r.mode = "hard"  # an FP part: AdaRound is never used
                    continue
                r.init_from(w.detach(), q)
                if self._is_frozen_half(unit, layer, i):
                    r.harden()  # round-to-nearest: h = 1[f ≥ 0.5]
                    continue
                r.V.requires_grad_(True)
                trained.append(r.V)
                if not (self.first_half_only and layer.split is not None and i == 1):
                    self._regularized.append(r)
            layer.clear_cache()
        return UnitOptim([torch.optim.Adam(trained, lr=self.lr)] if trained else [])

    def regularizer(self, count: int) -> Tensor | None:
        """λ·Σ(1 − |2h(V)−1|^β) over the unit being trained at iteration ``count``; None while
        the schedule is in its warm-up or λ = 0 (used by passes that combine AdaRound with more)."""
        reg, _ = rounding_regularizer(self._regularized, self._schedule, count, self.reg_weight)
        return reg

    def loss(self, unit: Unit, pred: Tensor, target: Tensor, count: int) -> Tensor:
        rec = self.rec_loss(unit, pred, target)
        reg = self.regularizer(count)
        return rec if reg is None else rec + reg

    def finish(self, unit: Unit) -> None:
        for layer in unit.layers.values():
            if layer.adaround is None:
                continue
            for r in layer.adaround:
                if r.mode == "soft":
                    r.harden()
                r.V.requires_grad_(False)
            layer.clear_cache()
        self._regularized = []


class LSQPass(ReconPass):
    """LSQ activation-step reconstruction (docs/methods.md §1.4, §3.2 step 5).

    Per unit: every active activation step in the unit (layer inputs including both split halves,
    attention q/k/v and the softmax output unless it is kept at 16 bit) is trained with Adam and
    cosine annealing to 0; zero points stay frozen and weights stay hard. Inputs x_in^fp (or x_in^q
    with ``inputs="q"``), targets y^fp, loss L_rec^p. Steps are kept ≥ the 1e-8 floor.
    """

    name = "acts"
    quant_state = (True, True)

    def __init__(self, settings: LSQSettings | None = None, /, *, cosine: bool = True, inputs: str = "fp",
                 **overrides):
        self.inputs = inputs
        self.settings = s = settings_of(LSQSettings, settings, overrides)
        super().__init__(s.iters, s.batch_size, s.p)
        self.lr = s.lr
        self.cosine = bool(cosine)
        self._steps: list[torch.nn.Parameter] = []

    def applies(self, unit: Unit) -> bool:
        return bool(unit.act_quantizers())

    def setup(self, unit: Unit) -> UnitOptim:
        quantizers = unit.act_quantizers()
        for q in quantizers:
            q.set_learnable(step=True, zero_point=False)
        self._steps = [q.step for q in quantizers]
        opt = torch.optim.Adam(self._steps, lr=self.lr)
        schedulers = []
        if self.cosine and self.iters > 0:
            schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.iters, eta_min=0.0))
        return UnitOptim([opt], schedulers)

    @torch.no_grad()
    def after_step(self, unit: Unit) -> None:
        for step in self._steps:
            step.clamp_(min=MIN_STEP)

    def finish(self, unit: Unit) -> None:
        for q in unit.act_quantizers():
            q.set_learnable(step=False, zero_point=False)
        self._steps = []
