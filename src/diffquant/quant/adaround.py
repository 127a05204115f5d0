"""AdaRound: learned up/down rounding of weights (docs/methods.md §1.3, arXiv 2004.10568).

W̃ = s·(clamp(⌊W/s⌋ + h + z, q_min, q_max) − z) with the quantizer's (per-channel) step s and zero
point z, which stay fixed; only V is trained. Soft mode uses the rectified sigmoid
h(V) = clamp(σ(V)(ζ−γ)+γ, 0, 1); after :meth:`AdaRound.harden` the stored bits h ∈ {0, 1} are used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError

ZETA = 1.1
GAMMA = -0.1
ROUNDING_MODES = ("soft", "hard")


def rectified_sigmoid(v: Tensor) -> Tensor:
    """h(V) = clamp(σ(V)(ζ−γ)+γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


class AdaRound(nn.Module):
    """Rounding state of one weight tensor: V (trained) and the hard rounding bits.

    The mode is kept in the ``hardened`` buffer, so it is saved and restored with the state
    dict (a loaded checkpoint is in hard mode without re-running :meth:`harden`).
    """

    def __init__(self, shape: tuple[int, ...] | torch.Size, device=None, dtype=torch.float32):
        super().__init__()
        self.V = nn.Parameter(torch.zeros(tuple(shape), device=device, dtype=dtype))
        bits = torch.zeros(tuple(shape), device=device, dtype=torch.bool)
        self.register_buffer("hard_rounding", bits)
        self.register_buffer("hardened", torch.zeros((), device=device, dtype=torch.bool))

    @property
    def mode(self) -> str:
        return "hard" if bool(self.hardened) else "soft"

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ROUNDING_MODES:
            raise ConfigError(f"AdaRound mode must be one of {ROUNDING_MODES}, got {value!r}")
        self.hardened.fill_(value == "hard")

    @staticmethod
    def _step_zero(weight: Tensor, quantizer) -> tuple[Tensor, Tensor]:
        s, z = quantizer.params(weight.dim())
        return s.to(weight.dtype), z.to(weight.dtype)

    @torch.no_grad()
    def init_from(self, weight: Tensor, quantizer) -> None:
        """V₀ = −log((ζ−γ)/(f−γ) − 1) with f = W/s − ⌊W/s⌋, so that h(V₀) = f; soft mode."""
        if tuple(weight.shape) != tuple(self.V.shape):
            raise ConfigError(
                f"AdaRound built for shape {tuple(self.V.shape)}, got weight {tuple(weight.shape)}"
            )
        s, _ = self._step_zero(weight, quantizer)
        scaled = weight.detach() / s
        frac = scaled - torch.floor(scaled)
        self.V.copy_(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1))
        self.hard_rounding.zero_()
        self.mode = "soft"

    def soft_targets(self) -> Tensor:
        """h(V), the soft rounding offsets in [0, 1]."""
        return rectified_sigmoid(self.V)

    def rounding(self) -> Tensor:
        """The offset added to ⌊W/s⌋: h(V) in soft mode, the stored bits in hard mode."""
        if self.mode == "hard":
            return self.hard_rounding.to(self.V.dtype)
        return self.soft_targets()

    def forward(self, weight: Tensor, quantizer) -> Tensor:
        """s·(clamp(⌊W/s⌋ + h + z, q_min, q_max) − z)."""
        s, z = self._step_zero(weight, quantizer)
        spec = quantizer.spec
        w_floor = torch.floor(weight / s)
        q = torch.clamp(w_floor + self.rounding().to(weight.dtype) + z, spec.qmin, spec.qmax)
        return (q - z) * s

    @torch.no_grad()
    def harden(self) -> None:
        """Fix the rounding to h = 1[V ≥ 0] and switch to hard mode."""
        self.hard_rounding.copy_(self.V >= 0)
        self.mode = "hard"

    def regularizer(self, beta: float) -> Tensor:
        """R = Σ(1 − |2h(V) − 1|^β), which pushes every h(V) to 0 or 1."""
        return (1 - (2 * self.soft_targets() - 1).abs().pow(beta)).sum()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.V.shape)}, mode={self.mode}"


@dataclass(frozen=True)
class BetaSchedule:
    """Annealing of the regulariser exponent β over ``iters`` iterations.

    ``schedule(i)`` returns (active, β): inactive (regulariser weight 0) while i < warmup·iters,
    then β_i = end + (start − end)·max(0, 1 − (i − warmup·iters)/(iters − warmup·iters)).
    ``i`` is the iteration counter; Q-Diffusion's loss counts from 1 (i = iteration index + 1).
    """

    iters: int
    warmup: float = 0.2
    start: float = 20.0
    end: float = 2.0

    def __post_init__(self) -> None:
        if self.iters < 1:
            raise ConfigError(f"AdaRound needs at least one iteration, got iters={self.iters}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"AdaRound warmup must be in [0, 1), got {self.warmup}")

    def __call__(self, i: int) -> tuple[bool, float]:
        start_decay = self.warmup * self.iters
        if i < start_decay:
            return False, float(self.start)
        rel = (i - start_decay) / (self.iters - start_decay)
        return True, float(self.end + (self.start - self.end) * max(0.0, 1.0 - rel))
