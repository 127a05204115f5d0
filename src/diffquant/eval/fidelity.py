"""Fidelity of a quantized model to its full-precision original.

* ``image_mse_psnr``: final samples drawn from the same noise, compared pixel by pixel.
* ``EpsErrorRecorder``: the ε-prediction error per sampler step. Use it as the sampler's
  ``step_callback(k, t, x_t, class_labels)``: at each step it runs both denoisers on the same
  ``x_t`` (the trajectory of whichever model the sampler is driving) and accumulates the MSE.
  It knows nothing about the sampler or about quantization: it only calls two functions.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np
import torch

from diffquant.errors import DiffquantError

EpsFn = Callable[[torch.Tensor, Any, Any], torch.Tensor]


def _as_float_pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray, bool]:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    if a.shape != b.shape or a.ndim < 2:
        raise DiffquantError(f"image sets must have the same shape [N, ...]; got {a.shape} and {b.shape}")
    if (a.dtype == np.uint8) != (b.dtype == np.uint8):
        raise DiffquantError(f"compare uint8 with uint8 or float with float; got {a.dtype} and {b.dtype}")
    return a.astype(np.float64), b.astype(np.float64), a.dtype == np.uint8


def per_image_mse(a: Any, b: Any) -> np.ndarray:
    """Mean squared difference of each image pair, [N] (uint8 inputs on the 0..255 scale)."""
    x, y, _ = _as_float_pair(a, b)
    return ((x - y) ** 2).reshape(x.shape[0], -1).mean(axis=1)


def psnr_from_mse(mse: float, data_range: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def image_mse_psnr(a: Any, b: Any, data_range: float | None = None) -> dict[str, float]:
    """{"mse", "psnr", "psnr_mean_per_image", "data_range"} between two image sets.

    uint8: MSE on the 0..255 scale and data_range 255. float: data_range defaults to 2 (images
    in [-1, 1]). ``psnr`` comes from the MSE over all pixels; ``psnr_mean_per_image`` averages
    per-image PSNRs (identical images count as +inf, so that mean can be inf).
    """
    x, y, is_uint8 = _as_float_pair(a, b)
    rng = float(data_range) if data_range is not None else (255.0 if is_uint8 else 2.0)
    per_image = ((x - y) ** 2).reshape(x.shape[0], -1).mean(axis=1)
    mse = float(per_image.mean())
    return {
        "mse": mse,
        "psnr": psnr_from_mse(mse, rng),
        "psnr_mean_per_image": float(np.mean([psnr_from_mse(m, rng) for m in per_image])),
        "data_range": rng,
    }


def _timestep_value(t: Any) -> int | float:
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1)[0].item()
    elif isinstance(t, np.ndarray):
        t = t.reshape(-1)[0].item()
    return int(t) if float(t).is_integer() else float(t)


class EpsErrorRecorder:
    """Per-step MSE between two ε-predictors, usable as a sampler ``step_callback``.

    ``fp_fn(x_t, t, class_labels)`` and ``q_fn(...)`` return ε with the shape of ``x_t``.
    Calls with the same step index k from several batches are pooled (sums of squared error
    and element counts), so the curve is the MSE over all samples.
    """

    def __init__(self, fp_fn: EpsFn, q_fn: EpsFn):
        self.fp_fn = fp_fn
        self.q_fn = q_fn
        self._sse: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self._timestep: dict[int, int | float] = {}

    @torch.no_grad()
    def __call__(self, k: int, t: Any, x_t: torch.Tensor, class_labels: Any = None) -> None:
        eps_fp = self.fp_fn(x_t, t, class_labels)
        eps_q = self.q_fn(x_t, t, class_labels)
        if eps_fp.shape != eps_q.shape:
            raise DiffquantError(f"ε shapes differ at step {k}: {tuple(eps_fp.shape)} vs {tuple(eps_q.shape)}")
        k = int(k)
        sse = float((eps_fp.double() - eps_q.double()).pow(2).sum())
        self._sse[k] = self._sse.get(k, 0.0) + sse
        self._count[k] = self._count.get(k, 0) + eps_fp.numel()
        self._timestep.setdefault(k, _timestep_value(t))

    def reset(self) -> None:
        self._sse.clear()
        self._count.clear()
        self._timestep.clear()

    def curve(self) -> dict[str, list]:
        """{"step": [k...], "timestep": [t_k...], "eps_mse": [...]}, ordered by k (k=0 noisiest)."""
        steps = sorted(self._sse)
        return {
            "step": steps,
            "timestep": [self._timestep[k] for k in steps],
            "eps_mse": [self._sse[k] / self._count[k] for k in steps],
        }


def eps_mse_per_step(fp_fn: EpsFn, q_fn: EpsFn, trajectory: Iterable[tuple[torch.Tensor, Any, Any]]) -> dict[str, list]:
    """The ε-MSE curve along a recorded trajectory of (x_t, t, class_labels), step k = position."""
    recorder = EpsErrorRecorder(fp_fn, q_fn)
    for k, (x_t, t, labels) in enumerate(trajectory):
        recorder(k, t, x_t, labels)
    return recorder.curve()
