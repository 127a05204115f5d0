"""One traced float forward that finds execution order and concatenation points.

- Execution order: forward pre-hooks record the first call of every module (docs/methods.md §1.6:
  units are ordered by execution, not registration).
- Concatenation points: a ``TorchFunctionMode`` records every ``torch.cat`` result; a layer whose
  input *is* such a result (same tensor object) along its channel axis is a split layer, with the
  split at the size of the first part. This finds diffusers up-block shortcut convs and any user
  model that concatenates right before a conv or linear, without touching the model's code.
- Data flow: the same mode tags every tensor computed from the sample ``x`` and from the
  timestep ``t`` (by object identity, through every torch operation), so each layer's input is
  known to depend on ``x``, on ``t`` only (the time-embedding path), or on neither; and the
  output of each layer on the time path is followed until it meets the sample's data (the layer
  projects the embedding into the features) or another layer (it is part of the embedding MLP).
- Residual blocks: a module whose forward adds its own input (or a layer's projection of it) to
  something computed inside it and that calls at least two quantized layers is a residual block
  (ResBlocks, transformer blocks, attention with a residual connection, any user block class).
- Skip connections and the middle: a module output that is concatenated (with the sample's data)
  only after other residual blocks have run in between is a skip tensor (a UNet's encoder
  output). The outermost residual blocks that start after the last skip tensor is produced and
  before the first one is consumed are the middle of the network (a UNet's mid block).
"""
from __future__ import annotations

import math
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
_ATTENTION_FUNCS = {torch.softmax, torch.nn.functional.softmax, Tensor.softmax,
                    torch.nn.functional.scaled_dot_product_attention}


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
    """Tags tensors derived from x / t and records additions (operand ids → result id) and
    concatenations of the sample's data (when each operand was produced by a module, and when
    the concatenation happened, on the clock of module calls)."""

    def __init__(self):
        super().__init__()
        self._tags: dict[int, tuple[weakref.ref, int]] = {}
        #: (operand ids, result id, depth of the module call it happened in)
        self.adds: list[tuple[set[int], int, int]] = []
        self.depth = 0
        self.clock = 0
        #: id(tensor) -> (weakref, clock, name) of the first (innermost) module call that returned it
        self._produced: dict[int, tuple[weakref.ref, int, str]] = {}
        #: (clock when produced, clock when concatenated) per operand of an x-concatenation
        self.cat_operands: list[tuple[int, int]] = []
        #: id(tensor) -> (weakref, names of the timestep-only layers it is computed from, directly)
        self._origins: dict[int, tuple[weakref.ref, frozenset[str]]] = {}
        #: timestep-only layers whose output meets the sample's data in an operation
        self.mixing: set[str] = set()
        #: timestep-only layers whose output (through non-layer operations) feeds another such layer
        self.feeding: set[str] = set()
        #: depth of the module call in which each softmax / scaled-dot-product attention ran
        self.attention_depths: list[int] = []
        #: id(tensor) -> (weakref, layer) of layer outputs computed from the calling module's own
        #: input, while that module runs; such an output added to another tensor is a shortcut
        self.projections: dict[int, tuple[weakref.ref, str]] = {}
        self.shortcuts: set[str] = set()

    def set_origin(self, tensor: Tensor, name: str) -> None:
        self._origins[id(tensor)] = (weakref.ref(tensor), frozenset([name]))

    def origins_of(self, operands: list[Tensor]) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for t in operands:
            entry = self._origins.get(id(t))
            if entry is not None and entry[0]() is t:
                out |= entry[1]
        return out

    def _follow_time_outputs(self, operands: list[Tensor], out) -> None:
        """A timestep-only layer's output either meets the sample's data (the layer projects the
        embedding into the features) or flows on, through non-layer operations, to other layers."""
        origins = self.origins_of(operands)
        if not origins:
            return
        if any(self.flag(t) & FROM_X for t in operands):
            self.mixing |= origins
            return
        for t in _tensors(out):
            self._origins[id(t)] = (weakref.ref(t), origins)

    def produced(self, tensor: Tensor, name: str) -> str:
        """Record ``tensor`` as returned by module ``name``; the innermost module that made it."""
        entry = self._produced.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[2]
        self._produced[id(tensor)] = (weakref.ref(tensor), self.clock, name)
        return name

    def _record_cat(self, args, kwargs) -> None:
        tensors = args[0] if args else kwargs.get("tensors", kwargs.get("inputs", ()))
        for t in tensors if isinstance(tensors, (list, tuple)) else ():
            entry = self._produced.get(id(t)) if isinstance(t, Tensor) else None
            if entry is not None and entry[0]() is t:
                self.cat_operands.append((entry[1], self.clock))

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
        if flag & FROM_T:
            self._follow_time_outputs(list(_tensors(args)) + list(_tensors(kwargs)), out)
        if flag:
            for t in _tensors(out):
                self.tag(t, flag)
        if func in _ADD_FUNCS and isinstance(out, Tensor):
            operands = list(_tensors(args))
            self.adds.append(({id(t) for t in operands}, id(out), self.depth))
            if len(operands) > 1:
                for t in operands:
                    entry = self.projections.get(id(t))
                    if entry is not None and entry[0]() is t:
                        self.shortcuts.add(entry[1])
        if func in _ATTENTION_FUNCS:
            self.attention_depths.append(self.depth)
        if func in _CAT_FUNCS and flag & FROM_X:
            self._record_cat(args, kwargs)
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
    #: the outermost residual modules (the addition in their own forward, none inside another), in
    #: call order; in a network without residual additions, the innermost modules calling >= 2
    #: quantized layers on the sample's data
    outer_blocks: list[str] = field(default_factory=list)
    #: outer blocks between the last skip tensor produced and the first consumed, at the lowest
    #: resolution there (empty: no skip connections)
    middle_blocks: list[str] = field(default_factory=list)
    #: module name -> the innermost module whose output tensor it returns (itself if it made it)
    output_origin: dict[str, str] = field(default_factory=dict)
    #: timestep-only layers whose output meets the sample's data directly (projections of the
    #: embedding into the features: a ResBlock's time_emb_proj, a DiT block's adaLN linear)
    time_mixing: set[str] = field(default_factory=set)
    #: timestep-only layers whose output feeds another timestep-only layer (inside the MLP)
    time_feeding: set[str] = field(default_factory=set)
    #: layers that project a module's own input straight onto an addition inside that module: the
    #: shortcut of a residual block (diffusers ``conv_shortcut``, CompVis ``skip_connection``)
    shortcut_layers: set[str] = field(default_factory=set)
    #: modules whose own forward computes a softmax / scaled-dot-product attention, widened to the
    #: enclosing module when they hold no layer themselves (CompVis ``QKVAttention`` → its block)
    attention_modules: list[str] = field(default_factory=list)

    def middle_feature_module(self) -> str | None:
        """The module whose input is the middle of the network (TDAC's feature, docs/methods.md §4.1):
        the block after the first middle block (a UNet's mid attention, or its second ResBlock);
        with no skip connections (a DiT), the outer block halfway through."""
        if self.middle_blocks:
            return self.middle_blocks[min(1, len(self.middle_blocks) - 1)]
        return self.outer_blocks[len(self.outer_blocks) // 2] if self.outer_blocks else None

    def feature_points(self) -> dict[str, str]:
        points = {"middle": self.middle_feature_module(), "last_block": self.last_block()}
        return {k: v for k, v in points.items() if v is not None}

    def last_block(self) -> str | None:
        """The last outer block called, named by its outermost enclosing module that returns the
        same tensor (a UNet's last up block): what the output head reads, TRD's feature
        (docs/methods.md §6.4)."""
        if not self.outer_blocks:
            return None
        name = self.outer_blocks[-1]
        origin = self.output_origin.get(name)
        parent = name.rpartition(".")[0]
        while parent and origin is not None:
            if parent in self.output_origin:  # containers that are never called (ModuleList) are passed over
                if self.output_origin[parent] != origin:
                    break
                name = parent
            parent = parent.rpartition(".")[0]
        return name

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
    own_residual: set[str] = set()  # the addition in the module's own forward, not a child's
    multi_layer: dict[str, int] = {}  # modules calling >= 2 quantized layers -> their input's flow flags
    started: dict[str, int] = {}  # module name -> clock at the start of its first call
    sizes: dict[str, tuple[int, int]] = {}  # module name -> spatial size of its input and output
    attending: list[str] = []  # modules whose own forward ran a softmax / attention

    def make_post_hook(name: str):
        def post(mod, inputs, output):
            flow.clock += 1
            first = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(first, Tensor) and name not in result.output_origin:
                result.output_origin[name] = flow.produced(first, name)
                if inputs and isinstance(inputs[0], Tensor):
                    sizes[name] = (_spatial(inputs[0]), _spatial(first))
            if isinstance(mod, SUPPORTED) and isinstance(first, Tensor):
                flag = result.input_flow.get(name, 0)
                if flag & FROM_T and not flag & FROM_X:
                    flow.set_origin(first, name)
            call = open_calls.pop()
            flow.depth = len(open_calls)
            if open_calls:  # the parent passes the count on when it returns
                open_calls[-1]["layers"] += call["layers"]
            if isinstance(mod, SUPPORTED) and open_calls:
                parent = open_calls[-1]
                if inputs and isinstance(inputs[0], Tensor) and id(inputs[0]) in parent["inputs"]:
                    parent["inputs"].add(id(output))  # a projected shortcut of the parent's input
                    flow.projections[id(output)] = (weakref.ref(output), name)
                    parent["projections"].append(id(output))
            for i in call["projections"]:  # an addition after the block returned is not its shortcut
                flow.projections.pop(i, None)
            if name and any(d == call["depth"] for d in flow.attention_depths[call["attention"]:]):
                attending.append(name)
            if call["layers"] >= 2 and name and not isinstance(mod, SUPPORTED):
                multi_layer.setdefault(name, call["flag"])
                adds = [(ops, depth) for ops, _, depth in flow.adds[call["adds"]:] if ops & call["inputs"] and len(ops) > 1]
                if adds:
                    candidates[name] = call["layers"]
                if any(depth == call["depth"] for _, depth in adds):
                    own_residual.add(name)
        return post

    def make_hook(name: str, module: nn.Module):
        def hook(mod, inputs):
            flow.clock += 1
            started.setdefault(name, flow.clock)
            if name not in result.call_index:
                result.call_index[name] = len(result.call_index)
            open_calls.append({"inputs": {id(t) for t in _tensors(inputs[:1])}, "adds": len(flow.adds),
                               "layers": 1 if isinstance(mod, SUPPORTED) else 0, "depth": len(open_calls) + 1,
                               "flag": flow.flag(inputs[:1]), "projections": [],
                               "attention": len(flow.attention_depths)})
            flow.depth = len(open_calls)
            if isinstance(mod, SUPPORTED) and inputs and isinstance(inputs[0], Tensor):
                result.input_flow.setdefault(name, flow.flag(inputs[0]))
                flow.feeding |= flow.origins_of([inputs[0]])
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
    if own_residual:
        outer = [n for n in own_residual if not any(n.startswith(o + ".") for o in own_residual)]
    else:  # no residual additions: the innermost multi-layer modules on the sample's path
        on_x = [n for n, f in multi_layer.items() if f & FROM_X]
        outer = [n for n in on_x if not any(o.startswith(n + ".") for o in on_x)]
    result.outer_blocks = sorted(outer, key=lambda n: result.call_index.get(n, 0))
    result.middle_blocks = _middle_blocks(result.outer_blocks, started, sizes, flow.cat_operands)
    result.time_mixing = set(flow.mixing)
    result.shortcut_layers = set(flow.shortcuts)
    result.attention_modules = _attention_modules(model, attending, result.call_index)
    result.time_feeding = set(flow.feeding)
    return result


def _attention_modules(model: nn.Module, attending: list[str], order: dict[str, int]) -> list[str]:
    """Each attending module, or its nearest enclosing module that holds quantizable layers; the
    outermost of nested ones, in call order."""
    modules = dict(model.named_modules())

    def holds_layers(name: str) -> bool:
        return any(isinstance(m, SUPPORTED) for m in modules[name].modules())

    found = []
    for name in dict.fromkeys(attending):
        while name and not holds_layers(name):
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    outer = [n for n in dict.fromkeys(found) if not any(n.startswith(o + ".") for o in found if o != n)]
    return sorted(outer, key=lambda n: order.get(n, 0))


def _spatial(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def _middle_blocks(outer: list[str], started: dict[str, int], sizes: dict[str, tuple[int, int]],
                   cat_operands: list[tuple[int, int]]) -> list[str]:
    starts = sorted(started[n] for n in outer)
    # a skip tensor: produced, then other blocks run, then concatenated
    skips = [(made, used) for made, used in cat_operands if any(made < s < used for s in starts)]
    if not skips:
        return []
    last_made, first_used = max(m for m, _ in skips), min(u for _, u in skips)
    window = [n for n in outer if last_made < started[n] < first_used and n in sizes]
    if not window:
        return []
    lowest = min(min(sizes[n]) for n in window)  # down/up-sampling blocks change the resolution
    return [n for n in window if sizes[n] == (lowest, lowest)]


def trace_in_eval(model: nn.Module, example_inputs: tuple[tuple, dict] | None = None) -> TraceResult:
    """:func:`trace_model` in eval mode (the model's mode is restored); ``example_inputs`` =
    ``(args, kwargs)`` of one call (default: built for the diffusers models diffquant knows)."""
    if example_inputs is None:
        from .adapters import example_inputs_for

        example_inputs = example_inputs_for(model)
    args, kwargs = example_inputs
    was_training = model.training
    model.eval()
    try:
        return trace_model(model, args, kwargs)
    finally:
        model.train(was_training)


def feature_modules(model: nn.Module, example_inputs: tuple[tuple, dict] | None = None) -> dict[str, str]:
    """The structural feature points of ``model`` from one traced forward: ``middle`` (the module
    whose input is the middle of the network, TDAC's feature) and ``last_block`` (the last block
    before the output head, TRD's feature); a point the graph does not show is left out."""
    return trace_in_eval(model, example_inputs).feature_points()
