"""EDA-DM's FBR reconstruction pass (docs/methods.md §4.2): joint AdaRound + LSQ with layer losses.

Per unit, in one pass, AdaRound V (Adam, ``lr_w``, cosine) and every activation step of the unit
(a second Adam, ``lr_a``, cosine) are learned together. Each iteration:

1. x = where(u < ``input_mix``, x_in^q, x_in^fp) for the unit's main input (its first argument;
   the other arguments, e.g. the time embedding, come from x_in^q as in the official code);
   x_in^q is cached from the model with weights *and* activations quantized;
2. the quantized unit (soft rounding; QDrop: every activation quantizer of the unit keeps Q(x)
   with probability ``qdrop_p`` per element, else x) gives ŷ and the layer outputs ŷ_l;
3. the float unit (the same module with its quantization switched off) on x_in^fp gives y_l;
   y is the cached y^fp;
4. L = L_rec^p(ŷ, y) + ``add_loss``·Σ_{l∈S} L_rec^p(ŷ_l, y_l) (+ the AdaRound regulariser when
   ``round_reg_weight`` > 0), with S the unit's quantized layers in execution order except the one
   producing the block output (:func:`output_layer`; empty for layer units).

``extra_forward=True`` reproduces the official code, which takes ŷ_l from a second hooked
quantized forward with fresh QDrop masks (3 forwards per iteration instead of 2). With
``learn_weights`` / ``learn_acts`` the same pass can run weights and steps sequentially.
The unit's initial / final loss (records) is the block loss on x_in^q without QDrop.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from ..config import checked, default_of, knob
from ..errors import ConfigError, DiffquantError
from ..quant.adaround import BetaSchedule
from ..quant.qdrop import mix_inputs
from .cache import UnitCache, first_tensor
from .engine import ReconPass, UnitOptim
from .loss import lp_loss
from .passes import AdaRoundPass, LSQPass, settings_of
from .units import Unit

#: which layer produces the block output: the last executed (library) or registered (official)
FBR_EXCLUDES = ("executed", "registered")

Call = tuple[tuple, dict]


def output_layer(unit: Unit, exclude: str = "executed") -> str | None:
    """The layer of ``unit`` treated as producing its output (left out of the layer losses)."""
    if exclude not in FBR_EXCLUDES:
        raise ConfigError(f"fbr_exclude must be one of {FBR_EXCLUDES}, got {exclude!r}")
    names = list(unit.layers)  # execution order (the wrap plan's)
    if not names:
        return None
    if exclude == "executed":
        return names[-1]
    position = {id(m): i for i, m in enumerate(unit.module.modules())}
    return max(names, key=lambda n: position[id(unit.layers[n])])


def fbr_layers(unit: Unit, exclude: str = "executed") -> list[str]:
    """S: the unit's quantized layers, in execution order, without :func:`output_layer`."""
    last = output_layer(unit, exclude)
    return [n for n in unit.layers if n != last]


def mix_main_input(q_call: Call, fp_call: Call, prob: float) -> Call:
    """The q call with its main input (first positional tensor, else ``hidden_states=``) replaced
    by where(u < prob, x_in^q, x_in^fp); prob 1 gives x_in^q and 0 gives x_in^fp."""
    (q_args, q_kwargs), (fp_args, fp_kwargs) = q_call, fp_call
    if q_args and isinstance(q_args[0], Tensor):
        return (mix_inputs(q_args[0], fp_args[0], prob), *q_args[1:]), q_kwargs
    if isinstance(q_kwargs.get("hidden_states"), Tensor):
        return q_args, {**q_kwargs, "hidden_states": mix_inputs(q_kwargs["hidden_states"],
                                                                fp_kwargs["hidden_states"], prob)}
    raise DiffquantError("cannot find the unit's main input to mix (no tensor argument)")


@contextmanager
def float_unit(unit: Unit) -> Iterator[Unit]:
    """The unit's layers and attention matmuls unquantized inside the block (the FP unit)."""
    layers = [(layer, layer.use_weight_quant, layer.use_act_quant) for layer in unit.layers.values()]
    procs = [(proc, proc.use_act_quant) for proc in unit.attention.values()]
    for layer, _, _ in layers:
        layer.use_weight_quant = layer.use_act_quant = False
    for proc, _ in procs:
        proc.use_act_quant = False
    try:
        yield unit
    finally:
        for layer, w, a in layers:
            layer.use_weight_quant, layer.use_act_quant = w, a
        for proc, a in procs:
            proc.use_act_quant = a


@contextmanager
def record_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """``{name: output}`` of each module's first call inside the block (graph kept)."""
    outputs: dict[str, Tensor] = {}

    def hook(name: str):
        def fn(module, args, output):
            outputs.setdefault(name, first_tensor(output))
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in modules.items()]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@dataclass
@checked
class FBRSettings:
    """The knobs of :class:`FBRPass`."""

    iters: int = knob(5000, doc="iterations per unit")
    batch_size: int = knob(32, ge=1, doc="cached samples per iteration")
    lr_w: float = knob(5e-1, gt=0, doc="learning rate of the rounding variables")
    lr_a: float = knob(5e-4, gt=0, doc="learning rate of the activation steps")
    p: float = knob(2.0, gt=0, doc="exponent of the block and layer losses")
    add_loss: float = knob(0.8, doc="weight of the layer losses (0: plain block loss)")
    qdrop_p: float = knob(0.5, le=1, doc="QDrop: probability of keeping Q(x) per element (1: off)")
    input_mix: float = knob(0.5, le=1, doc="probability of x_in^q per element of the unit input (1: x_in^q only)")
    round_reg_weight: float = knob(1e-4, doc="λ of the AdaRound rounding regulariser (0: off, the official code)")
    beta_start: float = default_of(BetaSchedule, "start", doc="β at the end of the warm-up")
    beta_end: float = default_of(BetaSchedule, "end", doc="β at the last iteration")
    warmup: float = default_of(BetaSchedule, "warmup", lt=1, doc="fraction of iterations without the regulariser")
    exclude: str = knob("executed", doc="layer left out of the layer losses: executed | registered (official)")
    extra_forward: bool = knob(False, doc="ŷ_l from an extra hooked quantized forward (official: 3 forwards)")

    def __post_init__(self) -> None:
        if self.exclude not in FBR_EXCLUDES:
            raise ConfigError(f"fbr_exclude must be one of {', '.join(FBR_EXCLUDES)}, got {self.exclude!r}")


class FBRPass(ReconPass):
    """EDA-DM's joint AdaRound + LSQ pass with the FBR loss (see the module docstring)."""

    name = "fbr"
    inputs = "both"
    quant_state = (True, True)

    def __init__(self, settings: FBRSettings | None = None, /, *, learn_weights: bool = True,
                 learn_acts: bool = True, quantize_acts: bool = True, name: str | None = None, **overrides):
        self.settings = s = settings_of(FBRSettings, settings, overrides)
        super().__init__(s.iters, s.batch_size, s.p)
        add_loss, qdrop_p, input_mix, exclude = s.add_loss, s.qdrop_p, s.input_mix, s.exclude
        extra_forward = s.extra_forward
        if not (learn_weights or learn_acts):
            raise ConfigError("an FBR pass must learn weights, activation steps or both")
        if name is not None:
            self.name = name
        self.add_loss = float(add_loss)
        self.qdrop_p = float(qdrop_p)
        self.input_mix = float(input_mix)
        self.exclude = exclude
        self.extra_forward = bool(extra_forward)
        self.learn_weights = bool(learn_weights)
        self.learn_acts = bool(learn_acts) and bool(quantize_acts)
        self.quantize_acts = bool(quantize_acts)
        self.quant_state = (True, self.quantize_acts)
        self._weights = AdaRoundPass(iters=s.iters, batch_size=s.batch_size, lr=s.lr_w, p=s.p,
                                     reg_weight=s.round_reg_weight, beta_start=s.beta_start, beta_end=s.beta_end,
                                     warmup=s.warmup)
        self._acts = LSQPass(iters=s.iters, batch_size=s.batch_size, lr=s.lr_a, p=s.p, cosine=True)
        self._layers: dict[str, nn.Module] = {}
        self._regularize = False

    # ------------------------------------------------------------------ engine hooks
    def applies(self, unit: Unit) -> bool:
        return (self.learn_weights and unit.has_weights) or (self.learn_acts and bool(unit.act_quantizers()))

    def setup(self, unit: Unit) -> UnitOptim:
        optim = UnitOptim()
        self._regularize = self.learn_weights and unit.has_weights
        if self._regularize:
            weights = self._weights.setup(unit)
            for opt in weights.optimizers:
                optim.optimizers.append(opt)
                if self.iters > 0:
                    optim.schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.iters))
        if self.learn_acts and unit.act_quantizers():
            acts = self._acts.setup(unit)
            optim.optimizers += acts.optimizers
            optim.schedulers += acts.schedulers
        if self.quantize_acts:
            for q in unit.act_quantizers():
                q.qdrop_prob = self.qdrop_p
        names = fbr_layers(unit, self.exclude) if self.add_loss > 0 else []
        self._layers = {n: unit.layers[n] for n in names}
        return optim

    def unit_inputs(self, cache: UnitCache, index: Tensor, device, training: bool) -> Call:
        q_call = cache.inputs(index, "q", device)
        if not training:
            return q_call
        return mix_main_input(q_call, cache.inputs(index, "fp", device), self.input_mix)

    def training_loss(self, unit: Unit, cache: UnitCache, index: Tensor, device, count: int) -> Tensor:
        fp_call = cache.inputs(index, "fp", device)
        args, kwargs = mix_main_input(cache.inputs(index, "q", device), fp_call, self.input_mix)
        if not self._layers:
            pred = first_tensor(unit.module(*args, **kwargs))
            layer_loss = None
        else:
            if self.extra_forward:
                pred = first_tensor(unit.module(*args, **kwargs))
                with record_outputs(self._layers) as q_out:
                    unit.module(*args, **kwargs)
            else:
                with record_outputs(self._layers) as q_out:
                    pred = first_tensor(unit.module(*args, **kwargs))
            with torch.no_grad(), float_unit(unit), record_outputs(self._layers) as fp_out:
                unit.module(*fp_call[0], **fp_call[1])
            missing = [n for n in self._layers if n not in q_out or n not in fp_out]
            if missing:
                raise DiffquantError(f"{unit.name}: layer {missing[0]} was not called by the unit")
            layer_loss = torch.stack([lp_loss(q_out[n], fp_out[n], self.p) for n in self._layers]).sum()
        loss = self.rec_loss(unit, pred, cache.target(index, device))
        if layer_loss is not None:
            loss = loss + self.add_loss * layer_loss
        reg = self._weights.regularizer(count) if self._regularize else None
        return loss if reg is None else loss + reg

    def after_step(self, unit: Unit) -> None:
        self._acts.after_step(unit)

    def finish(self, unit: Unit) -> None:
        if self.learn_weights:
            self._weights.finish(unit)
        if self.learn_acts:
            self._acts.finish(unit)
        for q in unit.act_quantizers():
            q.qdrop_prob = 1.0
        self._layers = {}
        self._regularize = False


__all__ = ["FBRPass", "FBR_EXCLUDES", "fbr_layers", "float_unit", "mix_main_input", "output_layer",
           "record_outputs"]
