"""Improved precision and recall (Kynkäänniemi et al., 2019) on k-NN manifolds in feature space.

Each real feature gets a ball whose radius is the distance to its k-th nearest real neighbour
(itself excluded); precision is the fraction of generated features inside at least one real
ball. Recall swaps the roles: the fraction of real features inside at least one generated ball.
Distances are computed with ``torch.cdist`` in row chunks, so memory stays at chunk × N.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffquant.errors import DiffquantError

DEFAULT_K = 3


def _as_features(x: Any, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2 or t.shape[0] == 0:
        raise DiffquantError(f"{name} features must be a non-empty [N, D] array; got {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype)


def knn_radii(features: torch.Tensor, k: int = DEFAULT_K, chunk_size: int = 1024) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row, [N]."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise DiffquantError(f"k-NN radius needs 1 <= k < N; got k={k}, N={n}")
    radii = []
    for start in range(0, n, chunk_size):
        d = torch.cdist(features[start : start + chunk_size], features)
        # the k+1 smallest include the point itself (distance 0); the last of them is the k-th neighbour
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(radii)


def coverage_fraction(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
                      chunk_size: int = 1024) -> float:
    """Fraction of ``queries`` within distance ``radii[i]`` of some ``centres[i]``."""
    inside = 0
    for start in range(0, queries.shape[0], chunk_size):
        d = torch.cdist(queries[start : start + chunk_size], centres)
        inside += int((d <= radii.unsqueeze(0)).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(
    real_features: Any,
    fake_features: Any,
    k: int = DEFAULT_K,
    *,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> dict[str, float]:
    """{"precision", "recall"} of generated features against real ones (k-NN manifolds, k=3).

    float64 by default so that a point's distance to an identical point is exactly zero.
    """
    device = torch.device(device)
    if device.type == "mps" and dtype == torch.float64:
        dtype = torch.float32  # MPS has no float64
    real = _as_features(real_features, "real", device, dtype)
    fake = _as_features(fake_features, "generated", device, dtype)
    if real.shape[1] != fake.shape[1]:
        raise DiffquantError(f"feature dimensions differ: real {real.shape[1]}, generated {fake.shape[1]}")
    with torch.no_grad():
        real_radii = knn_radii(real, k, chunk_size)
        fake_radii = knn_radii(fake, k, chunk_size)
        precision = coverage_fraction(fake, real, real_radii, chunk_size)
        recall = coverage_fraction(real, fake, fake_radii, chunk_size)
    return {"precision": precision, "recall": recall}
