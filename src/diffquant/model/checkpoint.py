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

from .._version import __version__
from ..config import QuantConfig, from_dict, save_yaml, to_dict
from ..errors import CheckpointError, DiffquantError
from ..quant.affine import GRIDS
from .plan import WrapPlan
from .qmodel import QuantModel
from .wrap import build
from ..jsonio import write_json

FORMAT = "diffquant-quant-state"
FORMAT_VERSION = 1
STATE_FILE = "quant_state.safetensors"
MANIFEST_FILE = "manifest.json"
#: quantizer attributes that live in the manifest rather than in tensors
QUANTIZER_ATTRS = ("bits", "grid", "init", "include_zero", "clamp_zero_point", "momentum", "enabled")


def _shapes(model: nn.Module | dict) -> dict[str, list[int]]:
    state = model if isinstance(model, dict) else model.state_dict()
    return {k: list(v.shape) for k, v in state.items()}


def save(qmodel: QuantModel, path: str | Path, extra: dict | None = None) -> Path:
    """Write the quantizer state of ``qmodel`` into directory ``path``; returns the directory."""
    out = Path(path)
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in qmodel.quant_state_dict().items()}
    _refuse_non_finite(tensors, "refusing to save the quantizer state")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / STATE_FILE), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    float_shapes = _shapes(qmodel.denoiser_state_dict())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "diffquant_version": __version__,
        "recipe": qmodel.recipe,
        "recipe_config": to_dict(qmodel.recipe_config),
        "config": to_dict(qmodel.quant_config),
        "plan": qmodel.plan.to_dict(),
        "timestep_index": qmodel.timestep_index.to_dict(),
        "model": {
            "class": type(qmodel.model).__name__,
            "tensors": len(qmodel.float_keys),
            "shape_hash": _hash_shapes(float_shapes, qmodel.float_keys),
            "shapes": {k: float_shapes[k] for k in qmodel.float_keys},
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
        "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in tensors.items()},
        "extra": extra or {},
    }
    write_json(out / MANIFEST_FILE, manifest, indent=1)
    save_yaml(qmodel.quant_config, out / "config.yaml")
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
    _validate_manifest(manifest, manifest_path)
    return manifest


def _is_shape(value) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def _validate_manifest(manifest: dict, where: Path) -> None:
    """Every field the loader reads, checked for presence and type (one line naming the field)."""
    def need(ok: bool, field: str, expected: str) -> None:
        if not ok:
            raise CheckpointError(f"{where}: manifest field {field} must be {expected}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key, kind, text in (("recipe", str, "a string"), ("recipe_config", dict, "a mapping"),
                            ("config", dict, "a mapping"), ("plan", dict, "a mapping"),
                            ("timestep_index", dict, "a mapping"), ("model", dict, "a mapping"),
                            ("quantizers", dict, "a mapping"), ("layers", dict, "a mapping"),
                            ("tensors", dict, "a mapping")):
        need(isinstance(manifest.get(key), kind), f"{key!r}", text)
    for key in ("attention", "extra"):
        need(isinstance(manifest.get(key, {}), dict), f"{key!r}", "a mapping")
    model = manifest["model"]
    need(isinstance(model.get("class"), str), "'model.class'", "a string")
    need(is_int(model.get("tensors")), "'model.tensors'", "an integer")
    need(isinstance(model.get("shape_hash"), str), "'model.shape_hash'", "a string")
    need(isinstance(model.get("shapes", {}), dict) and all(_is_shape(v) for v in model.get("shapes", {}).values()),
         "'model.shapes'", "a mapping of tensor shapes")
    plan = manifest["plan"]
    need(isinstance(plan.get("layers"), list) and all(isinstance(lp, dict) and isinstance(lp.get("name"), str)
                                                      for lp in plan["layers"]),
         "'plan.layers'", "a list of layer plans with names")
    index = manifest["timestep_index"]
    steps = index.get("timesteps")
    need(steps is None or (isinstance(steps, list) and all(is_int(t) for t in steps)),
         "'timestep_index.timesteps'", "a list of integers or null")
    need(index.get("lookup", "exact") in ("exact", "nearest"), "'timestep_index.lookup'", "'exact' or 'nearest'")
    for name, desc in manifest["quantizers"].items():
        need(isinstance(desc, dict), f"'quantizers.{name}'", "a mapping")
        need(is_int(desc.get("bits")) and (1 <= desc["bits"] <= 8 or desc["bits"] in (16, 32)),
             f"'quantizers.{name}.bits'", "a bit-width (1-8, 16 or 32)")
        need(desc.get("grid") in GRIDS, f"'quantizers.{name}.grid'", "one of " + ", ".join(GRIDS))
        for flag in ("include_zero", "clamp_zero_point", "enabled"):
            if flag in desc:
                need(isinstance(desc[flag], bool), f"'quantizers.{name}.{flag}'", "true or false")
        if "init" in desc:
            need(isinstance(desc["init"], str), f"'quantizers.{name}.init'", "a string")
        if desc.get("momentum") is not None:
            need(isinstance(desc["momentum"], (int, float)) and not isinstance(desc["momentum"], bool)
                 and 0 <= desc["momentum"] <= 1, f"'quantizers.{name}.momentum'", "a number in [0, 1]")
        if "class" in desc:
            need(isinstance(desc["class"], str), f"'quantizers.{name}.class'", "a string")
        for key in ("pts_axis", "pts_channels"):
            if key in desc:
                need(is_int(desc[key]), f"'quantizers.{name}.{key}'", "an integer")
    for name, state in manifest["layers"].items():
        need(isinstance(state, dict), f"'layers.{name}'", "a mapping")
        for flag in ("use_weight_quant", "use_act_quant"):
            need(isinstance(state.get(flag), bool), f"'layers.{name}.{flag}'", "true or false")
        need(isinstance(state.get("input_scale", False), bool), f"'layers.{name}.input_scale'", "true or false")
        rounding = state.get("adaround")
        need(rounding is None or (isinstance(rounding, list) and all(isinstance(m, str) for m in rounding)),
             f"'layers.{name}.adaround'", "null or a list of rounding modes")
        rank = state.get("lora_rank")
        need(rank is None or (is_int(rank) and rank >= 1), f"'layers.{name}.lora_rank'", "null or a positive integer")
    for name, state in manifest.get("attention", {}).items():
        need(isinstance(state, dict) and isinstance(state.get("use_act_quant"), bool),
             f"'attention.{name}.use_act_quant'", "true or false")
    for key, entry in manifest["tensors"].items():
        need(isinstance(entry, dict) and _is_shape(entry.get("shape")) and isinstance(entry.get("dtype"), str),
             f"'tensors.{key}'", "a mapping with a shape (list of sizes) and a dtype name")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _match_tensors(tensors: dict[str, torch.Tensor], want: dict[str, tuple[str, list[int]]], file: Path,
                   against: str) -> None:
    """``tensors`` must be exactly the names of ``want`` ({name: (dtype, shape)}), each with its dtype
    and shape; ``against`` names what ``want`` describes (the manifest, the rebuilt model)."""
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which {against} does not have"
        raise CheckpointError(f"{file} does not match {against}: it {what}")
    for key, value in tensors.items():
        dtype, shape = want[key]
        if _dtype_name(value.dtype) != dtype or list(value.shape) != list(shape):
            raise CheckpointError(f"{file}: {key} is {_dtype_name(value.dtype)} {tuple(value.shape)}, {against} "
                                  f"says {dtype} {tuple(shape)}")


def _check_tensor_table(manifest: dict, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """The state file must hold exactly the manifest's tensors, each with its dtype and shape."""
    want = {k: (v["dtype"], v["shape"]) for k, v in manifest["tensors"].items()}
    _match_tensors(tensors, want, file, "the manifest")


def _refuse_non_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Steps, zero points, ranges and rounding variables must all be finite numbers."""
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{what}: {key} holds {count} non-finite values (NaN/Inf); "
                                  "the calibration diverged or was fed non-finite data")


def _first_difference(saved: dict, shapes: dict[str, list[int]]) -> str:
    """What differs between the saved float model and this one, in words."""
    theirs = saved.get("shapes")
    if not isinstance(theirs, dict):
        return "the tensor shapes differ (this checkpoint does not list them)"
    for key in sorted(set(theirs) | set(shapes)):
        if key not in shapes:
            return f"this model has no tensor {key} (saved shape {tuple(theirs[key])})"
        if key not in theirs:
            return f"this model has an extra tensor {key} {tuple(shapes[key])}"
        if list(theirs[key]) != list(shapes[key]):
            return f"{key} is {tuple(theirs[key])} in the checkpoint, {tuple(shapes[key])} in this model"
    return "the tensor order differs"


def _check_architecture(model: nn.Module, manifest: dict) -> None:
    saved = manifest["model"]
    keys = list(model.state_dict().keys())
    shapes = _shapes(model)
    if type(model).__name__ != saved["class"]:
        raise CheckpointError(f"checkpoint was made for another architecture: a {saved['class']}, not this "
                              f"{type(model).__name__}")
    if len(keys) != saved["tensors"] or _hash_shapes(shapes, keys) != saved["shape_hash"]:
        raise CheckpointError(
            f"checkpoint was made for another architecture ({saved['class']} with {saved['tensors']} tensors, "
            f"this one has {len(keys)}): {_first_difference(saved, shapes)}"
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
    _check_tensor_table(manifest, tensors, path / STATE_FILE)
    _refuse_non_finite(tensors, f"{path / STATE_FILE} cannot be loaded")
    try:
        config = from_dict(QuantConfig, manifest["config"])
        plan = WrapPlan.from_dict(manifest["plan"])
    except (KeyError, TypeError, DiffquantError) as exc:
        raise CheckpointError(f"{path / MANIFEST_FILE} has an invalid plan or config ({exc})") from None
    if not inplace:
        model = copy.deepcopy(model)
    try:
        qmodel = build(model, config, plan)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, DiffquantError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path / MANIFEST_FILE}: its wrap plan does not fit this model ({first})") from None
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

    restore_quantizers(qmodel, manifest["quantizers"], str(path))
    layers = qmodel.layers()
    processors = qmodel.attention_processors()
    for section, known in (("layers", layers), ("attention", processors)):
        unknown = sorted(set(manifest.get(section, {})) - set(known))
        if unknown:
            raise CheckpointError(f"{path / MANIFEST_FILE}: {section} entry {unknown[0]} does not exist in the "
                                  "rebuilt model")
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
        processors[name].use_act_quant = state["use_act_quant"]

    expected = qmodel.quant_state_dict()
    _match_tensors(tensors, {k: (_dtype_name(v.dtype), list(v.shape)) for k, v in expected.items()},
                   path / STATE_FILE, "the rebuilt model")
    device = next(iter(expected.values())).device if expected else None
    qmodel.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)
    qmodel.clear_weight_cache()


def restore_into(qmodel: QuantModel, path: str | Path) -> QuantModel:
    """Load a saved quantizer state into an already wrapped ``qmodel`` with the same plan (in place)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest["plan"] != json.loads(json.dumps(qmodel.plan.to_dict())):
        raise CheckpointError(f"{path}: the saved wrap plan differs from this model's")
    tensors = _read_tensors(path / STATE_FILE)
    _check_tensor_table(manifest, tensors, path / STATE_FILE)
    _refuse_non_finite(tensors, f"{path / STATE_FILE} cannot be loaded")
    _apply_state(qmodel, manifest, tensors, path)
    return qmodel


def restore_quantizers(qmodel: QuantModel, descriptions: dict[str, dict], where: str,
                       variants: tuple[str, ...] | None = None) -> None:
    """The one restore of quantizer objects from their manifest descriptions, used by :func:`load`,
    :func:`restore_into` and packed checkpoints: each named quantizer is rebuilt as the variant
    class it was saved as (``variants``: only those classes; None: any) and gets its attributes
    (:data:`QUANTIZER_ATTRS`), in inference mode. Its tensors are loaded by the caller."""
    from ..quant.variants import rebuild_quantizer, replace_module

    quantizers = qmodel.quantizers()
    for name, desc in descriptions.items():
        q = quantizers.get(name)
        if q is None:
            raise CheckpointError(f"{where}: quantizer {name} does not exist in the rebuilt model")
        if variants is None or desc.get("class") in variants:
            try:
                new = rebuild_quantizer(desc, q)
            except (KeyError, DiffquantError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise CheckpointError(f"{where}: quantizer {name}: {first}") from None
            if new is not q:
                replace_module(qmodel.model, name, new)
                q = new
        for attr in QUANTIZER_ATTRS:
            if attr in desc:
                setattr(q, attr, desc[attr])
        q.mode = "quantize"
        q.qdrop_prob = 1.0
