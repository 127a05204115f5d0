"""Typed configuration: dataclasses that validate themselves and load from / save to YAML.

Every result directory gets the resolved configuration saved beside it (``config.yaml``), so a
number can always be traced back to the knobs that produced it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .quant.affine import validate_bits, validate_grid
from .quant.ranges import validate_policy

LAYER_MODES = ("quantize", "8bit", "fp")

#: Module class names of reconstruction blocks (docs/methods.md §1.6) in the families diffquant knows:
#: used only where the traced graph finds no residual block (see ``QuantConfig.block_types``).
DEFAULT_BLOCK_TYPES = ["ResnetBlock2D", "BasicTransformerBlock", "Attention", "ResBlock", "AttnBlock", "ResnetBlock"]


# ---------------------------------------------------------------------- field checks
def bounds(*, ge: float | None = 0, gt: float | None = None, le: float | None = None, lt: float | None = None,
           finite: bool = True) -> dict:
    """Declared range of a numeric option, for ``field(metadata=...)``.

    Numeric options without a declaration are finite and ``>= 0`` (every count, rate, weight and
    seed of diffquant is); pass ``ge=None`` for a signed option. A ``gt`` replaces the default ``ge``."""
    if gt is not None and ge == 0:
        ge = None
    return {"bounds": {"ge": ge, "gt": gt, "le": le, "lt": lt, "finite": finite}}


def knob(default: Any, doc: str = "", **limits) -> Any:
    """An option with its one default, declared bounds (see :func:`bounds`) and a one-line
    description ``doc`` (shown by ``diffquant recipes``). A list default is copied per instance."""
    metadata = {**bounds(**limits), "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def default_of(options_cls: type, name: str, doc: str | None = None, **limits) -> Any:
    """A field whose default is the one ``options_cls`` declares for ``name`` (with its bounds
    and description unless ``limits`` are given): a flat config that re-exposes a stage's knob
    refers to the stage's default instead of writing it a second time."""
    source = options_cls.__dataclass_fields__[name]
    value = source.default if source.default is not dataclasses.MISSING else source.default_factory()
    metadata = dict(source.metadata) if not limits else bounds(**limits)
    metadata["doc"] = source.metadata.get("doc", "") if doc is None else doc
    if isinstance(value, (list, dict)):
        return field(default_factory=lambda: type(value)(value), metadata=metadata)
    return field(default=value, metadata=metadata)


_DEFAULT_BOUNDS = bounds()["bounds"]


def checked(cls):
    """Class decorator (put it *below* ``@dataclass``): every instance has each field checked for
    type and range from its annotation and declared bounds before the class's own checks run,
    whether it was built from YAML, a recipe spec or Python."""
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self) -> None:
        check_fields(self)
        if own is not None:
            own(self)
        elif (inherited := getattr(super(cls, self), "__post_init__", None)) is not None:
            inherited()

    cls.__post_init__ = __post_init__
    return cls


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(obj: Any) -> None:
    """Check (and normalise: ``1`` → ``1.0`` for a float, a glob → a one-element list) every field
    of dataclass ``obj``; a wrong type or an out-of-range number is a :class:`ConfigError` naming
    the field."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = _check_type(f.name, hints.get(f.name, Any), getattr(obj, f.name))
        _check_bounds(f.name, value, f.metadata.get("bounds", _DEFAULT_BOUNDS))
        object.__setattr__(obj, f.name, value)


class _WrongType(Exception):
    pass


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_describe(args[0])}s" if args else "a list"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _check_type(name: str, tp: Any, value: Any) -> Any:
    try:
        return _coerce(tp, value)
    except _WrongType:
        raise ConfigError(f"{name} must be {_describe(tp)}, got {value!r}") from None


def _coerce(tp: Any, value: Any) -> Any:
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _WrongType
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(arm, value)
            except _WrongType:
                continue
        raise _WrongType
    if origin is typing.Literal:
        if value in args:
            return value
        raise _WrongType
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _WrongType
    if tp is int:
        if isinstance(value, bool):
            raise _WrongType
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        raise _WrongType
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _WrongType
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _WrongType
    if origin in (list, tuple):
        if origin is list and args and args[0] is str and isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)):
            raise _WrongType
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _WrongType
            return tuple(_coerce(a, v) for a, v in zip(args, value))
        items = [_coerce(args[0], v) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise _WrongType
    if origin is not None:  # other generics (Iterable[...], ...): not checked
        return value
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            return from_dict(tp, value)
        raise _WrongType
    return value


def _check_bounds(name: str, value: Any, limits: dict) -> None:
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_bounds(name, v, limits)
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if limits["finite"] and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    for key, ok, text in (("ge", lambda b: value >= b, ">="), ("gt", lambda b: value > b, ">"),
                          ("le", lambda b: value <= b, "<="), ("lt", lambda b: value < b, "<")):
        b = limits[key]
        if b is not None and not ok(b):
            raise ConfigError(f"{name} must be {text} {b:g}, got {value!r}")


#: Layer roles a rule can name as ``@role``, all found by the wrap plan from the traced forward
#: (docs/methods.md §1.10): execution order (``first``, ``last``), the first layer fed by the
#: sample (``input``), the time-embedding MLP and the blocks' projections of it
#: (``time_embedding``, ``time_projection``), residual shortcut projections (``shortcut``),
#: strided convolutions (``downsample``), the projections of attention modules (``attention``),
#: and registration order (``first_registered``, ``last_registered``: what official codes that
#: walk ``named_modules`` pick).
LAYER_ROLES = ("first", "last", "input", "time_embedding", "time_projection", "shortcut", "downsample",
               "attention", "first_registered", "last_registered")
#: the names the papers' codes use for two of them
ROLE_ALIASES = {"conv_in": "input", "conv_out": "last"}


def role_of(pattern: str) -> str | None:
    """The role a rule pattern names (``@conv_in`` → ``input``), None for a name glob."""
    if not pattern.startswith("@"):
        return None
    return ROLE_ALIASES.get(pattern[1:], pattern[1:])


def check_role_patterns(patterns, option: str) -> None:
    """One line for an ``@role`` that is no role (a typo would otherwise select nothing)."""
    for pattern in patterns:
        role = role_of(pattern) if isinstance(pattern, str) else None
        if role is not None and role not in LAYER_ROLES:
            known = ", ".join("@" + r for r in (*LAYER_ROLES, *ROLE_ALIASES))
            raise ConfigError(f"{option}: unknown layer role {pattern!r}; roles: {known}")


@dataclass
@checked
class LayerRule:
    """Override for the layers whose qualified name matches ``pattern`` (an fnmatch glob) or that
    have the role ``@role`` (:data:`LAYER_ROLES`). Rules apply in order; a later one wins.

    ``weight_bits`` / ``act_bits``: new bit-widths (16 or 32 keep that side in full precision);
    ``at_least``: those bits are a floor (a side already at more bits keeps them);
    ``quantize_input=False`` leaves the layer's input unquantized; ``skip`` leaves the layer
    unwrapped altogether. A glob that matches no layer is a one-line warning.
    """

    pattern: str
    weight_bits: int | None = None
    act_bits: int | None = None
    quantize_input: bool | None = None
    skip: bool = False
    at_least: bool = False

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(f"a layer rule needs a name glob or @role as pattern, got {self.pattern!r}")
        check_role_patterns([self.pattern], "layer rule")
        if self.weight_bits is not None:
            validate_bits(self.weight_bits, "weight_bits")
        if self.act_bits is not None:
            validate_bits(self.act_bits, "act_bits")


@dataclass
@checked
class QuantConfig:
    """How a model is wrapped: bit-widths, grids, coverage and layer rules."""

    weight_bits: int = 8
    act_bits: int = 8
    weight_grid: str = "asymmetric"
    act_grid: str = "asymmetric"
    weight_per_channel: bool = True
    weight_init: str = "minmax"
    act_init: str = "minmax"
    quantize_weights: bool = True
    quantize_acts: bool = True
    #: quantize the attention act-to-act matmuls (q, k, v, softmax output)
    attn_matmul: bool = True
    softmax_bits: int = 8
    #: split-shortcut quantization of layers whose input is a channel concatenation
    split: bool = False
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    #: the first and last quantized layers (execution order): quantize | 8bit | fp
    first_last: str = "quantize"
    #: the time-embedding MLP: quantize | 8bit | fp
    time_embedding: str = "quantize"
    #: name globs of the time-embedding MLP, overriding the traced graph (empty, the default: the
    #: layers fed by the timestep alone that do not project straight into a block's features)
    time_embedding_patterns: list[str] = field(default_factory=list)
    rules: list[LayerRule] = field(default_factory=list)
    #: class names of reconstruction blocks; empty (default): the residual blocks of the traced graph
    #: (the known families' class names as a fallback)
    block_types: list[str] = field(default_factory=list)
    #: exact | nearest (docs/methods.md §1.7)
    timestep_lookup: str = "exact"

    def __post_init__(self):
        validate_bits(self.weight_bits, "weight_bits")
        validate_bits(self.act_bits, "act_bits")
        validate_bits(self.softmax_bits, "softmax_bits")
        validate_grid(self.weight_grid)
        validate_grid(self.act_grid)
        validate_policy(self.weight_init)
        validate_policy(self.act_init)
        for name in ("first_last", "time_embedding"):
            if getattr(self, name) not in LAYER_MODES:
                raise ConfigError(f"{name} must be one of {LAYER_MODES}, got {getattr(self, name)!r}")
        if self.timestep_lookup not in ("exact", "nearest"):
            raise ConfigError(f"timestep_lookup must be 'exact' or 'nearest', got {self.timestep_lookup!r}")
        for name in ("include", "exclude", "time_embedding_patterns", "block_types"):
            setattr(self, name, _string_list(name, getattr(self, name)))
        if not isinstance(self.rules, (list, tuple)):
            raise ConfigError(f"rules must be a list of layer rules, got {type(self.rules).__name__}")
        self.rules = [r if isinstance(r, LayerRule) else from_dict(LayerRule, r) for r in self.rules]

    @property
    def tag(self) -> str:
        w = self.weight_bits if self.quantize_weights else 32
        a = self.act_bits if self.quantize_acts else 32
        return f"W{w}A{a}"


def _string_list(name: str, value: Any) -> list[str]:
    """A list of name globs; a single string means a one-element list (``exclude: conv_out``)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of strings, got {value!r}")
    return list(value)


# ---------------------------------------------------------------------- dict / YAML conversion
def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans and floats: ``pts: off`` stays a string, ``1e-3`` is a float."""


_REPLACED_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
# YAML 1.2 floats: ``1e-3`` is a number (YAML 1.1 wants ``1.0e-3``)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                |[0-9][0-9_]*[eE][-+]?[0-9]+)|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """YAML text → Python, safely; ``on``/``off``/``yes``/``no`` are strings, not booleans.

    Option values such as ``pts=off`` must reach the config as the word the user typed.
    """
    return yaml.load(text, Loader=_Yaml12Loader)


def _convert(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value)
    if origin in (list, tuple) and args and isinstance(value, (list, tuple)):
        return [_convert(args[0], v) for v in value]
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        for a in args:
            if a is type(None):
                continue
            if dataclasses.is_dataclass(a) and isinstance(value, dict):
                return from_dict(a, value)
    return value


def from_dict(cls, data: dict | None):
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys with a clear message."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    data = dict(data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} option(s) {unknown}; valid: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid {cls.__name__}: {exc}") from None


def save_yaml(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
    return path


def load_yaml(cls, path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return from_dict(cls, data)
