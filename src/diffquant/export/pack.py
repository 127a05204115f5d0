"""Packed integer checkpoints: a quantized model as one standalone safetensors file.

Layout of the file (all tensors little-endian, safetensors; nothing is pickled):

- ``w/<layer>/<part>/s<b>`` — uint8 bitstream of the b-bit weight codes of the channels that
  have b bits (:mod:`.bitpack`: densely packed, LSB first; 8-bit one per byte, 4-bit two per
  byte). Codes are stored unsigned, shifted by the grid's q_min. A part with one bit-width has
  one stream; mixed per-channel precision (a bit tag per output channel, ``w/<layer>/<part>/bits``)
  has one stream per bit-width group, each holding its channels in channel order. Within a
  stream a channel's codes follow the part's row-major order with the output-channel axis first.
- ``w/<layer>/<part>/step`` (float32 [C]) and ``.../zero_point`` (int16 [C]) per output channel.
  A split layer (concatenated input, docs/methods.md §1.9) has one part per input slice.
- ``f/<key>`` — every other tensor of the model (biases, norms, embeddings, unquantized layers) in
  fp32 or fp16 (``float_dtype``; integer buffers keep their dtype).
- ``q/<key>`` — the activation quantizers' state (steps and zero points, per-timestep tables) and
  the weight quantizers of layers stored in floating point.
- The JSON manifest lives in the safetensors metadata (key ``manifest``): format and version, the
  model's class, shape hash and diffusers config, the quantization config and wrap plan, and the
  layer map (per part: shape, axis, grid, bits, dtype, stream keys and sizes).

Unpacking reproduces the fake-quant weights bit for bit; :func:`load_packed` rebuilds a
:class:`~diffquant.model.QuantModel` from the file alone (for diffusers models) or onto a given
float model of the same architecture.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .._version import __version__
from ..config import QuantConfig, from_dict, to_dict
from ..errors import CheckpointError, ConfigError, DiffquantError
from ..model.checkpoint import QUANTIZER_ATTRS, restore_quantizers
from ..model.plan import WrapPlan
from ..model.qmodel import QuantModel
from ..model.wrap import build
from .bitpack import pack_bits, packed_nbytes, unpack_bits
from .codes import ExportError, WeightCodes, grid_bounds, layer_weight_codes, weight_is_quantized

FORMAT = "diffquant-packed"
FORMAT_VERSION = 1
METADATA_KEY = "manifest"
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: dtypes a fake-quant weight may have been computed in
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
#: quantizer tensors restored from the file (the rest of a quantizer is rebuilt by ``build``)
QUANTIZER_BUFFERS = ("step", "zero_point", "initialized", "range_lo", "range_hi", "batches_seen", "search_side")
ADAROUND_BUFFERS = ("V", "hard_rounding", "hardened")
PTS_BUFFERS = ("multiplier", "input_divisor")
#: what rebuilds a quantizer variant (PTSQuantizer) before its tensors are loaded
VARIANT_ATTRS = ("class", "pts_axis", "pts_channels")
_STREAM = re.compile(r"s\d+")


@dataclass
class PackedModel:
    """An in-memory packed checkpoint: the manifest and the tensors of the file."""

    manifest: dict
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def nbytes(self) -> dict[str, int]:
        """Bytes by kind: packed weight streams, their scales, float tensors, quantizer state."""
        out = {"weight_streams": 0, "weight_qparams": 0, "float": 0, "quant_state": 0}
        for key, t in self.tensors.items():
            n = t.numel() * t.element_size()
            if key.startswith("w/"):
                out["weight_streams" if _STREAM.fullmatch(key.rsplit("/", 1)[1]) else "weight_qparams"] += n
            elif key.startswith("f/"):
                out["float"] += n
            else:
                out["quant_state"] += n
        out["total"] = sum(out.values())
        return out


# ---------------------------------------------------------------------------------------------
# Weight parts <-> streams

def _stream_key(prefix: str, bits: int) -> str:
    return f"{prefix}/s{bits}"


def pack_weight_codes(wc: WeightCodes, prefix: str) -> tuple[dict, dict[str, Tensor]]:
    """Manifest entry and tensors of one weight part (one stream per bit-width group)."""
    rows = wc.codes.movedim(wc.axis, 0).reshape(wc.channels, -1).to(torch.int64)
    per_channel = rows.shape[1]
    qmin, _ = grid_bounds(wc.bits, wc.grid)
    unsigned = rows - qmin[:, None]
    if wc.zero_point.numel() and (wc.zero_point.abs().max() > torch.iinfo(torch.int16).max):
        raise ExportError(f"{prefix}: zero points beyond the int16 range")
    tensors = {f"{prefix}/step": wc.step.float().contiguous(), f"{prefix}/zero_point": wc.zero_point.to(torch.int16)}
    streams = {}
    for b in sorted(int(v) for v in torch.unique(wc.bits)):
        chosen = wc.bits == b
        key = _stream_key(prefix, b)
        tensors[key] = pack_bits(unsigned[chosen], b)
        count = int(chosen.sum()) * per_channel
        streams[str(b)] = {"key": key, "channels": int(chosen.sum()), "count": count, "nbytes": packed_nbytes(count, b)}
    uniform = wc.uniform_bits
    if uniform is None:
        tensors[f"{prefix}/bits"] = wc.bits.to(torch.uint8).contiguous()
    entry = {
        "shape": list(wc.codes.shape),
        "axis": wc.axis,
        "grid": wc.grid,
        "dtype": str(wc.dtype).replace("torch.", ""),
        "bits": uniform,
        "streams": streams,
    }
    return entry, tensors


def _tensor(tensors: dict[str, Tensor], key: str, where: str) -> Tensor:
    if key not in tensors:
        raise CheckpointError(f"{where}: tensor {key} is missing from the packed file")
    return tensors[key]


def unpack_weight_codes(entry: dict, tensors: dict[str, Tensor], prefix: str) -> WeightCodes:
    """Inverse of :func:`pack_weight_codes`; damaged entries raise CheckpointError."""
    try:
        shape, axis, grid = [int(s) for s in entry["shape"]], int(entry["axis"]), str(entry["grid"])
        dtype = WEIGHT_DTYPES[entry["dtype"]]
        streams = entry["streams"]
        channels = shape[axis]
        per_channel = 1
        for i, s in enumerate(shape):
            if i != axis:
                per_channel *= s
        step = _tensor(tensors, f"{prefix}/step", prefix).float()
        zero = _tensor(tensors, f"{prefix}/zero_point", prefix).to(torch.int64)
        if entry["bits"] is None:
            bits = _tensor(tensors, f"{prefix}/bits", prefix).to(torch.int64)
        else:
            bits = torch.full((channels,), int(entry["bits"]), dtype=torch.int64)
        if step.numel() != channels or zero.numel() != channels or bits.numel() != channels:
            raise CheckpointError(f"{prefix}: per-channel tensors do not have {channels} channels")
        qmin, _ = grid_bounds(bits, grid)
        rows = torch.empty(channels, per_channel, dtype=torch.int64)
        for b_text, info in streams.items():
            b = int(b_text)
            chosen = bits == b
            n = int(chosen.sum())
            if n != int(info["channels"]) or n * per_channel != int(info["count"]):
                raise CheckpointError(f"{prefix}: the {b}-bit stream does not match the channel bit tags")
            values = unpack_bits(_tensor(tensors, info["key"], prefix), b, n * per_channel)
            rows[chosen] = values.to(torch.int64).reshape(n, per_channel)
        if sum(int(info["channels"]) for info in streams.values()) != channels:
            raise CheckpointError(f"{prefix}: streams cover {channels} channels only partly")
        moved = [shape[axis]] + [s for i, s in enumerate(shape) if i != axis]
        codes = (rows + qmin[:, None]).reshape(moved).movedim(0, axis)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, ConfigError) as exc:
        raise CheckpointError(f"{prefix}: damaged packed weight entry ({_first_line(exc)})") from None
    return WeightCodes(codes=codes.to(torch.int16), step=step, zero_point=zero,
                       bits=bits.to(torch.uint8), grid=grid, axis=axis, dtype=dtype)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Freezing a QuantModel

def _diffusers_config(model: nn.Module) -> dict | None:
    """The JSON-able config of a diffusers model (to rebuild it from the file alone)."""
    config = getattr(model, "config", None)
    if config is None or not type(model).__module__.startswith("diffusers"):
        return None
    public = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    try:
        return json.loads(json.dumps(public))
    except (TypeError, ValueError):
        return None


def _quant_state_tensors(qmodel: QuantModel, packed_layers: set[str]) -> dict[str, Tensor]:
    """Quantizer state to store; any recipe state this format does not know is an error."""
    state = qmodel.quant_state_dict()
    quantizers = qmodel.quantizers()
    known: dict[str, str] = {}
    for qname in quantizers:
        for buf in QUANTIZER_BUFFERS:
            known[f"model.{qname}.{buf}"] = qname
        for buf in PTS_BUFFERS:  # DMQ's PTS factors and folded τ (PTSQuantizer)
            known[f"model.{qname}.{buf}"] = qname
        if ".weight_quantizers." in qname:  # mixed-bit tags: stored as the packed part's bits
            layer = qname.split(".weight_quantizers.")[0]
            if layer in packed_layers:
                known[f"model.{qname}.channel_bits"] = qname
    out = {}
    for key, value in state.items():
        if key in known:
            qname = known[key]
            layer = qname.split(".weight_quantizers.")[0] if ".weight_quantizers." in qname else None
            if layer in packed_layers:
                continue  # rebuilt from the packed part's step and zero point
            out[f"q/{key}"] = value.detach().cpu().contiguous().clone()
        elif ".adaround." in key and key.rsplit(".", 1)[1] in ADAROUND_BUFFERS:
            continue  # the hard rounding is already in the packed codes
        elif key.endswith("._cache"):
            continue  # QuantLayer's weight cache (registered when it holds the weight Parameter itself)
        else:
            raise ExportError(
                f"the packed format cannot store the recipe state {key!r}; "
                "export the model before this recipe feature is applied or extend diffquant.export.pack"
            )
    return out


def freeze(qmodel: QuantModel, *, float_dtype: str = "float32") -> PackedModel:
    """Integer codes of every quantized weight plus everything else the model needs."""
    if not isinstance(qmodel, QuantModel):
        raise ConfigError(f"freeze() needs a QuantModel, got {type(qmodel).__name__}")
    if float_dtype not in FLOAT_DTYPES:
        raise ConfigError(f"float_dtype must be one of {', '.join(FLOAT_DTYPES)}, got {float_dtype!r}")
    cast = FLOAT_DTYPES[float_dtype]
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict] = {}
    packed_weights: set[str] = set()
    for name, layer in qmodel.layers().items():
        if not weight_is_quantized(layer):
            continue
        parts = []
        for i, wc in enumerate(layer_weight_codes(layer, name)):
            entry, part_tensors = pack_weight_codes(wc, f"w/{name}/{i}")
            parts.append(entry)
            tensors.update(part_tensors)
        layers[name] = {"kind": layer.kind, "weight": f"{name}.weight", "split": layer.split,
                        "in_axis": layer.in_axis, "parts": parts}
        packed_weights.add(f"{name}.weight")
    float_state = qmodel.denoiser_state_dict()
    for key in qmodel.float_keys:
        if key in packed_weights:
            continue
        t = float_state[key].detach().cpu()
        tensors[f"f/{key}"] = (t.to(cast) if t.is_floating_point() else t).contiguous().clone()
    tensors.update(_quant_state_tensors(qmodel, set(layers)))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "diffquant_version": __version__,
        "float_dtype": float_dtype,
        "model": {
            "class": type(qmodel.model).__name__,
            "module": type(qmodel.model).__module__,
            "tensors": len(qmodel.float_keys),
            "shape_hash": _shape_hash_of_keys(float_state, qmodel.float_keys),
            "diffusers_config": _diffusers_config(qmodel.model),
        },
        "quantization": {
            "recipe": qmodel.recipe,
            "config": to_dict(qmodel.quant_config),
            "plan": qmodel.plan.to_dict(),
            "timestep_index": qmodel.timestep_index.to_dict(),
            "quantizers": {n: {a: v for a, v in q.describe().items() if a in QUANTIZER_ATTRS + VARIANT_ATTRS}
                           for n, q in qmodel.quantizers().items()},
            "layer_flags": {n: {"use_weight_quant": layer.use_weight_quant, "use_act_quant": layer.use_act_quant}
                            for n, layer in qmodel.layers().items()},
            "attention_flags": {n: p.use_act_quant for n, p in qmodel.attention_processors().items()},
        },
        "layers": layers,
    }
    return PackedModel(manifest=manifest, tensors=tensors)


def _shape_hash_of_keys(state: dict[str, Tensor], keys: list[str]) -> str:
    h = hashlib.sha256()
    for key in keys:
        h.update(f"{key}:{tuple(state[key].shape)};".encode())
    return h.hexdigest()[:16]


def save_packed(qmodel: QuantModel, path: str | Path, *, float_dtype: str = "float32") -> Path:
    """Write ``qmodel`` as one packed safetensors file at ``path``; returns the path."""
    packed = freeze(qmodel, float_dtype=float_dtype)
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory: give the packed file's path (e.g. model.safetensors)")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(packed.tensors, str(path), metadata={"format": FORMAT, METADATA_KEY: json.dumps(packed.manifest)})
    return path


# ---------------------------------------------------------------------------------------------
# Reading

def read_packed(path: str | Path) -> PackedModel:
    """Read and validate a packed file; anything damaged is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no packed checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({_first_line(exc)})") from None
    if metadata.get("format") != FORMAT or METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} is not a diffquant packed checkpoint")
    try:
        manifest = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the manifest is corrupt ({exc.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: the manifest is not a diffquant packed manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has packed format version {manifest.get('format_version')!r}; "
            f"this diffquant ({__version__}) reads version {FORMAT_VERSION}"
        )
    for section in ("model", "quantization", "layers"):
        if not isinstance(manifest.get(section), dict):
            raise CheckpointError(f"{path}: the manifest has no valid {section!r} section")
    return PackedModel(manifest=manifest, tensors=tensors)


def unpack_weights(packed: PackedModel) -> dict[str, Tensor]:
    """The dequantized (fake-quant) weight of every packed layer, by state-dict key."""
    out = {}
    for name, entry in packed.manifest["layers"].items():
        try:
            parts = [unpack_weight_codes(p, packed.tensors, f"w/{name}/{i}").dequantize()
                     for i, p in enumerate(entry["parts"])]
            out[entry["weight"]] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=int(entry["in_axis"]))
        except (KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"packed layer {name}: damaged entry ({_first_line(exc)})") from None
    return out


def _model_from_config(model_info: dict) -> nn.Module:
    config = model_info.get("diffusers_config")
    if config is None:
        raise CheckpointError(
            f"this packed file holds a {model_info.get('class')}, which cannot be rebuilt from the file: "
            "pass a float model of that architecture"
        )
    import diffusers

    cls = getattr(diffusers, str(model_info.get("class")), None)
    if cls is None:
        raise CheckpointError(f"diffusers has no model class {model_info.get('class')!r}")
    return cls.from_config(config).eval()


def load_packed(model: nn.Module | None, path: str | Path, *, device=None) -> QuantModel:
    """Rebuild the quantized model stored in ``path``.

    ``model`` gives the float architecture (its weights are not used; it is not modified); with
    ``None``, a diffusers model is rebuilt from the config in the file. The result's outputs are
    bit-identical to those of the model that was packed (for ``float_dtype="float32"``).
    """
    packed = read_packed(path)
    manifest = packed.manifest
    info = manifest["model"]
    model = _model_from_config(info) if model is None else copy.deepcopy(model)
    reference = model.state_dict()
    keys = list(reference.keys())
    if (type(model).__name__ != info.get("class") or len(keys) != info.get("tensors")
            or _shape_hash_of_keys(reference, keys) != info.get("shape_hash")):
        raise CheckpointError(
            f"{path} was packed from a {info.get('class')} with {info.get('tensors')} tensors, "
            f"not this {type(model).__name__} with {len(keys)} tensors"
        )
    weights = unpack_weights(packed)
    state = {}
    for key in keys:
        if key in weights:
            value = weights[key]
        else:
            value = _tensor(packed.tensors, f"f/{key}", str(path))
        if tuple(value.shape) != tuple(reference[key].shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, the model {tuple(reference[key].shape)}")
        state[key] = value.to(reference[key].dtype) if value.is_floating_point() else value
    model.load_state_dict(state, strict=True)
    quant = manifest["quantization"]
    try:
        config = from_dict(QuantConfig, quant["config"])
        plan = WrapPlan.from_dict(quant["plan"])
    except (KeyError, TypeError, DiffquantError) as exc:
        raise CheckpointError(f"{path}: invalid quantization config or plan ({_first_line(exc)})") from None
    qmodel = build(model, config, plan)
    qmodel.recipe = quant.get("recipe", "none")
    qmodel.timestep_index.lookup = quant.get("timestep_index", {}).get("lookup", config.timestep_lookup)
    _restore_quantizers(qmodel, packed, str(path))
    qmodel.eval()
    if device is not None:
        qmodel.to(device)
    return qmodel


@torch.no_grad()
def _restore_quantizers(qmodel: QuantModel, packed: PackedModel, where: str) -> None:
    quant = packed.manifest["quantization"]
    # packed weights sit on the widest grid of a mixed-bit layer, so only PTS quantizers are rebuilt
    restore_quantizers(qmodel, quant["quantizers"], where, variants=("PTSQuantizer",))
    layers = qmodel.layers()
    for name, flags in quant["layer_flags"].items():
        layers[name].use_weight_quant = bool(flags["use_weight_quant"])
        layers[name].use_act_quant = bool(flags["use_act_quant"])
    processors = qmodel.attention_processors()
    for name, flag in quant.get("attention_flags", {}).items():
        processors[name].use_act_quant = bool(flag)

    state = {k[2:]: v for k, v in packed.tensors.items() if k.startswith("q/")}
    expected = qmodel.state_dict()
    for key, value in state.items():
        if key not in expected or tuple(expected[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{where}: quantizer tensor {key} does not fit the rebuilt model")
    qmodel.load_state_dict(state, strict=False)
    for name, entry in packed.manifest["layers"].items():
        layer = layers[name]
        for i, (part, q) in enumerate(zip(entry["parts"], layer.weight_quantizers)):
            wc = unpack_weight_codes(part, packed.tensors, f"w/{name}/{i}")
            # the packed weight is already on the grid: re-quantizing it with the same step and zero
            # point returns it unchanged; mixed-bit parts use the widest grid, which holds them all
            q.bits = int(wc.bits.max())
            n = q.step.shape[1]  # C for a per-channel quantizer, 1 for a per-tensor one
            q.step.data[0] = wc.step[:n].to(q.step) if n == 1 else wc.step.to(q.step)
            q.zero_point.data[0] = (wc.zero_point[:n] if n == 1 else wc.zero_point).to(q.zero_point)
            q.initialized.fill_(True)
            q.batches_seen.fill_(1)
        layer.clear_cache()
