"""A denoiser plus what a sampler, a calibration capture and a fine-tuning loop need to drive it.

:class:`DiffusionBundle` carries the denoiser and the facts of its model card that the layers
above use: the scheduler config (a diffusers config dict), the sample shape, the
class-conditioning convention, the way the denoiser is called, the recommended guidance, the
data set it was trained on (FID reference) and a classifier of that data (class accuracy).
:meth:`DiffusionBundle.predict_noise` takes the denoiser as an argument, so a quantized wrapper
with the same call signature can be swapped in (:meth:`DiffusionBundle.with_unet`).

Bundles are built by :mod:`diffquant.zoo` (named models, local diffusers folders) or by the user;
this module knows nothing of where weights come from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_CONTEXT_TOKENS = 77

# How the denoiser is called (see DiffusionBundle.predict_noise).
CALL_POSITIONAL = "positional"  # unet(x, t) -> Tensor
CALL_DIFFUSERS = "diffusers"  # unet(x, t, class_labels=...) -> output with .sample
CALL_DIFFUSERS_CONDITION = "diffusers_condition"  # + encoder_hidden_states=...
CALL_CONVENTIONS = (CALL_POSITIONAL, CALL_DIFFUSERS, CALL_DIFFUSERS_CONDITION)


def linear_ddpm_config(clip_sample: bool = True) -> dict[str, Any]:
    """DDPMScheduler config of the classic DDPM: linear β 1e-4 → 0.02, T = 1000, ε-prediction."""
    return {
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "variance_type": "fixed_small",
        "clip_sample": clip_sample,
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }


def denoiser_output_tensor(out: Any) -> Tensor:
    """The ε tensor from a denoiser's return value (Tensor, diffusers output, or tuple)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(getattr(out, "sample", None), Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot read a noise prediction from a {type(out).__name__}")


@dataclass
class DiffusionBundle:
    """A denoiser plus what a sampler needs to know about it."""

    name: str
    unet: nn.Module
    scheduler_config: dict[str, Any]
    sample_shape: tuple[int, int, int]
    num_classes: int | None = None
    null_class: int | None = None
    call_convention: str = CALL_POSITIONAL
    context_shape: tuple[int, int] | None = None  # (tokens, dim) of encoder_hidden_states
    source: str | None = None  # where the weights came from
    #: the real data set the model was trained on (the FID reference), e.g. "mnist"
    reference_dataset: str | None = None
    #: folder of a classifier of that data set (class accuracy of samples), None when there is none
    classifier_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.call_convention not in CALL_CONVENTIONS:
            raise ValueError(f"unknown call convention {self.call_convention!r}")
        self.sample_shape = tuple(int(s) for s in self.sample_shape)  # type: ignore[assignment]

    @property
    def is_conditional(self) -> bool:
        return self.num_classes is not None

    @property
    def default_guidance(self) -> float:
        """The model card's recommended guidance scale, else 1.5 for class-conditional models (1 otherwise)."""
        if not self.is_conditional:
            return 1.0
        return float(self.extra.get("guidance", 1.5))

    def with_unet(self, new_unet: nn.Module) -> "DiffusionBundle":
        """The same bundle driving another denoiser (e.g. a quantized wrapper)."""
        return dataclasses.replace(self, unet=new_unet)

    def _call_kwargs(self, batch: int, class_labels: Tensor | None, context: Tensor | None,
                     device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.call_convention == CALL_POSITIONAL:
            return kwargs
        if self.is_conditional:
            if class_labels is None:  # unconditional call of a class-conditional model
                class_labels = torch.full((batch,), int(self.null_class), dtype=torch.long)
            kwargs["class_labels"] = class_labels.to(device=device, dtype=torch.long)
        if self.call_convention == CALL_DIFFUSERS_CONDITION:
            if context is None:
                tokens, dim = self.context_shape or (DEFAULT_CONTEXT_TOKENS, 1)
                context = torch.zeros(batch, tokens, dim, device=device, dtype=dtype)
            kwargs["encoder_hidden_states"] = context
        return kwargs

    def call_inputs(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None,
                    context: Tensor | None = None) -> tuple[tuple, dict[str, Any]]:
        """(args, kwargs) of the denoiser call on (x_t, t) with this model's convention."""
        return (x, t), self._call_kwargs(x.shape[0], class_labels, context, x.device, x.dtype)

    def predict_noise(self, unet: nn.Module, x: Tensor, t: Tensor, class_labels: Tensor | None = None,
                      context: Tensor | None = None) -> Tensor:
        """Call ``unet`` on (x_t, t[B]) with this model's convention and return ε (x's shape).

        ``class_labels`` are ignored by unconditional models; a class-conditional model called
        without labels gets the null class. ``context`` defaults to zeros for cross-attention UNets.
        """
        args, kwargs = self.call_inputs(x, t, class_labels, context)
        return denoiser_output_tensor(unet(*args, **kwargs))

    def example_inputs(self, batch: int = 2, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32) -> tuple[tuple, dict[str, Any]]:
        """A valid ``unet(*args, **kwargs)`` call: random x, a shared mid-range t, labels 0, 1, …"""
        device = torch.device(device)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *self.sample_shape, generator=gen).to(device=device, dtype=dtype)
        t = torch.full((batch,), self.num_train_timesteps // 2, dtype=torch.long, device=device)
        labels = None
        if self.is_conditional:
            labels = torch.arange(batch, dtype=torch.long) % int(self.num_classes)
        return (x, t), self._call_kwargs(batch, labels, None, device, dtype)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))


__all__ = ["CALL_CONVENTIONS", "CALL_DIFFUSERS", "CALL_DIFFUSERS_CONDITION", "CALL_POSITIONAL",
           "DEFAULT_CONTEXT_TOKENS", "NUM_TRAIN_TIMESTEPS", "DiffusionBundle", "denoiser_output_tensor",
           "linear_ddpm_config"]
