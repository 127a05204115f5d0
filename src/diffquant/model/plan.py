"""The wrap plan: which layers are quantized, at which bits, split where, grouped into units.

A plan is computed once from a traced forward (:func:`make_plan`) and saved in the manifest, so
loading a checkpoint rebuilds exactly the same quantized modules without any forward pass.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

from torch import nn

from ..config import QuantConfig, checked, from_dict
from ..nn.layers import SUPPORTED, layer_kind
from ..quant.affine import validate_bits
from .trace import TraceResult


@dataclass
@checked
class LayerPlan:
    name: str
    kind: str
    weight_bits: int
    act_bits: int
    quantize_input: bool = True
    split: int | None = None
    roles: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate_bits(self.weight_bits, f"{self.name}: weight_bits")
        validate_bits(self.act_bits, f"{self.name}: act_bits")


@dataclass
@checked
class UnitPlan:
    """One reconstruction problem: a block (with its layers) or a single layer."""

    name: str
    kind: str  # "block" | "layer"
    module_type: str
    layers: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)


@dataclass
@checked
class WrapPlan:
    layers: list[LayerPlan]
    attention: list[str]
    units: list[UnitPlan]
    #: calibrated schedule for per-timestep activation tables (None = one shared set)
    timesteps: list[int] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "WrapPlan":
        return from_dict(cls, data)

    def layer(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_attention(module: nn.Module) -> bool:
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(module, Attention)


def _bits_for_mode(mode: str, bits: int) -> int:
    return {"quantize": bits, "8bit": max(8, bits) if bits <= 8 else bits, "fp": 32}[mode]


def make_plan(
    model: nn.Module, config: QuantConfig, trace: TraceResult, timesteps: list[int] | None = None
) -> WrapPlan:
    """Decide every layer's treatment from the config and the traced forward."""
    order = trace.call_index
    big = len(order) + 1
    modules = dict(model.named_modules())
    candidates = [
        name
        for name, m in modules.items()
        if name and isinstance(m, SUPPORTED) and type(m) in SUPPORTED
        and _matches(name, config.include) and not _matches(name, config.exclude)
    ]
    candidates.sort(key=lambda n: (order.get(n, big), n))
    called = [n for n in candidates if n in order]
    first = called[0] if called else None
    last = called[-1] if called else None

    layers: list[LayerPlan] = []
    for name in candidates:
        module = modules[name]
        w_bits = config.weight_bits if config.quantize_weights else 32
        a_bits = config.act_bits if config.quantize_acts else 32
        roles = []
        quantize_input = True
        if name in (first, last):
            roles.append("first" if name == first else "last")
            w_bits = _bits_for_mode(config.first_last, w_bits)
            a_bits = _bits_for_mode(config.first_last, a_bits)
        if _matches(name, config.time_embedding_patterns):
            roles.append("time_embedding")
            w_bits = _bits_for_mode(config.time_embedding, w_bits)
            a_bits = _bits_for_mode(config.time_embedding, a_bits)
        skip = False
        for rule in config.rules:
            if _rule_applies(rule.pattern, name, roles):
                skip = skip or rule.skip
                w_bits = rule.weight_bits if rule.weight_bits is not None else w_bits
                a_bits = rule.act_bits if rule.act_bits is not None else a_bits
                if rule.quantize_input is not None:
                    quantize_input = rule.quantize_input
        if skip:
            continue
        # the time-embedding MLP's input is the sinusoidal [sin, cos] concatenation, not a skip
        # concatenation (METHODS.md §1.9): never split it
        split = trace.splits.get(name) if config.split and "time_embedding" not in roles else None
        if split is not None and getattr(module, "groups", 1) != 1:
            split = None
        layers.append(LayerPlan(name, layer_kind(module), w_bits, a_bits, quantize_input, split, roles))

    attention = []
    if config.attn_matmul and config.quantize_acts:
        attention = [
            name for name, m in modules.items()
            if name and _is_attention(m) and _matches(name, config.include) and not _matches(name, config.exclude)
        ]
        attention.sort(key=lambda n: (order.get(n, big), n))

    units = make_units(modules, config.block_types, [lp.name for lp in layers], attention, order)
    return WrapPlan(layers=layers, attention=attention, units=units, timesteps=timesteps)


def _rule_applies(pattern: str, name: str, roles: list[str]) -> bool:
    """A rule pattern is a name glob, or ``@role`` (``@first``, ``@last``, ``@time_embedding``)."""
    if pattern.startswith("@"):
        return pattern[1:] in roles
    return fnmatch.fnmatchcase(name, pattern)


def make_units(
    modules: dict[str, nn.Module],
    block_types: list[str],
    layer_names: list[str],
    attention: list[str],
    order: dict[str, int],
) -> list[UnitPlan]:
    """Outermost blocks of ``block_types`` holding quantized layers, plus leftover layers,
    sorted by first call in the traced forward (execution order)."""
    big = len(order) + 1
    blocks = sorted(
        (n for n, m in modules.items() if n and type(m).__name__ in block_types),
        key=lambda n: (n.count("."), n),
    )
    outer: list[str] = []
    for name in blocks:
        if not any(name.startswith(o + ".") for o in outer):
            outer.append(name)

    def owner(name: str) -> str | None:
        for b in outer:
            if name == b or name.startswith(b + "."):
                return b
        return None

    units: dict[str, UnitPlan] = {}
    for lname in layer_names:
        b = owner(lname)
        if b is None:
            units[lname] = UnitPlan(lname, "layer", type(modules[lname]).__name__, [lname])
        else:
            units.setdefault(b, UnitPlan(b, "block", type(modules[b]).__name__)).layers.append(lname)
    for aname in attention:
        b = owner(aname)
        if b is not None:
            units.setdefault(b, UnitPlan(b, "block", type(modules[b]).__name__)).attention.append(aname)
    return sorted(units.values(), key=lambda u: (order.get(u.name, big), u.name))
