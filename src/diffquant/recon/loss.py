"""Reconstruction losses (docs/methods.md §1.3, §1.6).

- :func:`lp_loss`: L_rec^p(ŷ, y) = Σ over channels of |ŷ − y|^p, averaged over all other axes.
- :func:`rounding_regularizer`: λ·Σ_V (1 − |2h(V) − 1|^β) with β from a :class:`BetaSchedule`,
  zero during the warm-up.

Channel axis (:func:`channel_axis_of`): axis 1 for conv features ([B, C, H, W], [B, C]) and the
last axis for 3-d tensors, which in diffusion UNets are [B, L, C] token tensors (transformer
blocks, attention on sequences). The official code always sums over axis 1, i.e. over the tokens
of a [B, L, C] tensor; a [B, C, L] Conv1d output must pass ``channel_axis=1`` explicitly.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from ..errors import ConfigError
from ..quant.adaround import AdaRound, BetaSchedule


def channel_axis_of(x: Tensor) -> int:
    """The channel axis :func:`lp_loss` sums over by default (see the module docstring)."""
    if x.dim() < 2:
        raise ConfigError(f"a reconstruction target needs a batch and a channel axis, got shape {tuple(x.shape)}")
    return x.dim() - 1 if x.dim() == 3 else 1


def lp_loss(pred: Tensor, target: Tensor, p: float = 2.0, channel_axis: int | None = None) -> Tensor:
    """Σ over the channel axis of |pred − target|^p, averaged over every other axis."""
    if pred.shape != target.shape:
        raise ConfigError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    axis = channel_axis_of(pred) if channel_axis is None else channel_axis
    return (pred.float() - target.float()).abs().pow(p).sum(dim=axis).mean()


def rounding_regularizer(
    roundings: Iterable[AdaRound], schedule: BetaSchedule, count: int, weight: float
) -> tuple[Tensor | None, float]:
    """The AdaRound term λ·Σ R(β) at iteration ``count`` (counted from 1, as Q-Diffusion does).

    Returns (term, β); the term is None while the schedule is in its warm-up (weight 0), so the
    caller adds nothing and no graph is built.
    """
    active, beta = schedule(count)
    if not active or weight == 0:
        return None, beta
    terms = [r.regularizer(beta) for r in roundings]
    if not terms:
        return None, beta
    return weight * torch.stack(terms).sum(), beta
