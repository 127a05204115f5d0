"""The wrap plan: which layers are quantized, at which bits, split where, grouped into units.

A plan is computed once from a traced forward (:func:`make_plan`) and saved in the manifest, so
loading a checkpoint rebuilds exactly the same quantized modules without any forward pass.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field

from torch import nn

from ..config import DEFAULT_BLOCK_TYPES, QuantConfig, checked, from_dict, role_of
from ..nn.layers import SUPPORTED, layer_kind
from ..quant.affine import validate_bits
from .trace import FROM_X, TraceResult


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
    #: how each role was found: blocks / time_embedding -> "names" (the config's globs or class
    #: names) or "structure" (the traced data flow and residual additions)
    found: dict[str, str] = field(default_factory=dict)
    #: structural feature points from the traced graph (``middle``: TDAC's feature module,
    #: ``last_block``: TRD's), see :meth:`~diffquant.model.trace.TraceResult.feature_points`
    features: dict[str, str] = field(default_factory=dict)

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
    _warn_unmatched(config, [n for n, m in modules.items() if n and isinstance(m, SUPPORTED)])
    found: dict[str, str] = {}
    time_layers = time_embedding_layers(config, candidates, trace, modules, found)
    structural = structural_roles(trace, called, modules)
    registered = [n for n in modules if n in set(candidates)]
    if registered:
        structural["first_registered"], structural["last_registered"] = {registered[0]}, {registered[-1]}

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
        roles += [role for role, names in structural.items() if name in names]
        if name in time_layers:
            roles.append("time_embedding")
            w_bits = _bits_for_mode(config.time_embedding, w_bits)
            a_bits = _bits_for_mode(config.time_embedding, a_bits)
        skip = False
        for rule in config.rules:
            if rule_applies(rule.pattern, name, roles):
                skip = skip or rule.skip
                w_bits = _rule_bits(rule.weight_bits, w_bits, rule.at_least)
                a_bits = _rule_bits(rule.act_bits, a_bits, rule.at_least)
                if rule.quantize_input is not None:
                    quantize_input = rule.quantize_input
        if skip:
            continue
        # a time-embedding input is the sinusoidal [sin, cos] concatenation, not a skip concatenation
        # (docs/methods.md §1.9): never split a layer fed by the timestep alone (nor the time MLP)
        timestep_fed = name in trace.input_flow and not trace.input_flow[name] & FROM_X
        split = (trace.splits.get(name) if config.split and "time_embedding" not in roles and not timestep_fed
                 else None)
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

    if config.block_types:  # the user's class names override the traced structure
        block_names, found["blocks"] = [n for n, m in modules.items() if n and type(m).__name__ in config.block_types], "names"
    elif trace.residual_blocks:
        block_names, found["blocks"] = list(trace.residual_blocks), "structure"
    else:
        block_names = [n for n, m in modules.items() if n and type(m).__name__ in DEFAULT_BLOCK_TYPES]
        found["blocks"] = "names" if block_names else "none"
    units = make_units(modules, block_names, [lp.name for lp in layers], attention, order)
    return WrapPlan(layers=layers, attention=attention, units=units, timesteps=timesteps, found=found,
                    features=trace.feature_points())


def _inside_a_block(trace: TraceResult):
    blocks = set(trace.residual_blocks) | set(trace.outer_blocks)
    return lambda n: any(n.startswith(b + ".") for b in blocks)


def structural_roles(trace: TraceResult, called: list[str], modules: dict[str, nn.Module]) -> dict[str, set[str]]:
    """Roles read off the traced forward, for rules (docs/methods.md §1.10):

    - ``input``: the first executed layer whose input is computed from the sample x (conv_in of
      a UNet, the patch embedding of a DiT);
    - ``time_projection``: layers inside residual blocks whose input comes from the timestep alone
      and whose output meets the block's features (a ResBlock's projection of the time
      embedding, a DiT block's adaLN linear);
    - ``shortcut``: layers projecting a block's own input onto the block's residual addition;
    - ``attention``: the layers of the modules that compute attention (a softmax or SDPA);
    - ``downsample``: convolutions with a stride > 1, except the input and last layers.
    """
    if not trace.input_flow:
        return {}
    first = next((n for n in called if trace.input_flow.get(n, 0) & FROM_X), None)
    last = called[-1] if called else None
    inside = _inside_a_block(trace)
    attention = {n for n in called if any(n.startswith(a + ".") for a in trace.attention_modules)}

    def strided(name: str) -> bool:
        stride = getattr(modules[name], "stride", 1) if isinstance(modules[name], (nn.Conv1d, nn.Conv2d)) else 1
        return any(s > 1 for s in (stride if isinstance(stride, (tuple, list)) else (stride,)))

    return {"input": {first} if first else set(),
            "time_projection": {n for n in trace.timestep_only_layers() if inside(n) and n in trace.time_mixing},
            "shortcut": set(trace.shortcut_layers) & set(called),
            "attention": attention,
            "downsample": {n for n in called if n not in (first, last) and strided(n)}}


def _rule_bits(rule_bits: int | None, bits: int, at_least: bool) -> int:
    if rule_bits is None:
        return bits
    return max(bits, rule_bits) if at_least else rule_bits


def time_embedding_layers(config: QuantConfig, candidates: list[str], trace: TraceResult,
                          modules: dict[str, nn.Module], found: dict[str, str]) -> set[str]:
    """The time-embedding MLP, from the traced graph: the layers whose input is computed from the
    timestep alone, except those whose output only meets the features (they project the embedding
    into them: ResBlock ``time_emb_proj``, a DiT's adaLN linears); a layer that feeds another
    layer of the time path is part of the MLP (a DiT block's own timestep embedder, PixArt's
    ``linear_2``, whose output is also used directly). In a network without residual blocks there
    is no block to project into, and every layer on the time path counts.
    ``time_embedding_patterns`` (name globs) override it."""
    if config.time_embedding_patterns:
        named = {n for n in candidates if _matches(n, config.time_embedding_patterns)}
        found["time_embedding"] = "names" if named else "none"
        return named
    if not trace.input_flow:
        found["time_embedding"] = "none"
        return set()
    has_blocks = bool(trace.residual_blocks)
    structural = {n for n in trace.timestep_only_layers()
                  if n in candidates and (not has_blocks or n not in trace.time_mixing or n in trace.time_feeding)}
    found["time_embedding"] = "structure" if structural else "none"
    return structural


def _warn_unmatched(config: QuantConfig, layer_names: list[str]) -> None:
    """One line for every include / exclude / rule glob that matches no layer (a typo does nothing)."""
    import warnings

    for option, patterns in (("include", config.include), ("exclude", config.exclude),
                             ("rules", [r.pattern for r in config.rules if not r.pattern.startswith("@")])):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in layer_names):
                warnings.warn(f"QuantConfig.{option} pattern {pattern!r} matches no layer of this model", stacklevel=4)


def rule_applies(pattern: str, name: str, roles: list[str]) -> bool:
    """A rule pattern is a name glob, or ``@role`` (:data:`~diffquant.config.LAYER_ROLES`, found
    by :func:`make_plan` and stored in each layer's ``roles``; ``@conv_in``/``@conv_out`` are
    ``@input``/``@last``)."""
    role = role_of(pattern)
    if role is not None:
        return role in roles
    return fnmatch.fnmatchcase(name, pattern)


def layers_set_by_rules(plan: "WrapPlan", rules) -> set[str]:
    """The planned layers whose bits some rule in ``rules`` sets (the rest stay at the model's bits)."""
    setting = [r for r in rules if r.weight_bits is not None or r.act_bits is not None]
    return {lp.name for lp in plan.layers if any(rule_applies(r.pattern, lp.name, lp.roles) for r in setting)}


def make_units(
    modules: dict[str, nn.Module],
    block_names: list[str],
    layer_names: list[str],
    attention: list[str],
    order: dict[str, int],
) -> list[UnitPlan]:
    """Outermost of the blocks ``block_names`` holding quantized layers, plus leftover layers,
    sorted by first call in the traced forward (execution order)."""
    big = len(order) + 1
    blocks = sorted(block_names, key=lambda n: (n.count("."), n))
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
