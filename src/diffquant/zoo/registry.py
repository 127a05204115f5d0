"""Named diffusion models and local diffusers folders, loaded into one
:class:`diffquant.bundle.DiffusionBundle` with the facts of their model cards (scheduler, sample
shape, call convention, guidance, reference data set, classifier).

Nothing is ever downloaded: names resolve to files in the assets directory
(:func:`diffquant.paths.assets_dir`) or in the package, and paths to local folders.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from diffquant.bundle import (
    CALL_DIFFUSERS, CALL_DIFFUSERS_CONDITION, DEFAULT_CONTEXT_TOKENS, DiffusionBundle, linear_ddpm_config,
)
from diffquant.errors import DiffquantError
from diffquant.paths import BUNDLED_DIR, assets_dir

# ----------------------------------------------------------------------------------------------
# Built-in models

def _asset_file(model: str, relative: str, assets: str | os.PathLike | None) -> Path:
    root = assets_dir(assets)
    if root is None:
        raise DiffquantError(
            f"{model}: no assets directory found; expected <assets>/{relative} "
            "(set DIFFQUANT_ASSETS=/path/to/assets or pass --assets)"
        )
    path = root / relative
    if not path.is_file():
        raise DiffquantError(
            f"{model}: weights not found at {path} (set DIFFQUANT_ASSETS=/path/to/assets or pass --assets)"
        )
    return path


def _load_mnist_resunet(assets: str | os.PathLike | None, device: str | torch.device) -> DiffusionBundle:
    from diffquant.zoo.mnist_resunet import load_mnist_resunet

    path = _asset_file("mnist-resunet", "models/mnist-resunet/ddpm_mnist.pth", assets)
    return DiffusionBundle(
        name="mnist-resunet",
        unet=load_mnist_resunet(path, device),
        # Like the original DDIM sampler, no x0 clipping: clipping leaves speckles on this model.
        scheduler_config=linear_ddpm_config(clip_sample=False),
        sample_shape=(1, 28, 28),
        source=str(path),
        reference_dataset="mnist",
    )


def _load_mnist_convunet(assets: str | os.PathLike | None, device: str | torch.device) -> DiffusionBundle:
    from diffquant.zoo.mnist_convunet import load_mnist_convunet

    path = _asset_file("mnist-convunet", "models/mnist-convunet/ddpm_mnist.pt", assets)
    return DiffusionBundle(
        name="mnist-convunet",
        unet=load_mnist_convunet(path, device),
        # Its raw samples drift far outside [-1, 1]; clipping x0 would hide that.
        scheduler_config=linear_ddpm_config(clip_sample=False),
        sample_shape=(1, 28, 28),
        source=str(path),
        reference_dataset="mnist",
    )


BUNDLED_DEFAULT = "fmnist-unet"
#: the shipped classifier of the bundled model's data (Fashion-MNIST), for class accuracy
BUNDLED_CLASSIFIER = "fmnist-classifier"


def _load_bundled_default(assets: str | os.PathLike | None, device: str | torch.device) -> DiffusionBundle:
    folder = BUNDLED_DIR / BUNDLED_DEFAULT
    if not (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
        raise DiffquantError(
            f"the bundled default model is missing: expected a diffusers folder at {folder}"
        )
    bundle = load_diffusers_folder(folder, device=device, name=BUNDLED_DEFAULT)
    meta = folder / "diffquant_model.json"
    if meta.is_file():  # class names, recommended guidance, training provenance
        bundle.extra.update(_read_json(meta))
    bundle.reference_dataset = "fashion-mnist"
    classifier = BUNDLED_DIR / BUNDLED_CLASSIFIER
    bundle.classifier_dir = str(classifier) if classifier.is_dir() else None
    return bundle


MODELS: Mapping[str, Callable[[str | os.PathLike | None, str | torch.device], DiffusionBundle]] = (
    MappingProxyType({
        "mnist-resunet": _load_mnist_resunet,
        "mnist-convunet": _load_mnist_convunet,
        BUNDLED_DEFAULT: _load_bundled_default,
        "default": _load_bundled_default,
    })
)


def available_models() -> list[str]:
    return list(MODELS)


# ----------------------------------------------------------------------------------------------
# Local diffusers folders

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DiffquantError(f"cannot read {path}: {err}") from err


def _public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _sample_shape(config: Mapping[str, Any], folder: Path) -> tuple[int, int, int]:
    size = config.get("sample_size")
    if size is None:
        raise DiffquantError(f"{folder}: the UNet config has no sample_size")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(config["in_channels"]), int(h), int(w)


def _load_unet_folder(folder: Path, device: str | torch.device):
    from diffusers import UNet2DConditionModel, UNet2DModel

    config = _read_json(folder / "config.json")
    class_name = config.get("_class_name", "UNet2DModel")
    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    if class_name not in classes:
        raise DiffquantError(f"{folder}: unsupported model class {class_name!r} "
                             "(expected UNet2DModel or UNet2DConditionModel)")
    try:
        unet = classes[class_name].from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        # e.g. a config.json that disagrees with the weights: name the first mismatching tensor
        lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
        mismatch = [ln for ln in lines if ln.startswith("size mismatch")]
        first_line = (mismatch or lines or [type(err).__name__])[0]
        if len(first_line) > 300:
            first_line = first_line[:300] + " …"
        raise DiffquantError(f"{folder}: cannot load {class_name}: {first_line}") from None
    return unet.to(device).eval(), class_name, dict(unet.config)


#: components of a pipeline folder that diffquant's own sampler handles (the rest need diffusers)
PLAIN_COMPONENTS = {"unet", "scheduler"}


def is_full_pipeline(path: Path) -> bool:
    """A pipeline folder with more than a UNet and a scheduler (a text encoder, VAE, transformer, ...)."""
    index = path / "model_index.json"
    if not index.is_file():
        return False
    try:
        components = {k for k, v in json.loads(index.read_text()).items()
                      if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
    except (OSError, ValueError) as exc:
        raise DiffquantError(f"{index} is not valid JSON ({exc})") from None
    return bool(components - PLAIN_COMPONENTS)


def load_diffusers_folder(path: str | os.PathLike, device: str | torch.device = "cpu",
                          name: str | None = None) -> DiffusionBundle:
    """Load a local diffusers UNet folder (config.json + weights) or pipeline folder.

    Pipeline folders (``model_index.json``) read ``unet/`` and ``scheduler/scheduler_config.json``.
    A UNet folder may carry a ``scheduler_config.json`` beside its config; otherwise the linear DDPM
    schedule is assumed. Class-conditional UNet2DModels (``num_class_embeds``) use the last class
    id as the null class for classifier-free guidance.
    """
    folder = Path(path)
    if not folder.exists():
        raise DiffquantError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise DiffquantError(f"{folder}: expected a diffusers model folder (config.json + weights)")

    if (folder / "model_index.json").is_file():
        if is_full_pipeline(folder):
            raise DiffquantError(f"{folder} is a full diffusers pipeline (text encoder, VAE or transformer): "
                                 "`quantize`, `sample` and `bench` run it through diffusers; this command does not yet")
        unet_dir, sched_file = folder / "unet", folder / "scheduler" / "scheduler_config.json"
        if not (unet_dir / "config.json").is_file():
            raise DiffquantError(f"{folder}: pipeline folder without unet/config.json")
        if not sched_file.is_file():
            raise DiffquantError(f"{folder}: pipeline folder without scheduler/scheduler_config.json")
    elif (folder / "config.json").is_file():
        unet_dir, sched_file = folder, folder / "scheduler_config.json"
    else:
        raise DiffquantError(f"{folder}: neither config.json nor model_index.json found")

    unet, class_name, config = _load_unet_folder(unet_dir, device)
    if sched_file.is_file():
        scheduler_config = _public_config(_read_json(sched_file))
    else:
        scheduler_config = linear_ddpm_config(clip_sample=True)

    num_classes = null_class = None
    n_embeds = config.get("num_class_embeds")
    if config.get("class_embed_type") is not None:
        raise DiffquantError(f"{folder}: class_embed_type {config['class_embed_type']!r} is not supported")
    if n_embeds:
        num_classes = null_class = int(n_embeds) - 1

    call, context_shape = CALL_DIFFUSERS, None
    if class_name == "UNet2DConditionModel":
        if config.get("addition_embed_type") is not None:
            raise DiffquantError(f"{folder}: addition_embed_type {config['addition_embed_type']!r} "
                                 "is not supported")
        dim = config.get("cross_attention_dim")
        if not isinstance(dim, int):
            raise DiffquantError(f"{folder}: unsupported cross_attention_dim {dim!r}")
        call, context_shape = CALL_DIFFUSERS_CONDITION, (DEFAULT_CONTEXT_TOKENS, dim)

    return DiffusionBundle(
        name=name or str(folder.resolve()),
        unet=unet,
        scheduler_config=scheduler_config,
        sample_shape=_sample_shape(config, folder),
        num_classes=num_classes,
        null_class=null_class,
        call_convention=call,
        context_shape=context_shape,
        source=str(folder.resolve()),
    )


def load_model(name_or_path: str | os.PathLike, assets: str | os.PathLike | None = None,
               device: str | torch.device = "cpu") -> DiffusionBundle:
    """Resolve a registered model name or a local diffusers folder into a :class:`DiffusionBundle`."""
    key = str(name_or_path)
    if key in MODELS:
        return MODELS[key](assets, device)
    path = Path(key).expanduser()
    if path.exists():
        return load_diffusers_folder(path, device=device)
    looks_like_path = os.sep in key or key.startswith(".") or (os.altsep and os.altsep in key)
    if looks_like_path:
        raise DiffquantError(f"model folder not found: {key}")
    raise DiffquantError(
        f"unknown model {key!r}: use one of {', '.join(MODELS)} or a local diffusers folder"
    )
