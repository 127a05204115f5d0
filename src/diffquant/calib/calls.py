"""How a calibration set is fed to the denoiser: :data:`DenoiserCall`, :func:`default_call` and
:class:`CalibrationCalls` (a :class:`~diffquant.calib.select.CalibrationSet` plus its call).

They live with the calibration data rather than with the reconstruction caches that consume them
(:mod:`diffquant.recon.cache` re-exports them), so that calibration capture never imports the
reconstruction layer above it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .select import CalibrationSet

#: ``call(model, x, t, labels)`` runs the denoiser on one batch (e.g. ``bundle.predict_noise``).
DenoiserCall = Callable[[nn.Module, Tensor, Tensor, "Tensor | None"], Any]


def default_call(model: nn.Module, x: Tensor, t: Tensor, labels: Tensor | None) -> Any:
    """``model(x, t)``, plus ``class_labels=labels`` when there are labels (diffusers UNets)."""
    return model(x, t) if labels is None else model(x, t, class_labels=labels)


@dataclass
class CalibrationCalls:
    """A calibration set plus the way to feed it to the denoiser.

    ``run(model, index)`` calls the denoiser on the samples at ``index`` (a slice). CFG models
    should get a set that already holds each (x_t, t) with its label and with the null label
    (:meth:`CalibrationSet.with_uncond`).
    """

    calib_set: CalibrationSet
    call: DenoiserCall | None = None
    device: str | torch.device = "cpu"

    def __len__(self) -> int:
        return len(self.calib_set)

    @property
    def timesteps(self) -> Tensor:
        return self.calib_set.ts

    @torch.no_grad()
    def run(self, model: nn.Module, index: slice | Tensor) -> Any:
        x, t, labels = self.calib_set[index]
        x = x.to(device=self.device, dtype=torch.float32)
        t = t.to(self.device)
        labels = None if labels is None else labels.to(self.device)
        return (self.call or default_call)(model, x, t, labels)

    def slices(self, batch_size: int, one_timestep: bool = False) -> Iterator[slice]:
        """Consecutive slices of at most ``batch_size`` samples; with ``one_timestep`` a slice never
        mixes timesteps (per-timestep quantizer tables need one t per denoiser call)."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        n = len(self)
        if not one_timestep:
            yield from (slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size))
            return
        ts = self.timesteps.reshape(-1)
        start = 0
        while start < n:
            stop = start + 1
            while stop < n and stop - start < batch_size and int(ts[stop]) == int(ts[start]):
                stop += 1
            yield slice(start, stop)
            start = stop

    def subset(self, index: Tensor | slice) -> "CalibrationCalls":
        return CalibrationCalls(self.calib_set.subset(index), self.call, self.device)
