"""DMQ's adaptive timestep weighting of a per-sample reconstruction loss (docs/methods.md §5.2).

Each calibration sample belongs to a bucket k — the index of its timestep in the calibration
schedule, looked up from t for any number of steps (not the official 20-step formula). Per
iteration, with per-sample losses ℓ_i = Σ_channel (ŷ − y)² averaged over the other axes:

- ``focal`` (the paper and code): without gradient Λ ← μΛ + (1 − μ)·scatter_add(ℓ, k) — the
  *sum* of the batch's losses per bucket, every bucket decayed; Λ starts at 0 and is updated
  before it is used — then w_i = (1 − Λ[k_i] / ΣΛ)^α. Buckets that keep a large share of the
  loss get small weights, so the small early-step errors that accumulate along sampling are not
  drowned out;
- ``linear`` / ``quadratic``: fixed early-first weights w_k = 1 + α·(1 − k/K) resp.
  1 + α·(1 − k/K)² (k = 0 the noisiest step; the paper's ablation; the code's unreachable
  ``linear`` variant 1 + (1 − k/20)·α is the K = 20 case of the first);
- ``uniform``: w = 1 (as α = 0).

The loss is mean_i(w_i·ℓ_i).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .loss import channel_axis_of

TIME_WEIGHTS = ("focal", "linear", "quadratic", "uniform")


def per_sample_loss(pred: Tensor, target: Tensor, p: float = 2.0) -> Tensor:
    """ℓ_i = Σ over the channel axis of |ŷ − y|^p, averaged over the other non-batch axes; [B]."""
    if pred.shape != target.shape:
        raise ConfigError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    err = (pred.float() - target.float()).abs().pow(p).sum(dim=channel_axis_of(pred))
    return err.reshape(err.shape[0], -1).mean(dim=1)


class TimestepWeighting:
    """Per-sample weights of one LES layer's loss; holds the running Λ of the ``focal`` mode.

    Args:
        num_buckets: K, the number of calibration timesteps.
        mode: focal | linear | quadratic | uniform.
        alpha: the exponent (focal) or slope (linear/quadratic); 0 makes every mode uniform.
        momentum: μ of the Λ moving average (0.95).
    """

    def __init__(self, num_buckets: int, mode: str = "focal", alpha: float = 20.0, momentum: float = 0.95):
        if mode not in TIME_WEIGHTS:
            raise ConfigError(f"time_weight must be one of {', '.join(TIME_WEIGHTS)}, got {mode!r}")
        if num_buckets < 1:
            raise ConfigError(f"timestep weighting needs at least one bucket, got {num_buckets}")
        if alpha < 0:
            raise ConfigError(f"alpha must be >= 0, got {alpha}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"momentum must be in [0, 1), got {momentum}")
        self.num_buckets = int(num_buckets)
        self.mode = mode
        self.alpha = float(alpha)
        self.momentum = float(momentum)
        #: Λ per bucket (focal); float64 so long runs do not drift
        self.running = torch.zeros(self.num_buckets, dtype=torch.float64)

    def _check(self, buckets: Tensor) -> Tensor:
        buckets = buckets.reshape(-1).long()
        if buckets.numel() and (int(buckets.min()) < 0 or int(buckets.max()) >= self.num_buckets):
            raise ConfigError(f"timestep buckets must lie in 0..{self.num_buckets - 1}")
        return buckets

    @torch.no_grad()
    def update(self, losses: Tensor, buckets: Tensor) -> None:
        """Λ ← μΛ + (1 − μ)·scatter_add(ℓ, k) (focal only)."""
        if self.mode != "focal":
            return
        buckets = self._check(buckets).cpu()
        sums = torch.zeros(self.num_buckets, dtype=torch.float64)
        sums.scatter_add_(0, buckets, losses.detach().reshape(-1).double().cpu())
        self.running.mul_(self.momentum).add_(sums, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def weights(self, buckets: Tensor) -> Tensor:
        """w_i for samples of ``buckets`` (float32, on the buckets' device)."""
        device = buckets.device
        buckets = self._check(buckets).cpu()
        if self.mode == "uniform" or self.alpha == 0:
            return torch.ones(buckets.numel(), device=device)
        if self.mode == "focal":
            total = float(self.running.sum())
            if total <= 0:  # nothing accumulated yet (all-zero losses): no preference
                return torch.ones(buckets.numel(), device=device)
            w = (1.0 - self.running[buckets] / total).clamp_min(0.0).pow(self.alpha)
        else:
            early = 1.0 - buckets.double() / self.num_buckets
            w = 1.0 + self.alpha * (early if self.mode == "linear" else early * early)
        return w.float().to(device)

    def __call__(self, losses: Tensor, buckets: Tensor) -> Tensor:
        """mean_i(w_i·ℓ_i), updating Λ first (gradients flow through ℓ only)."""
        self.update(losses, buckets)
        return (self.weights(buckets.to(losses.device)) * losses).mean()


def calibration_schedule(ts: Tensor, steps: Tensor | None = None) -> list[int]:
    """The calibration timesteps t_0 … t_{K−1}, ordered by step index (k = 0 the noisiest).

    ``steps`` (the cache step of each entry, :attr:`CalibrationSet.steps`) orders them; without it
    they are ordered by decreasing t, which is the sampling order of every diffusers scheduler.
    """
    ts = ts.reshape(-1).long().cpu()
    if steps is None:
        return sorted({int(t) for t in ts.tolist()}, reverse=True)
    first: dict[int, int] = {}
    for k, t in zip(steps.reshape(-1).tolist(), ts.tolist()):
        first.setdefault(int(k), int(t))
    schedule = [first[k] for k in sorted(first)]
    if len(set(schedule)) != len(schedule):
        raise ConfigError("two calibration steps share a timestep; per-step buckets need distinct timesteps")
    return schedule


def timestep_buckets(ts: Tensor, schedule: list[int]) -> Tensor:
    """The bucket (index in ``schedule``) of every timestep in ``ts`` (exact lookup; any K)."""
    position = {int(t): k for k, t in enumerate(schedule)}
    flat = ts.reshape(-1).long().cpu().tolist()
    missing = sorted({t for t in flat if t not in position})
    if missing:
        raise ConfigError(f"timesteps {missing[:5]} are not in the calibration schedule")
    return torch.tensor([position[t] for t in flat], dtype=torch.long)


__all__ = ["TIME_WEIGHTS", "TimestepWeighting", "calibration_schedule", "per_sample_loss", "timestep_buckets"]
