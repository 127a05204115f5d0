"""DMQ's power-of-two channel scaling (PTS) factors, vectorised (docs/methods.md §5.3).

For a per-tensor activation quantizer (s, z) and inputs X [n, C, …] (channel axis anywhere),
candidate j ∈ {0 … D} gives channel c the step s·2^(j−D) with the same integer zero point:

- error e_{i,c,j} = mean over the non-channel axes of sample i of (X − Q(X; s·2^(j−D), z))²;
- ``vote`` (the official code): j*_{i,c} = argmin_j e_{i,c,j}; mode_c = the most frequent j*
  over the samples; m_c = 2^(mode_c − D) if its share ≥ κ, else 1;
- ``mse`` (the paper's ablation): j*_c = argmin_j Σ_i e_{i,c,j}; m_c = 2^(j*_c − D).

Since m_c ≤ 1, PTS only refines small-range channels. Ties go to the smallest j (argmin/argmax
return the first extremum). Everything is vectorised over samples, channels and candidates; the
official code loops over channels. :class:`PTSStatistics` accumulates over batches, so a slice
is streamed rather than held in memory.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError

PTS_SELECTIONS = ("vote", "mse")


def candidate_errors(x: Tensor, step: Tensor | float, zero: Tensor | float, qmin: int, qmax: int, depth: int = 3,
                     channel_axis: int = 1) -> Tensor:
    """e_{i,c,j} for every sample i, channel c and candidate j = 0 … ``depth``: [n, C, D+1]."""
    if x.dim() < 2:
        raise ConfigError(f"PTS needs a batch and a channel axis, got shape {tuple(x.shape)}")
    x = x.detach().float().movedim(channel_axis % x.dim(), 1)
    x = x.reshape(x.shape[0], x.shape[1], -1, 1)  # [n, C, S, 1]
    s = torch.as_tensor(step, dtype=torch.float32, device=x.device).reshape(())
    z = torch.as_tensor(zero, dtype=torch.float32, device=x.device).reshape(())
    factors = 2.0 ** (torch.arange(depth + 1, device=x.device, dtype=torch.float32) - depth)
    steps = s * factors  # [D+1]
    q = (torch.clamp(torch.round(x / steps) + z, qmin, qmax) - z) * steps
    return (x - q).pow(2).mean(dim=2)


class PTSStatistics:
    """Votes and summed errors of one quantizer input over any number of batches."""

    def __init__(self, channels: int, depth: int = 3):
        if depth < 0:
            raise ConfigError(f"PTS depth D must be >= 0, got {depth}")
        self.channels = int(channels)
        self.depth = int(depth)
        self.counts = torch.zeros(self.channels, depth + 1, dtype=torch.long)
        self.errors = torch.zeros(self.channels, depth + 1, dtype=torch.float64)
        self.samples = 0

    @torch.no_grad()
    def add(self, x: Tensor, step, zero, qmin: int, qmax: int, channel_axis: int = 1) -> None:
        err = candidate_errors(x, step, zero, qmin, qmax, self.depth, channel_axis)
        if err.shape[1] != self.channels:
            raise ConfigError(f"PTS statistics for {self.channels} channels got an input with {err.shape[1]}")
        best = err.argmin(dim=-1)  # [n, C]
        self.counts += torch.nn.functional.one_hot(best, self.depth + 1).sum(dim=0).cpu()
        self.errors += err.double().sum(dim=0).cpu()
        self.samples += err.shape[0]

    def exponents(self, select: str = "vote", kappa: float = 0.85) -> Tensor:
        """The chosen j per channel (long [C]); D means factor 1."""
        if select not in PTS_SELECTIONS:
            raise ConfigError(f"PTS selection must be one of {', '.join(PTS_SELECTIONS)}, got {select!r}")
        if self.samples == 0:
            return torch.full((self.channels,), self.depth, dtype=torch.long)
        if select == "mse":
            return self.errors.argmin(dim=-1)
        top, mode = self.counts.max(dim=-1)  # first maximum: ties go to the smallest j
        share = top.double() / self.samples
        return torch.where(share >= kappa, mode, torch.full_like(mode, self.depth))

    def multipliers(self, select: str = "vote", kappa: float = 0.85) -> Tensor:
        """m_c = 2^(j_c − D) (float32 [C])."""
        return 2.0 ** (self.exponents(select, kappa).float() - self.depth)


def pts_multipliers(x: Tensor, step, zero, qmin: int, qmax: int, *, depth: int = 3, kappa: float = 0.85,
                    select: str = "vote", channel_axis: int = 1) -> Tensor:
    """The PTS factors of one batch ``x`` (see the module docstring); float32 [C]."""
    stats = PTSStatistics(x.shape[channel_axis], depth)
    stats.add(x, step, zero, qmin, qmax, channel_axis)
    return stats.multipliers(select, kappa)


__all__ = ["PTS_SELECTIONS", "PTSStatistics", "candidate_errors", "pts_multipliers"]
