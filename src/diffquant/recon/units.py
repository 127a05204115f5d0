"""Reconstruction units (docs/methods.md §1.6): which modules are optimised together, in which order.

A :class:`Unit` is a block (e.g. ResnetBlock2D, Attention, an mnist-resunet ResBlock) with all the
quantized layers and attention matmul quantizers inside it, or a single quantized layer. Orders:

- ``execution``: the first-call order of one float forward (the wrap plan's order);
- ``registration``: the official code's recursive ``named_children`` walk (``named_modules``).

Granularity ``layer`` makes every quantized layer its own unit (BRECQ's layer-wise mode); each
diffusers Attention with quantized matmuls then becomes a weightless unit of its own, ordered right
after its last layer, so its q/k/v/softmax steps are still learned.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from ..model.plan import UnitPlan
from ..model.qmodel import QuantModel
from ..nn.attention import QuantAttnProcessor
from ..nn.layers import QuantLayer
from ..quant.quantizer import UniformQuantizer

UNIT_ORDERS = ("execution", "registration")
GRANULARITIES = ("block", "layer")


@dataclass
class Unit:
    """One reconstruction problem: ``module`` and the quantized pieces inside it."""

    index: int
    name: str
    kind: str  # "block" | "layer"
    module: nn.Module
    layers: dict[str, QuantLayer] = field(default_factory=dict)
    attention: dict[str, QuantAttnProcessor] = field(default_factory=dict)
    #: layer name -> whether the plan quantizes its input (False: input stays FP)
    quantize_input: dict[str, bool] = field(default_factory=dict)

    def weight_parts(self) -> list[tuple[QuantLayer, int]]:
        """(layer, part) pairs whose weight quantizer quantizes (not 16/32 bit, enabled)."""
        return [
            (layer, i)
            for layer in self.layers.values()
            if layer.use_weight_quant
            for i, q in enumerate(layer.weight_quantizers)
            if q.active
        ]

    def act_quantizers(self) -> list[UniformQuantizer]:
        """Activation quantizers that quantize inside this unit: layer inputs (split halves
        included) and the attention q/k/v/softmax quantizers."""
        out = []
        for name, layer in self.layers.items():
            if self.quantize_input.get(name, True):
                out += [q for q in layer.act_quantizers if q.active]
        for proc in self.attention.values():
            out += [q for q in proc.quantizers().values() if q.active]
        return out

    @property
    def has_weights(self) -> bool:
        return bool(self.weight_parts())


def _unit(qmodel: QuantModel, index: int, plan: UnitPlan) -> Unit:
    layers = qmodel.layers()
    procs = qmodel.attention_processors()
    return Unit(
        index=index,
        name=plan.name,
        kind=plan.kind,
        module=qmodel.model.get_submodule(plan.name),
        layers={n: layers[n] for n in plan.layers},
        attention={n: procs[n] for n in plan.attention},
        quantize_input={n: qmodel.plan.layer(n).quantize_input for n in plan.layers},
    )


def _layer_plans(qmodel: QuantModel) -> list[UnitPlan]:
    """One unit per layer; each quantized Attention right after the last of its layers."""
    plans: list[UnitPlan] = []
    for lp in qmodel.plan.layers:
        plans.append(UnitPlan(lp.name, "layer", lp.kind, [lp.name]))
    for aname in qmodel.plan.attention:
        inside = [i for i, p in enumerate(plans) if p.name.startswith(aname + ".")]
        position = (max(inside) + 1) if inside else len(plans)
        module_type = type(qmodel.model.get_submodule(aname)).__name__
        plans.insert(position, UnitPlan(aname, "block", module_type, [], [aname]))
    return plans


def make_units(qmodel: QuantModel, granularity: str = "block", order: str = "execution") -> list[Unit]:
    """The units of ``qmodel`` in reconstruction order."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"recon granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if order not in UNIT_ORDERS:
        raise ConfigError(f"unit order must be one of {UNIT_ORDERS}, got {order!r}")
    plans = list(qmodel.plan.units) if granularity == "block" else _layer_plans(qmodel)
    if order == "registration":
        position = {name: i for i, (name, _) in enumerate(qmodel.model.named_modules())}
        plans.sort(key=lambda p: position[p.name])
    return [_unit(qmodel, i, p) for i, p in enumerate(plans)]
