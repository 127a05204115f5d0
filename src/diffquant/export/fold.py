"""Folding learned input-channel scales τ (DMQ's LES) into the deployment form (docs/methods.md §5.1).

A layer with τ computes Q(x/τ)·Q(W·τ). Folded, the stored float weight *is* W·τ (so the weight
quantizers, AdaRound rounding included, see exactly the same tensor and give bit-identical
quantized weights) and the division by τ moves into the activation quantizer: a
:class:`~diffquant.quant.variants.PTSQuantizer` with ``input_divisor`` = τ computes codes
clamp(⌊x/(s·m·τ)⌉ + z) and outputs s·m·(q − z) = Q(x/τ), keeping any PTS multipliers m. Split
layers give each input part its slice of τ. Outputs equal the unfolded model's up to float
rounding of x/(s·m·τ) versus (x/τ)/(s·m).

The folded model's float weights differ from the original model's, so its checkpoint
(:func:`diffquant.save`) must be loaded onto a float model holding them:
``float_model.load_state_dict(folded_float_state(folded))`` first, then :func:`diffquant.load`.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..model.qmodel import QuantModel
from ..quant.variants import PTSQuantizer, replace_module
from .codes import ExportError


def _check_foldable(name: str, layer) -> None:
    if layer.weight_delta is not None:
        raise ExportError(f"{name}: merge its low-rank update into the weight before folding τ")
    if not layer.use_act_quant or not all(q.active for q in layer.act_quantizers):
        raise ExportError(
            f"{name}: τ can only be folded into a quantized input (its input stays in floating point, "
            "so x/τ has no quantizer to go to); keep the explicit τ for this model")


@torch.no_grad()
def fold_input_scales(qmodel: QuantModel) -> QuantModel:
    """A deep copy of ``qmodel`` with every τ folded (see the module docstring); ``qmodel`` is
    left untouched. Layers without τ are copied as they are."""
    if not isinstance(qmodel, QuantModel):
        raise ExportError(f"fold_input_scales() needs a QuantModel, got {type(qmodel).__name__}")
    folded = copy.deepcopy(qmodel)
    for q in folded.quantizers().values():  # deepcopy gives every quantizer its own index copy
        q.timestep_index = folded.timestep_index
    for name, layer in folded.layers().items():
        if layer.input_scale is None:
            continue
        _check_foldable(name, layer)
        tau = layer.input_scale.detach()
        weight = layer.base_weight().detach()  # W·τ, the very tensor the weight quantizers saw
        layer.weight.data.copy_(weight)
        layer.input_scale = None
        sizes = [tau.numel()] if layer.split is None else [layer.split, tau.numel() - layer.split]
        for i, (q, part) in enumerate(zip(list(layer.act_quantizers), torch.split(tau, sizes))):
            if not isinstance(q, PTSQuantizer):
                q = PTSQuantizer.from_quantizer(q, layer.act_axis, part.numel())
                replace_module(folded.model, f"{name}.act_quantizers.{i}", q)
            if not bool(torch.all(q.input_divisor == 1)):
                raise ExportError(f"{name}: its activation quantizer already holds a folded τ")
            q.input_divisor.copy_(part.to(q.input_divisor))
        layer.clear_cache()
    return folded


def folded_float_state(qmodel: QuantModel) -> dict[str, Tensor]:
    """The float state dict (original key names) of a quantized model — for a folded model the
    weights W·τ its checkpoint must be loaded onto."""
    state = qmodel.denoiser_state_dict()
    return {k: state[k].detach().clone() for k in qmodel.float_keys}


__all__ = ["fold_input_scales", "folded_float_state"]
