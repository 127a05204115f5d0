"""One traced float forward that finds execution order and concatenation points.

- Execution order: forward pre-hooks record the first call of every module (METHODS.md §1.6:
  units are ordered by execution, not registration).
- Concatenation points: a ``TorchFunctionMode`` records every ``torch.cat`` result; a layer whose
  input *is* such a result (same tensor object) along its channel axis is a split layer, with the
  split at the size of the first part. This finds diffusers up-block shortcut convs and any user
  model that concatenates right before a conv or linear, without touching the model's code.
- Data flow: the same mode tags every tensor computed from the sample ``x`` and from the
  timestep ``t`` (by object identity, through every torch operation), so each layer's input is
  known to depend on ``x``, on ``t`` only (the time-embedding path), or on neither.
- Residual blocks: a module whose forward adds its own input (or a layer's projection of it) to
  something computed inside it and that calls at least two quantized layers is a residual block
  (ResBlocks, transformer blocks, attention with a residual connection, any user block class).
"""
from __future__ import annotations

import weakref
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


FROM_X, FROM_T = 1, 2
_ADD_FUNCS = {torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, Tensor.add_, Tensor.__iadd__}


def _tensors(obj):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


class _FlowRecorder(TorchFunctionMode):
    """Tags tensors derived from x / t and records additions (operand ids → result id)."""

    def __init__(self):
        super().__init__()
        self._tags: dict[int, tuple[weakref.ref, int]] = {}
        self.adds: list[tuple[set[int], int]] = []

    def tag(self, tensor: Tensor, flag: int) -> None:
        old = self.flag(tensor)
        self._tags[id(tensor)] = (weakref.ref(tensor), old | flag)

    def flag(self, obj) -> int:
        out = 0
        for t in _tensors(obj):
            entry = self._tags.get(id(t))
            if entry is not None and entry[0]() is t:
                out |= entry[1]
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flag = self.flag(args) | self.flag(kwargs)
        if flag:
            for t in _tensors(out):
                self.tag(t, flag)
        if func in _ADD_FUNCS and isinstance(out, Tensor):
            self.adds.append(({id(t) for t in _tensors(args)}, id(out)))
        return out


@dataclass
class TraceResult:
    #: module name -> index of its first call in the traced forward
    call_index: dict[str, int] = field(default_factory=dict)
    #: layer name -> channel count of the first part of its concatenated input
    splits: dict[str, int] = field(default_factory=dict)
    #: layer name -> sizes of all parts (for layers whose input is a concatenation of > 2 parts)
    multi_part: dict[str, list[int]] = field(default_factory=dict)
    #: layer name -> FROM_X | FROM_T flags of its input (0: depends on neither, e.g. text embeddings)
    input_flow: dict[str, int] = field(default_factory=dict)
    #: modules found to be residual blocks (input added back inside, >= 2 quantized layers)
    residual_blocks: list[str] = field(default_factory=list)

    def timestep_only_layers(self) -> list[str]:
        """Layers whose input is computed from the timestep and not from the sample."""
        return [n for n, f in self.input_flow.items() if f & FROM_T and not f & FROM_X]


def _channel_dim(module: nn.Module, x: Tensor) -> int:
    return x.dim() - 1 if isinstance(module, nn.Linear) else 1


@torch.no_grad()
def trace_model(model: nn.Module, args: tuple, kwargs: dict | None = None) -> TraceResult:
    """Run ``model(*args, **kwargs)`` once and record call order, concat-fed layers, the data flow
    from the sample and the timestep, and residual blocks."""
    from ..quant.timestep import extract_timestep

    result = TraceResult()
    recorder = _CatRecorder()
    flow = _FlowRecorder()
    handles = []
    kwargs = dict(kwargs or {})
    if args and isinstance(args[0], Tensor):
        flow.tag(args[0], FROM_X)
    t = extract_timestep(args, kwargs)
    if isinstance(t, Tensor):
        flow.tag(t, FROM_T)
    # per module call: its input ids (and layers' outputs computed from them), layers called inside
    open_calls: list[dict] = []
    candidates: dict[str, int] = {}

    def make_post_hook(name: str):
        def post(mod, inputs, output):
            call = open_calls.pop()
            if open_calls:  # the parent passes the count on when it returns
                open_calls[-1]["layers"] += call["layers"]
            if isinstance(mod, SUPPORTED) and open_calls:
                parent = open_calls[-1]
                if inputs and isinstance(inputs[0], Tensor) and id(inputs[0]) in parent["inputs"]:
                    parent["inputs"].add(id(output))  # a projected shortcut of the parent's input
            if call["layers"] >= 2 and name and not isinstance(mod, SUPPORTED):
                residual = any(ops & call["inputs"] and len(ops) > 1 for ops, _ in flow.adds[call["adds"]:])
                if residual:
                    candidates[name] = call["layers"]
        return post

    def make_hook(name: str, module: nn.Module):
        def hook(mod, inputs):
            if name not in result.call_index:
                result.call_index[name] = len(result.call_index)
            open_calls.append({"inputs": {id(t) for t in _tensors(inputs[:1])}, "adds": len(flow.adds),
                               "layers": 1 if isinstance(mod, SUPPORTED) else 0})
            if isinstance(mod, SUPPORTED) and inputs and isinstance(inputs[0], Tensor):
                result.input_flow.setdefault(name, flow.flag(inputs[0]))
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
            handles.append(module.register_forward_hook(make_post_hook(name)))
    try:
        with recorder, flow:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    # innermost residual modules: none of their submodules is one
    result.residual_blocks = sorted(
        (n for n in candidates if not any(o.startswith(n + ".") for o in candidates)),
        key=lambda n: result.call_index.get(n, 0))
    return result
