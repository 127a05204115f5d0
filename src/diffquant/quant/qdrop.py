"""QDrop mixing (docs/methods.md §1.4): keep each element quantized with probability ``prob``."""
from __future__ import annotations

import torch
from torch import Tensor


def mix_inputs(
    x_q: Tensor, x_fp: Tensor, prob: float, generator: torch.Generator | None = None
) -> Tensor:
    """where(u < prob, x_q, x_fp) with u ~ U(0, 1) drawn fresh per element.

    ``prob`` = 1 returns ``x_q`` and 0 returns ``x_fp`` without drawing random numbers. Used by
    activation quantizers during reconstruction (Q(x) vs x) and for EDA-DM's cached unit inputs
    (x_in^q vs x_in^fp). Pass a ``generator`` for reproducible draws.
    """
    if x_q.shape != x_fp.shape:
        shapes = f"{tuple(x_q.shape)} and {tuple(x_fp.shape)}"
        raise ValueError(f"mix_inputs needs tensors of one shape, got {shapes}")
    if prob >= 1.0:
        return x_q
    if prob <= 0.0:
        return x_fp
    u = torch.rand(x_q.shape, generator=generator, device=x_q.device, dtype=torch.float32)
    return torch.where(u < prob, x_q, x_fp)
