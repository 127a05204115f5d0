"""Temporarily switching a quantized model's weight / activation quantization on or off."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from ..model.qmodel import QuantModel


def snapshot_quant_state(qmodel: QuantModel) -> dict[str, tuple[bool, ...]]:
    """Every layer's (use_weight_quant, use_act_quant) and every attention processor's flag."""
    state: dict[str, tuple[bool, ...]] = {
        name: (layer.use_weight_quant, layer.use_act_quant) for name, layer in qmodel.layers().items()
    }
    for name, proc in qmodel.attention_processors().items():
        state["attn:" + name] = (proc.use_act_quant,)
    return state


def restore_quant_state(qmodel: QuantModel, state: dict[str, tuple[bool, ...]]) -> None:
    for name, layer in qmodel.layers().items():
        layer.use_weight_quant, layer.use_act_quant = state[name]
    for name, proc in qmodel.attention_processors().items():
        (proc.use_act_quant,) = state["attn:" + name]


@contextmanager
def quant_state(qmodel: QuantModel, weights: bool, acts: bool) -> Iterator[QuantModel]:
    """``qmodel.set_quant_state(weights, acts)`` inside the block, the previous flags after it."""
    before = snapshot_quant_state(qmodel)
    qmodel.set_quant_state(weights=weights, acts=acts)
    try:
        yield qmodel
    finally:
        restore_quant_state(qmodel, before)
