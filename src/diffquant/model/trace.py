"""One traced float forward that finds execution order and concatenation points.

- Execution order: forward pre-hooks record the first call of every module (METHODS.md §1.6:
  units are ordered by execution, not registration).
- Concatenation points: a ``TorchFunctionMode`` records every ``torch.cat`` result; a layer whose
  input *is* such a result (same tensor object) along its channel axis is a split layer, with the
  split at the size of the first part. This finds diffusers up-block shortcut convs and any user
  model that concatenates right before a conv or linear, without touching the model's code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..nn.layers import SUPPORTED

_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}


class _CatRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.cats: dict[int, tuple[Tensor, list[int], int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CAT_FUNCS and isinstance(out, Tensor):
            tensors = args[0] if args else kwargs.get("tensors", kwargs.get("inputs"))
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            tensors = [t for t in tensors if isinstance(t, Tensor) and t.numel() > 0]
            if tensors:
                dim = dim % out.dim()
                self.cats[id(out)] = (out, [t.shape[dim] for t in tensors], dim)
        return out


@dataclass
class TraceResult:
    #: module name -> index of its first call in the traced forward
    call_index: dict[str, int] = field(default_factory=dict)
    #: layer name -> channel count of the first part of its concatenated input
    splits: dict[str, int] = field(default_factory=dict)
    #: layer name -> sizes of all parts (for layers whose input is a concatenation of > 2 parts)
    multi_part: dict[str, list[int]] = field(default_factory=dict)


def _channel_dim(module: nn.Module, x: Tensor) -> int:
    return x.dim() - 1 if isinstance(module, nn.Linear) else 1


@torch.no_grad()
def trace_model(model: nn.Module, args: tuple, kwargs: dict | None = None) -> TraceResult:
    """Run ``model(*args, **kwargs)`` once and record call order and concat-fed layers."""
    result = TraceResult()
    recorder = _CatRecorder()
    handles = []

    def make_hook(name: str, module: nn.Module):
        def hook(mod, inputs):
            if name not in result.call_index:
                result.call_index[name] = len(result.call_index)
            if isinstance(mod, SUPPORTED) and inputs and isinstance(inputs[0], Tensor):
                x = inputs[0]
                entry = recorder.cats.get(id(x))
                if entry is not None and entry[0] is x and entry[2] == _channel_dim(mod, x) % x.dim():
                    sizes = entry[1]
                    if len(sizes) == 2:
                        result.splits.setdefault(name, sizes[0])
                    elif len(sizes) > 2:
                        result.multi_part.setdefault(name, sizes)

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(make_hook(name, module)))
    try:
        with recorder:
            model(*args, **(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    return result
