"""Per-timestep parameter tables (docs/methods.md §1.7).

A quantized model owns one :class:`TimestepIndex`. At every denoiser call it looks up the
timestep passed to the denoiser in the calibrated schedule t_0 … t_{K-1} and publishes the step
index k; quantizers with a table of K entries read row k. There is no call counter: the same t
always selects the same entry, however many extra forwards happen.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DiffquantError

LOOKUP_MODES = ("exact", "nearest")


class TimestepIndex:
    """The calibrated timestep list and the row selected for the current denoiser call."""

    def __init__(self, timesteps: Sequence[int] | None = None, lookup: str = "exact"):
        if lookup not in LOOKUP_MODES:
            raise ConfigError(f"timestep_lookup must be one of {LOOKUP_MODES}, got {lookup!r}")
        self.lookup = lookup
        self.timesteps: list[int] = [int(t) for t in timesteps] if timesteps is not None else []
        self.index: int = 0

    @property
    def num_steps(self) -> int:
        return max(1, len(self.timesteps))

    def set_timesteps(self, timesteps: Sequence[int]) -> None:
        self.timesteps = [int(t) for t in timesteps]
        self.index = 0

    def index_of(self, t: int | Tensor) -> int:
        """Row for timestep ``t``: exact match, or the nearest one in ``nearest`` mode."""
        if not self.timesteps:
            return 0
        if isinstance(t, Tensor):
            flat = t.detach().reshape(-1)
            if flat.numel() == 0:
                raise DiffquantError("the denoiser was called with an empty timestep tensor")
            if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
                raise DiffquantError(f"the denoiser was called with a non-finite timestep ({flat[0].item()}); "
                                     "per-timestep quantization needs a real timestep")
            if flat.numel() > 1 and not bool((flat == flat[0]).all()):
                raise DiffquantError(
                    "per-timestep quantization needs one timestep per denoiser call; "
                    f"got a batch with different timesteps {sorted(set(flat.tolist()))[:5]}"
                )
            t = flat[0].item()
        t_val = float(t)
        if not math.isfinite(t_val):
            raise DiffquantError(f"the denoiser was called with a non-finite timestep ({t_val}); "
                                 "per-timestep quantization needs a real timestep")
        if self.lookup == "exact":
            for k, tk in enumerate(self.timesteps):
                if tk == t_val:
                    return k
            raise DiffquantError(
                f"timestep {t_val:g} is not in the calibrated schedule "
                f"({self.timesteps[0]}..{self.timesteps[-1]}, {len(self.timesteps)} steps); sample "
                "with the calibration schedule or set timestep_lookup='nearest'"
            )
        diffs = [abs(tk - t_val) for tk in self.timesteps]
        return int(min(range(len(diffs)), key=diffs.__getitem__))

    def select(self, t: int | Tensor) -> int:
        self.index = self.index_of(t)
        return self.index

    def select_from_call(self, module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the quantized denoiser: pick the row of this call's timestep.

        Installed on the user's model itself, so the right row is read however the model is
        called: through :class:`QuantModel`, directly, or from inside a diffusers pipeline."""
        if not self.timesteps:
            return None
        t = extract_timestep(args, kwargs)
        if t is None:
            raise DiffquantError("per-timestep quantization needs the timestep argument of the denoiser "
                                 "(timestep=, t= or the second positional argument)")
        self.select(t)
        return None

    def to_dict(self) -> dict:
        return {"timesteps": list(self.timesteps), "lookup": self.lookup}

    @classmethod
    def from_dict(cls, data: dict) -> "TimestepIndex":
        return cls(data.get("timesteps") or None, data.get("lookup", "exact"))


def extract_timestep(args: tuple, kwargs: dict):
    """The timestep argument of a denoiser call: ``timestep=``/``t=`` or the 2nd positional."""
    for key in ("timestep", "timesteps", "t"):
        if key in kwargs:
            return kwargs[key]
    if len(args) > 1:
        return args[1]
    return None


def install_timestep_hook(model: nn.Module, index: TimestepIndex) -> None:
    """Make ``model`` select ``index``'s row from its own timestep argument on every call."""
    remove_timestep_hooks(model)
    model.register_forward_pre_hook(index.select_from_call, with_kwargs=True)


def remove_timestep_hooks(model: nn.Module) -> None:
    """Remove the hooks :func:`install_timestep_hook` put on ``model`` (e.g. on an export copy)."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if isinstance(getattr(hook, "__self__", None), TimestepIndex):
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)


def as_timestep_tensor(t, device=None) -> Tensor:
    return t if isinstance(t, Tensor) else torch.tensor(t, device=device)
