"""Calibration-set selection policies over a :class:`~diffquant.calib.cache.TrajectoryCache`.

Each policy picks (step k, sample i) pairs and materialises them as a :class:`CalibrationSet`
of x_t, t_k and class labels. Step k = 0 is the first (noisiest) sampling step.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
from torch import Tensor

from diffquant.calib.cache import X_KEY, TrajectoryCache
from diffquant.errors import ConfigError, DiffquantError

PICKS = ("first", "random")


def check_finite_inputs(x: Tensor, where: str, describe_row=lambda i: f"entry {i}") -> None:
    """Refuse NaN/Inf in calibration inputs: they would silently make quantizer ranges non-finite."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.flatten(1).any(1).nonzero().flatten()
        raise DiffquantError(f"{where} holds {int(bad.sum())} non-finite values (NaN/Inf) in {len(rows)} of "
                             f"{x.shape[0]} inputs, first in {describe_row(int(rows[0]))}; "
                             "calibration data must be finite")


@dataclass
class CalibrationSet:
    """M calibration inputs: ``xs`` [M, C, H, W], ``ts`` [M], ``labels`` [M] or None — or, for calls
    recorded from a pipeline, a :class:`~diffquant.calib.conditioning.Conditioning` with every other
    argument of the denoiser (text embeddings, ...), indexed like labels.

    ``steps`` and ``sample_ids`` record where each entry came from in the cache.
    """

    xs: Tensor
    ts: Tensor
    labels: Tensor | None
    steps: Tensor
    sample_ids: Tensor
    null_class: int | None = None

    def __post_init__(self) -> None:
        if self.xs.is_floating_point():
            check_finite_inputs(self.xs, "the calibration set",
                                lambda i: f"entry {i} (step {int(self.steps[i])}, sample {int(self.sample_ids[i])})")
        bad = getattr(self.labels, "non_finite", lambda: None)()  # recorded conditioning
        if bad is not None:
            raise DiffquantError(f"the calibration set's conditioning {bad[0]!r} holds {bad[1]} non-finite values "
                                 "(NaN/Inf); calibration data must be finite")

    def __len__(self) -> int:
        return self.xs.shape[0]

    def __getitem__(self, index: int | slice | Sequence[int] | Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(x, t, labels) at ``index``: an int, a slice, or a sequence/tensor of indices."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        elif not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        labels = None if self.labels is None else self.labels[index]
        return self.xs[index], self.ts[index], labels

    def subset(self, index: slice | Sequence[int] | Tensor) -> "CalibrationSet":
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        return CalibrationSet(
            self.xs[index], self.ts[index], None if self.labels is None else self.labels[index],
            self.steps[index], self.sample_ids[index], self.null_class,
        )

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                device: str | torch.device | None = None, dtype: torch.dtype | None = torch.float32,
                ) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """Yield (x, t, labels) batches, in order or in a seeded random order."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        order = (torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
                 if shuffle else torch.arange(len(self)))
        for start in range(0, len(self), batch_size):
            x, t, c = self[order[start:start + batch_size]]
            x = x.to(device=device, dtype=dtype) if dtype is not None else x.to(device)
            yield x, t.to(device), None if c is None else c.to(device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        return self.batches(32)

    def with_uncond(self) -> "CalibrationSet":
        """Each (x_t, t) once with its class label and once with the null class (CFG models)."""
        if self.labels is None or self.null_class is None:
            return self
        null = torch.full_like(self.labels, int(self.null_class))
        return CalibrationSet(
            torch.cat([self.xs, self.xs]), torch.cat([self.ts, self.ts]), torch.cat([self.labels, null]),
            torch.cat([self.steps, self.steps]), torch.cat([self.sample_ids, self.sample_ids]),
            self.null_class,
        )

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "CalibrationSet":
        return replace(
            self, xs=self.xs.to(device=device, dtype=dtype), ts=self.ts.to(device),
            labels=None if self.labels is None else self.labels.to(device),
        )


def from_pairs(cache: TrajectoryCache, steps: Sequence[int] | Tensor, samples: Sequence[int] | Tensor) -> CalibrationSet:
    """The calibration set of the given (step, sample) pairs, in that order."""
    steps = torch.as_tensor(steps, dtype=torch.long).reshape(-1)
    samples = torch.as_tensor(samples, dtype=torch.long).reshape(-1)
    xs = cache.read(X_KEY, steps, samples)
    labels = None if cache.labels is None else cache.labels[samples]
    return CalibrationSet(xs, cache.timesteps[steps], labels, steps, samples, cache.null_class)


def _check_count(name: str, value: int, limit: int, what: str) -> None:
    if not 1 <= value <= limit:
        raise ConfigError(f"{name}={value} must be between 1 and the cache's {limit} {what}")


def uniform(cache: TrajectoryCache, n_per_step: int, n_steps: int, *, pick: str = "first",
            seed: int = 0) -> CalibrationSet:
    """Q-Diffusion: steps 0, i, 2i, … (i = K // n_steps), ``n_per_step`` samples each.

    ``pick="first"`` keeps samples 0 … n_per_step−1 at each step (the official code);
    ``pick="random"`` draws a fresh seeded subset per step.
    """
    _check_count("n_steps", n_steps, cache.num_steps, "steps")
    _check_count("n_per_step", n_per_step, cache.num_samples, "samples")
    if pick not in PICKS:
        raise ConfigError(f"unknown pick {pick!r}: choose one of {', '.join(PICKS)}")
    interval = cache.num_steps // n_steps
    chosen = [j * interval for j in range(n_steps)]
    gen = torch.Generator().manual_seed(seed)
    steps, samples = [], []
    for k in chosen:
        if pick == "first":
            ids = torch.arange(n_per_step)
        else:
            ids = torch.randperm(cache.num_samples, generator=gen)[:n_per_step].sort().values
        steps.append(torch.full((n_per_step,), k, dtype=torch.long))
        samples.append(ids)
    return from_pairs(cache, torch.cat(steps), torch.cat(samples))


def last_step(cache: TrajectoryCache, n: int) -> CalibrationSet:
    """The first ``n`` samples at the last step K−1 (the least noisy input)."""
    _check_count("n", n, cache.num_samples, "samples")
    return from_pairs(cache, torch.full((n,), cache.num_steps - 1), torch.arange(n))


def random(cache: TrajectoryCache, n: int, seed: int = 0) -> CalibrationSet:
    """``n`` distinct (step, sample) pairs drawn uniformly at random, seeded."""
    total = cache.num_steps * cache.num_samples
    _check_count("n", n, total, "(step, sample) pairs")
    flat = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
    return from_pairs(cache, flat // cache.num_samples, flat % cache.num_samples)


def all_steps(cache: TrajectoryCache, n_per_step: int | None = None) -> CalibrationSet:
    """Every step with its first ``n_per_step`` samples (all samples by default), step-major."""
    n_per_step = cache.num_samples if n_per_step is None else n_per_step
    _check_count("n_per_step", n_per_step, cache.num_samples, "samples")
    steps = torch.arange(cache.num_steps).repeat_interleave(n_per_step)
    samples = torch.arange(n_per_step).repeat(cache.num_steps)
    return from_pairs(cache, steps, samples)


POLICIES = {"uniform": uniform, "last_step": last_step, "random": random, "all_steps": all_steps}
