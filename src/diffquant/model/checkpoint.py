"""Save and load quantizer state: ``quant_state.safetensors`` + ``manifest.json`` (+ ``config.yaml``).

Only what quantization added is saved (steps, zero points, ranges, rounding, per-step tables,
recipe factors); the float weights stay wherever the user keeps them. Loading rebuilds the
quantized modules from the saved wrap plan — no tracing, no dummy forward — and restores the
tensors with strict key and shape checks. Nothing is unpickled.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from ..config import QuantConfig, from_dict, save_yaml, to_dict
from ..errors import CheckpointError, DiffquantError
from ..quant.quantizer import UniformQuantizer
from .plan import WrapPlan
from .qmodel import QuantModel
from .wrap import build

FORMAT = "diffquant-quant-state"
FORMAT_VERSION = 1
STATE_FILE = "quant_state.safetensors"
MANIFEST_FILE = "manifest.json"
#: quantizer attributes that live in the manifest rather than in tensors
_QUANTIZER_ATTRS = ("bits", "grid", "init", "include_zero", "clamp_zero_point", "momentum", "enabled")


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def save(qmodel: QuantModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write the quantizer state of ``qmodel`` into directory ``path``; returns the directory."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in qmodel.quant_state_dict().items()}
    save_file(tensors, str(out / STATE_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    float_shapes = _shapes(qmodel.model)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "diffquant_version": __version__,
        "recipe": qmodel.recipe,
        "recipe_config": to_dict(qmodel.recipe_config),
        "config": to_dict(qmodel.config),
        "plan": qmodel.plan.to_dict(),
        "timestep_index": qmodel.timestep_index.to_dict(),
        "model": {
            "class": type(qmodel.model).__name__,
            "tensors": len(qmodel.float_keys),
            "shape_hash": _hash_shapes(float_shapes, qmodel.float_keys),
        },
        "quantizers": {name: q.describe() for name, q in qmodel.quantizers().items()},
        "layers": {
            name: {
                "use_weight_quant": layer.use_weight_quant,
                "use_act_quant": layer.use_act_quant,
                "adaround": None if layer.adaround is None else [r.mode for r in layer.adaround],
                "input_scale": layer.input_scale is not None,
                "lora_rank": None if layer.weight_delta is None else layer.weight_delta.rank,
            }
            for name, layer in qmodel.layers().items()
        },
        "attention": {name: {"use_act_quant": p.use_act_quant} for name, p in qmodel.attention_processors().items()},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
        "extra": extra or {},
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    save_yaml(qmodel.config, out / "config.yaml")
    return out


def _hash_shapes(shapes: dict[str, list[int]], keys: list[str]) -> str:
    h = hashlib.sha256()
    for key in keys:
        h.update(f"{key}:{tuple(shapes[key])};".encode())
    return h.hexdigest()[:16]


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no quantized checkpoint at {path}")
    manifest_path = path / MANIFEST_FILE if path.is_dir() else path
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST_FILE}: not a diffquant checkpoint")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is corrupt or truncated ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} is not a diffquant manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path} has format version {version!r}; this diffquant ({__version__}) reads version {FORMAT_VERSION}"
        )
    return manifest


def _check_architecture(model: nn.Module, manifest: dict) -> None:
    saved = manifest["model"]
    keys = list(model.state_dict().keys())
    shapes = _shapes(model)
    if type(model).__name__ != saved["class"] or len(keys) != saved["tensors"] or _hash_shapes(shapes, keys) != saved["shape_hash"]:
        raise CheckpointError(
            f"checkpoint was made for a different architecture ({saved['class']} with {saved['tensors']} tensors), "
            f"not this {type(model).__name__} with {len(keys)} tensors"
        )
    for lp in manifest["plan"]["layers"]:
        try:
            model.get_submodule(lp["name"])
        except AttributeError:
            raise CheckpointError(f"checkpoint layer {lp['name']} does not exist in this model") from None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{file} is truncated or corrupt ({first})") from None


def load(model: nn.Module, path: str | Path, *, device=None, inplace: bool = False) -> QuantModel:
    """Restore a saved quantization onto a float ``model`` (a fresh copy unless ``inplace``)."""
    path = Path(path)
    manifest = read_manifest(path)
    _check_architecture(model, manifest)
    tensors = _read_tensors(path / STATE_FILE)
    try:
        config = from_dict(QuantConfig, manifest["config"])
        plan = WrapPlan.from_dict(manifest["plan"])
    except (KeyError, TypeError, DiffquantError) as exc:
        raise CheckpointError(f"{path / MANIFEST_FILE} has an invalid plan or config ({exc})") from None
    if not inplace:
        model = copy.deepcopy(model)
    qmodel = build(model, config, plan)
    qmodel.recipe = manifest.get("recipe", "none")
    qmodel.recipe_config = manifest.get("recipe_config", {})
    qmodel.timestep_index.lookup = manifest.get("timestep_index", {}).get("lookup", config.timestep_lookup)

    _apply_state(qmodel, manifest, tensors, path)
    qmodel.eval()
    if device is not None:
        qmodel.to(device)
    return qmodel


def _apply_state(qmodel: QuantModel, manifest: dict, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Restore quantizer attributes, layer switches, rounding modules and tensors (strict)."""
    from ..nn.layers import attach_adaround, attach_input_scale, attach_lora
    from ..quant.variants import rebuild_quantizer, replace_module

    quantizers = qmodel.quantizers()
    for name, desc in manifest["quantizers"].items():
        q = quantizers.get(name)
        if q is None:
            raise CheckpointError(f"checkpoint quantizer {name} does not exist in the rebuilt model")
        try:
            new = rebuild_quantizer(desc, q)
        except (KeyError, DiffquantError) as exc:
            raise CheckpointError(f"checkpoint quantizer {name}: {exc}") from None
        if new is not q:
            replace_module(qmodel.model, name, new)
        _restore_quantizer(new, desc)
    layers = qmodel.layers()
    for name, state in manifest["layers"].items():
        layer = layers[name]
        layer.use_weight_quant = state["use_weight_quant"]
        layer.use_act_quant = state["use_act_quant"]
        if state.get("adaround"):
            attach_adaround(layer, modes=state["adaround"]).requires_grad_(False)
        elif layer.adaround is not None:
            layer.adaround = None
        if state.get("input_scale") and layer.input_scale is None:
            attach_input_scale(layer)
        elif not state.get("input_scale"):
            layer.input_scale = None
        rank = state.get("lora_rank")
        if rank and (layer.weight_delta is None or layer.weight_delta.rank != rank):
            attach_lora(layer, int(rank))
        elif not rank:
            layer.weight_delta = None
    for name, state in manifest.get("attention", {}).items():
        qmodel.attention_processors()[name].use_act_quant = state["use_act_quant"]

    expected = qmodel.quant_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"{path / STATE_FILE} does not match the rebuilt model: {what}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{key}: saved shape {tuple(value.shape)} differs from the model's {tuple(expected[key].shape)}"
            )
    device = next(iter(expected.values())).device if expected else None
    qmodel.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)
    qmodel.clear_weight_cache()


def restore_into(qmodel: QuantModel, path: str | Path) -> QuantModel:
    """Load a saved quantizer state into an already wrapped ``qmodel`` with the same plan (in place)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest["plan"] != json.loads(json.dumps(qmodel.plan.to_dict())):
        raise CheckpointError(f"{path}: the saved wrap plan differs from this model's")
    _apply_state(qmodel, manifest, _read_tensors(path / STATE_FILE), path)
    return qmodel


def _restore_quantizer(q: UniformQuantizer, desc: dict) -> None:
    for attr in _QUANTIZER_ATTRS:
        if attr in desc:
            setattr(q, attr, desc[attr])
    q.mode = "quantize"
    q.qdrop_prob = 1.0
