"""Range initialisation policies (docs/methods.md §1.2).

Each policy maps one batch of data to a range [lo, hi] (per tensor: 0-d tensors; per channel:
shape [C]); :func:`combine_ranges` merges the range of a new batch into the running one.
Step and zero point then come from :func:`diffquant.quant.affine.qparams_from_range`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .affine import GridSpec, reduce_dims

POLICIES = ("minmax", "ema_minmax", "lp_shrink", "edadm_grid")


def validate_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ConfigError(f"unknown range init policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return policy


#: Keyword options each search policy accepts through ``UniformQuantizer(init_options=...)``.
SEARCH_OPTIONS = {
    "lp_shrink": ("p", "candidates", "shrink", "zero_anchored", "bins"),
    "edadm_grid": ("p", "side", "symmetric", "bins"),
}


def validate_init_options(policy: str, options: dict) -> dict:
    """Reject unknown search options early (``minmax`` / ``ema_minmax`` ignore options)."""
    allowed = SEARCH_OPTIONS.get(policy)
    if allowed is not None:
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for range init {policy!r}; "
                f"allowed: {', '.join(allowed)}"
            )
    return options


def minmax_range(x: Tensor, channel_axis: int | None) -> tuple[Tensor, Tensor]:
    """Plain min and max, per tensor or per channel."""
    dims = reduce_dims(x, channel_axis)
    x = x.detach().float()
    return x.amin(dim=dims), x.amax(dim=dims)


def batch_range(
    x: Tensor, policy: str, spec: GridSpec, channel_axis: int | None, **options
) -> tuple[Tensor, Tensor]:
    """The range one batch suggests under ``policy`` (before combining with earlier batches)."""
    if policy in ("minmax", "ema_minmax"):
        return minmax_range(x, channel_axis)
    if policy == "lp_shrink":
        from .search import lp_shrink_range

        return lp_shrink_range(x, spec, channel_axis, **options)
    if policy == "edadm_grid":
        from .search import edadm_grid_range

        return edadm_grid_range(x, spec, channel_axis, **options)
    raise ConfigError(f"unknown range init policy {policy!r}")


def combine_ranges(
    policy: str,
    old: tuple[Tensor, Tensor] | None,
    new: tuple[Tensor, Tensor],
    batches_seen: int,
    momentum: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Merge a new batch's range into the running one.

    - ``minmax``: global min and max over all batches (the naive baseline, docs/methods.md §2);
    - ``ema_minmax``: first batch sets it, then m ← μ·m + (1−μ)·m_batch (μ = ``momentum``);
    - ``lp_shrink``: running mean of the per-batch search results (one batch: the search itself);
    - ``edadm_grid``: [m, M] ← 0.9·[m, M] + 0.1·[m, M]_batch (``momentum`` = 0.9 there).
    """
    if old is None:
        return new
    (lo, hi), (nlo, nhi) = old, new
    if policy == "minmax":
        return torch.minimum(lo, nlo), torch.maximum(hi, nhi)
    if policy in ("ema_minmax", "edadm_grid"):
        return momentum * lo + (1 - momentum) * nlo, momentum * hi + (1 - momentum) * nhi
    if policy == "lp_shrink":
        w = 1.0 / (batches_seen + 1)
        return (1 - w) * lo + w * nlo, (1 - w) * hi + w * nhi
    raise ConfigError(f"unknown range init policy {policy!r}")
