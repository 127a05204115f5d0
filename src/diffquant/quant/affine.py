"""Uniform affine fake quantization (docs/methods.md §1.1).

Q(x; s, z, b) = s · (clamp(⌊x/s⌉ + z, q_min, q_max) − z)

Rounding uses the straight-through estimator and the clamp passes no gradient to clipped
elements, so a learnable step ``s`` receives the LSQ gradient (⌊x/s⌉ − x/s inside the grid,
q_bound − z at clipped elements) and a real-valued learnable zero point receives 0 inside the
grid and −s at clipped elements — all from autograd, with no hand-written backward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError

GRIDS = ("asymmetric", "symmetric", "unsigned")
#: Bit-widths that mean "not quantized" (kept in floating point).
FLOAT_BITS = (16, 32)
MIN_STEP = 1e-8


def validate_bits(bits: int, what: str = "bits") -> int:
    """Accept 1–8 (quantized) or 16/32 (floating point); anything else is a ConfigError."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ConfigError(f"{what} must be an integer, got {bits!r}")
    if not (1 <= bits <= 8 or bits in FLOAT_BITS):
        raise ConfigError(f"{what}={bits} is not supported: use 1-8, or 16/32 for full precision")
    return bits


def validate_grid(grid: str) -> str:
    if grid not in GRIDS:
        raise ConfigError(f"unknown quantization grid {grid!r}; choose one of {', '.join(GRIDS)}")
    return grid


@dataclass(frozen=True)
class GridSpec:
    """The integer range of a grid: q_min, q_max, and whether the zero point is fixed at 0."""

    bits: int
    grid: str

    def __post_init__(self) -> None:
        validate_bits(self.bits)
        validate_grid(self.grid)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.grid == "symmetric" else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.grid == "symmetric" else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def zero_fixed(self) -> bool:
        return self.grid in ("symmetric", "unsigned")


def round_ste(x: Tensor) -> Tensor:
    """Round half to even in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def floor_ste(x: Tensor) -> Tensor:
    return x + (torch.floor(x) - x).detach()


def fake_quantize(x: Tensor, step: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """s · (clamp(⌊x/s⌉ + z, q_min, q_max) − z) with STE rounding (see module docstring)."""
    q = torch.clamp(round_ste(x / step) + zero_point, qmin, qmax)
    return (q - zero_point) * step


def quantize_to_int(x: Tensor, step: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """The integer codes clamp(⌊x/s⌉ + z) (no gradient), e.g. for packing."""
    return torch.clamp(torch.round(x / step) + torch.round(zero_point), qmin, qmax)


def qparams_from_range(
    lo: Tensor,
    hi: Tensor,
    spec: GridSpec,
    *,
    include_zero: bool = True,
    clamp_zero_point: bool = True,
) -> tuple[Tensor, Tensor]:
    """Step and zero point for the range [lo, hi] on the given grid (table in docs/methods.md §1.1).

    ``include_zero`` widens the range to contain 0 first (the ``minmax`` default);
    ``clamp_zero_point=False`` keeps DMQ's unclamped integer zero point.
    """
    lo = lo.float()
    hi = hi.float()
    if include_zero:
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
    if spec.grid == "symmetric":
        step = torch.maximum(lo.abs(), hi.abs()) / (2 ** (spec.bits - 1) - 1) if spec.bits > 1 else torch.maximum(lo.abs(), hi.abs())
        zero = torch.zeros_like(step)
    elif spec.grid == "unsigned":
        step = hi / spec.levels
        zero = torch.zeros_like(step)
    else:
        step = (hi - lo) / spec.levels
        step = step.clamp_min(MIN_STEP)
        zero = torch.round(-lo / step)
        if clamp_zero_point:
            zero = zero.clamp(spec.qmin, spec.qmax)
    step = step.clamp_min(MIN_STEP)
    return step, zero


def reduce_dims(x: Tensor, channel_axis: int | None) -> tuple[int, ...]:
    """Dimensions to reduce over for per-tensor (None) or per-channel statistics."""
    if channel_axis is None:
        return tuple(range(x.dim()))
    axis = channel_axis % x.dim()
    return tuple(d for d in range(x.dim()) if d != axis)


def broadcast_shape(x_dim: int, channel_axis: int | None, channels: int) -> tuple[int, ...]:
    """Shape that makes a per-channel vector broadcast against a tensor of ``x_dim`` dims."""
    if channel_axis is None:
        return ()
    shape = [1] * x_dim
    shape[channel_axis % x_dim] = channels
    return tuple(shape)
