"""Bring a recipe's result into the form integer formats express, before any export.

Recipes leave extensions that training needs and deployment does not: DMQ's learned τ (folded
into the activation quantizer and the stored weight, :mod:`.fold`), EfficientDM / MPQ-DM's
low-rank update ΔW (merged into the weight: the quantizers see the very tensor W + ΔW they saw
before, so nothing changes), soft AdaRound rounding (hardened), and learned real-valued zero
points (weights, and TALSQ-style activation ones), which have no integer code and are rounded —
the only step here that changes the model's output, by an amount :class:`ExportPreparation`
reports (measured on the example inputs when given).

:func:`~diffquant.export.onnx_export.export_onnx` and :func:`~.int8_backend.to_int8` run this
first, on a copy; the caller's model is left alone. The packed format (:mod:`.pack`) does not
run it yet: its files load onto the original float weights, which folding and merging change; it
refuses an unfolded τ and real-valued zero points with a clear message.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import ConfigError
from ..model.qmodel import QuantModel
from ..bundle import denoiser_output_tensor
from .fold import fold_input_scales


@dataclass
class ExportPreparation:
    """What :func:`prepare_for_export` changed."""

    merged_lora: list[str] = field(default_factory=list)
    folded_tau: list[str] = field(default_factory=list)
    hardened_adaround: list[str] = field(default_factory=list)
    #: quantizer name → the largest |z − round(z)| (in codes) of its rounded zero points
    rounded_zero_points: dict[str, float] = field(default_factory=dict)
    #: relative RMS change of the output on the example inputs (None: not measured)
    output_change: float | None = None

    @property
    def changed_outputs(self) -> bool:
        """Whether a step could change the outputs (only rounding zero points does)."""
        return bool(self.rounded_zero_points)

    def summary(self) -> str:
        parts = []
        if self.merged_lora:
            parts.append(f"merged the low-rank update of {len(self.merged_lora)} layers")
        if self.folded_tau:
            parts.append(f"folded τ of {len(self.folded_tau)} layers")
        if self.hardened_adaround:
            parts.append(f"hardened AdaRound in {len(self.hardened_adaround)} layers")
        if self.rounded_zero_points:
            worst = max(self.rounded_zero_points.values())
            parts.append(f"rounded the real-valued zero points of {len(self.rounded_zero_points)} quantizers "
                         f"(by up to {worst:.3g} codes)")
        if self.output_change is not None and self.changed_outputs:
            parts.append(f"output change {self.output_change:.3g} relative RMS on the example inputs")
        return "; ".join(parts) if parts else "nothing to change"

    def to_dict(self) -> dict:
        return {"merged_lora": self.merged_lora, "folded_tau": self.folded_tau,
                "hardened_adaround": self.hardened_adaround, "rounded_zero_points": self.rounded_zero_points,
                "output_change": self.output_change}


def call_denoiser(model, inputs) -> Tensor:
    """The denoiser output tensor of ``model`` on ``inputs`` = (args, kwargs), in float64."""
    args, kwargs = inputs
    return denoiser_output_tensor(model(*args, **kwargs)).detach().double()


def relative_rms(after: Tensor, before: Tensor) -> float:
    """‖after − before‖ / ‖before‖ (root mean squares): how much an export step changed an output."""
    return float((after - before).pow(2).mean().sqrt() / before.pow(2).mean().sqrt().clamp_min(1e-30))


@torch.no_grad()
def prepare_for_export(qmodel: QuantModel, example_inputs=None) -> tuple[QuantModel, ExportPreparation]:
    """A copy of ``qmodel`` with LoRA merged, AdaRound hardened, zero points rounded and τ folded.

    ``example_inputs`` = (args, kwargs) of one denoiser call: when given and a zero point was
    rounded, the change of the output is measured. Returns the copy and what was done.
    """
    if not isinstance(qmodel, QuantModel):
        raise ConfigError(f"prepare_for_export() needs a QuantModel, got {type(qmodel).__name__}")
    report = ExportPreparation()
    model = copy.deepcopy(qmodel)
    for q in model.quantizers().values():  # keep one shared timestep index in the copy
        q.timestep_index = model.timestep_index
    for name, layer in model.layers().items():
        if layer.weight_delta is not None:
            layer.weight.data.copy_(layer.weight + layer.weight_delta())
            layer.weight_delta = None
            report.merged_lora.append(name)
        if layer.adaround is not None and any(r.mode != "hard" for r in layer.adaround):
            for r in layer.adaround:
                if r.mode != "hard":
                    r.harden()
            report.hardened_adaround.append(name)
        if layer.input_scale is not None:
            report.folded_tau.append(name)
    for qname, q in model.quantizers().items():
        z = getattr(q, "zero_point", None)
        if not isinstance(z, Tensor) or z.numel() == 0:
            continue
        gap = (z - torch.round(z)).abs().max()
        if float(gap) > 0:
            z.data.copy_(torch.round(z))
            report.rounded_zero_points[qname] = float(gap)
    for layer in model.layers().values():
        layer.clear_cache()
    if report.folded_tau:
        model = fold_input_scales(model)
    if report.changed_outputs and example_inputs is not None:
        report.output_change = relative_rms(call_denoiser(model, example_inputs), call_denoiser(qmodel, example_inputs))
    return model, report


__all__ = ["ExportPreparation", "prepare_for_export"]
