"""Stage 1 of EfficientDM / MPQ-DM: initialisation on one calibration batch (docs/methods.md §6.1–6.2).

One forward of the Stage-1 batch with weights and activations quantized, as the official
``quantize_ldm_naive.py`` does: when a layer is reached, a pre-hook initialises it from the
input it receives (so later layers see the already quantized prefix), then the layer runs:

- mixed layers: SmoothQuant scale (optional), OMQ split search (optional), per-channel
  ``lp_shrink`` weight ranges per bit group (a :class:`MixedBitQuantizer` when OMQ is on);
- 8-bit layers: per-channel ``lp_shrink`` weights, no smoothing or OMQ;
- every active activation quantizer: per-tensor ``lp_shrink`` on the (scaled) input, from this
  one batch (``observe`` mode).

Layers the forward never reaches get data-free weight ranges and their activation quantizers are
switched off (kept in floating point).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..model.qmodel import QuantModel
from ..nn.layers import QuantLayer, attach_input_scale
from ..quant.omq import search_split, smooth_scales
from ..quant.variants import MixedBitQuantizer, replace_module
from ..config import checked


@dataclass
@checked
class Stage1Options:
    smooth: bool = True
    alpha: float = 0.5
    omq: bool = True
    criterion: str = "kurtosis"
    candidates: str = "paper"
    seed: int = 0


def _init_mixed(name: str, layer: QuantLayer, x: Tensor, options: Stage1Options) -> dict[str, Any]:
    record: dict[str, Any] = {"layer": name}
    wq = layer.weight_quantizers[0]
    if len(layer.weight_quantizers) != 1 or not wq.active:
        for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
            if q.active:
                q.init_from(w.detach())
        return record
    if options.smooth and layer.op_args.get("groups", 1) == 1:
        s = smooth_scales(x, layer.weight, act_axis=layer.act_axis, in_axis=layer.in_axis, alpha=options.alpha)
        attach_input_scale(layer, s)
    scaled = layer.base_weight().detach()
    if options.omq:
        result = search_split(
            kind=layer.kind, op_args=layer.op_args, x=x, weight=layer.weight, bias=layer.bias,
            scaled_weight=scaled, input_scale=layer.input_scale, n_bits=wq.bits, out_axis=layer.out_axis,
            act_axis=layer.act_axis, candidates=options.candidates, criterion=options.criterion,
            seed=options.seed,
        )
        mixed = MixedBitQuantizer.from_quantizer(wq)
        mixed.set_channel_bits(result.bits)
        replace_module(layer, "weight_quantizers.0", mixed)
        wq = mixed
        record.update(k=result.k, candidates=result.candidates, errors=result.errors,
                      bits={str(b): n for b, n in result.counts.items()})
    wq.init_from(scaled)
    layer.clear_cache()
    return record


@torch.no_grad()
def run_stage1(qmodel: QuantModel, run_batch: Callable[[QuantModel], Any], mixed: list[str],
               options: Stage1Options, *, quantize_weights: bool = True, quantize_acts: bool = True) -> list[dict]:
    """Initialise every quantizer of ``qmodel`` from one forward ``run_batch(qmodel)``.

    ``mixed`` names the layers that get smoothing and OMQ; all other layers get plain
    ``lp_shrink`` ranges. Returns one record per mixed layer (chosen split and errors).
    """
    layers = qmodel.layers()
    mixed_set = set(mixed)
    done: set[str] = set()
    records: list[dict] = []

    def make_hook(name: str):
        def hook(layer: QuantLayer, args: tuple) -> None:
            if name in done:
                return
            done.add(name)
            x = args[0]
            if name in mixed_set and quantize_weights:
                records.append(_init_mixed(name, layer, x, options))
            else:
                for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
                    if q.active:
                        q.init_from(w.detach())
                layer.clear_cache()
        return hook

    qmodel.eval()
    qmodel.set_quant_state(weights=quantize_weights, acts=quantize_acts)
    acts = qmodel.quantizers("act")
    for q in acts.values():
        q.reset()
    qmodel.set_act_mode("observe")
    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        run_batch(qmodel)
    finally:
        for h in handles:
            h.remove()
        qmodel.set_act_mode("quantize")
    for name, layer in layers.items():  # never reached: data-free weight ranges
        if name not in done:
            for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
                if q.active and not bool(q.initialized.all()):
                    q.init_from(w.detach())
            layer.clear_cache()
    for q in qmodel.quantizers("act").values():
        if q.active and not bool(q.initialized.all()):
            q.enabled = False
    return records


__all__ = ["Stage1Options", "run_stage1"]
