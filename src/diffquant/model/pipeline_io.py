"""Saving and loading a diffusers pipeline whose denoiser is quantized.

Two layouts, both bit-identical on reload:

- ``pipe.save_pretrained(dir)`` with a :class:`QuantModel` component (diffusers' own path): the
  component is recorded as ``["diffquant", "QuantModel"]`` in ``model_index.json`` and saved by
  :func:`save_pretrained` (float weights in the denoiser's diffusers layout + ``diffquant/``);
  ``DiffusionPipeline.from_pretrained(dir)`` loads it back through :func:`from_pretrained`.
- :func:`save_pipeline` writes a folder that any diffusers install loads as the *float* pipeline
  (``model_index.json`` names the denoiser's own class) with the quantizer state beside the
  denoiser's folder (``<denoiser>/diffquant/``: safetensors + manifest); :func:`load_pipeline`
  loads it back and restores the quantization.

Saving the bare ``qmodel.denoiser`` would keep only float weights for a plain load; it warns.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..errors import CheckpointError, DiffquantError
from .checkpoint import MANIFEST_FILE, load, save
from .qmodel import QuantModel

QUANT_DIR = "diffquant"


def _float_denoiser(qmodel: QuantModel) -> nn.Module:
    """A plain instance of the denoiser's class holding ``qmodel``'s float weights."""
    model = qmodel.model
    if not hasattr(type(model), "from_config"):
        raise DiffquantError(f"save_pipeline() needs a diffusers denoiser (from_config), got {type(model).__name__}")
    fresh = type(model).from_config(model.config)
    state = qmodel.denoiser_state_dict()
    fresh.load_state_dict({k: state[k] for k in qmodel.float_keys}, strict=True)
    return fresh.to(dtype=model.dtype).eval()


def save_pretrained(qmodel: QuantModel, directory: str | os.PathLike, **save_kwargs) -> Path:
    """The denoiser's own ``save_pretrained`` layout (float weights, loadable by diffusers as the float
    model) plus the quantizer state in ``<directory>/diffquant/``."""
    out = Path(directory)
    _float_denoiser(qmodel).save_pretrained(out, **save_kwargs)
    save(qmodel, out / QUANT_DIR)
    return out


def from_pretrained(directory: str | os.PathLike, model_cls=None, **load_kwargs) -> QuantModel:
    """Load what :func:`save_pretrained` wrote: the float model (its class from ``config.json`` unless
    ``model_cls`` is given) with the quantization restored, bit-identical."""
    import json

    import diffusers

    root = Path(directory)
    if not (root / QUANT_DIR / MANIFEST_FILE).is_file():
        raise DiffquantError(f"{root} holds no diffquant quantization ({QUANT_DIR}/{MANIFEST_FILE})")
    if model_cls is None:
        try:
            name = json.loads((root / "config.json").read_text())["_class_name"]
            model_cls = getattr(diffusers, name)
        except (OSError, ValueError, KeyError, AttributeError):
            raise DiffquantError(f"{root}: cannot tell the model class from config.json; pass model_cls=") from None
    model = model_cls.from_pretrained(root, **load_kwargs)
    return load(model, root / QUANT_DIR, inplace=True)


def quantized_components(pipe) -> dict[str, QuantModel]:
    """The pipeline's components that are :class:`QuantModel` s, by attribute name."""
    names = getattr(pipe, "components", {}) or {}
    return {name: module for name, module in names.items() if isinstance(module, QuantModel)}


def _check_no_hidden_quantization(pipe) -> None:
    from ..nn.layers import QuantLayer

    for name, module in (getattr(pipe, "components", {}) or {}).items():
        if isinstance(module, nn.Module) and not isinstance(module, QuantModel) and any(
                isinstance(m, QuantLayer) for m in module.modules()):
            raise DiffquantError(f"pipe.{name} holds quantized layers but is not a QuantModel: put the QuantModel "
                                 f"itself in the pipeline (pipe.{name} = qmodel) to save it")


def save_pipeline(pipe, directory: str | os.PathLike, **save_kwargs) -> Path:
    """``pipe.save_pretrained(directory)`` that keeps the quantization of its QuantModel components."""
    _check_no_hidden_quantization(pipe)
    quantized = quantized_components(pipe)
    if not quantized:
        raise DiffquantError("the pipeline holds no QuantModel: use pipe.save_pretrained()")
    out = Path(directory)
    try:
        for name, qmodel in quantized.items():
            setattr(pipe, name, _float_denoiser(qmodel))
        pipe.save_pretrained(out, **save_kwargs)
    finally:
        for name, qmodel in quantized.items():
            setattr(pipe, name, qmodel)
    for name, qmodel in quantized.items():
        save(qmodel, out / name / QUANT_DIR, extra={"pipeline_component": name})
    return out


def load_pipeline(pipeline_cls, directory: str | os.PathLike, **from_pretrained_kwargs):
    """``pipeline_cls.from_pretrained(directory)`` with every saved quantization restored."""
    root = Path(directory)
    if not root.is_dir():
        raise DiffquantError(f"pipeline folder not found: {root}")
    pipe = pipeline_cls.from_pretrained(root, **from_pretrained_kwargs)
    restored = 0
    for name, module in list((pipe.components or {}).items()):
        quant_dir = root / name / QUANT_DIR
        if (quant_dir / MANIFEST_FILE).is_file():
            if not isinstance(module, nn.Module):
                raise CheckpointError(f"{quant_dir}: pipe.{name} is not a module")
            setattr(pipe, name, load(module, quant_dir, inplace=True))
            restored += 1
    if not restored:
        raise DiffquantError(f"{root} holds no diffquant quantization (no */{QUANT_DIR}/{MANIFEST_FILE}); "
                             f"load it with {pipeline_cls.__name__}.from_pretrained()")
    return pipe
