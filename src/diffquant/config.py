"""Typed configuration: dataclasses that validate themselves and load from / save to YAML.

Every result directory gets the resolved configuration saved beside it (``config.yaml``), so a
number can always be traced back to the knobs that produced it.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .quant.affine import validate_bits, validate_grid
from .quant.ranges import validate_policy

LAYER_MODES = ("quantize", "8bit", "fp")

#: Name globs of the time-embedding MLP in the model families diffquant knows.
DEFAULT_TIME_EMBEDDING_PATTERNS = [
    "time_embedding.*",  # diffusers UNets
    "time_embed.*",  # CompVis / openaimodel
    "pe_linear.*",  # mnist-resunet
    "te*",  # mnist-convunet (te1.0, te_mid.2, ...)
    "*.timestep_embedder.*",  # diffusers DiT-style transformers
    "*.emb.timestep_embedder.*",
]

#: Module class names treated as reconstruction blocks (METHODS.md §1.6).
DEFAULT_BLOCK_TYPES = ["ResnetBlock2D", "BasicTransformerBlock", "Attention", "ResBlock", "AttnBlock", "ResnetBlock"]


@dataclass
class LayerRule:
    """Override for the layers whose qualified name matches ``pattern`` (an fnmatch glob).

    ``weight_bits`` / ``act_bits``: new bit-widths (16 or 32 keep that side in full precision);
    ``quantize_input=False`` leaves the layer's input unquantized; ``skip`` leaves the layer
    unwrapped altogether.
    """

    pattern: str
    weight_bits: int | None = None
    act_bits: int | None = None
    quantize_input: bool | None = None
    skip: bool = False

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ConfigError(f"a layer rule needs a name glob or @role as pattern, got {self.pattern!r}")
        if self.weight_bits is not None:
            validate_bits(self.weight_bits, "weight_bits")
        if self.act_bits is not None:
            validate_bits(self.act_bits, "act_bits")


@dataclass
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
    time_embedding_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_TIME_EMBEDDING_PATTERNS))
    rules: list[LayerRule] = field(default_factory=list)
    block_types: list[str] = field(default_factory=lambda: list(DEFAULT_BLOCK_TYPES))
    #: exact | nearest (METHODS.md §1.7)
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
