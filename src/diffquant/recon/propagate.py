"""One propagation of the calibration set through the units of a pass (docs/methods.md §1.6).

Building unit k's cache by running the calibration set from the network input up to unit k
costs a prefix of the network per unit, twice (float and quantized): for U units about U/2
full forwards where one would do. A :class:`Propagation` instead keeps one forward per
calibration batch *suspended* at the input of the current unit: every forward runs in its own
thread, and a forward pre-hook on each unit hands the unit's arguments to the engine and waits.
The engine caches them, reconstructs the unit, and then lets each forward run on — through the
now finished unit, to the next unit's input. Everything a forward holds between two units (skip
tensors of a UNet, the time embedding, ...) stays alive in its paused frame, so the rest of the
network is computed once per pass.

Forwards run one at a time (the engine releases one and waits for it to pause again), so the
model's shared state — quantization flags set by the engine, the per-timestep row selected at
the start of a call, which each forward restores when it resumes — is never seen by two at once.

A propagation needs every unit to be called in the order given, each once before the next and
none inside another; :class:`PropagationUnavailable` says when a forward did otherwise, and the
engine then falls back to rebuilding each cache from the input. Memory: the paused frames hold
the live activations of every batch (:func:`frontier_bytes` measures them on one batch), which
the engine checks against the cache budget before choosing this path.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..calib.calls import CalibrationCalls
from ..calib.stop import run_stoppable, stop_forward
from ..errors import DiffquantError
from ..model.qmodel import QuantModel
from .cache import _inner


class PropagationUnavailable(DiffquantError):
    """The forwards did not call the units once each, in order, one after the other."""


class _Forward:
    """One calibration batch's forward, run in its own thread and paused at unit inputs."""

    def __init__(self, index: slice):
        self.index = index
        self.resume = threading.Semaphore(0)
        self.paused = threading.Semaphore(0)
        self.expected: str | None = None  # the unit it pauses at next
        self.want_output: str | None = None  # the unit whose output it records on the way
        self.seen: set[str] = set()
        self.at: str | None = None  # where it is paused (None: finished)
        self.call: tuple[tuple, dict] | None = None
        self.output: Tensor | None = None
        self.error: BaseException | None = None
        self.problem: str | None = None
        self.abort = False
        self.timestep_row: int | None = None
        self.thread: threading.Thread | None = None


class Propagation:
    """Suspended forwards of the batches ``slices`` of ``data`` through ``model``, paused at the
    units ``names`` in turn.

    ``model`` is a :class:`QuantModel` (the quantized side, or the float side with quantization
    switched off by ``state``) or a separate float model with the same module names. ``state``
    is a context manager factory entered around every stretch a forward runs (e.g. the float
    side's ``quant_state(qmodel, False, False)``).
    """

    def __init__(self, model: nn.Module, names: list[str], data: CalibrationCalls, *, slices: list[slice],
                 state: Callable[[], Any] | None = None, outputs: bool = False):
        inner = _inner(model)
        self.model, self.names, self.data = model, list(names), data
        self.state = state
        self.outputs = outputs
        self.position = -1  # index into names where the forwards are paused
        self._local = threading.local()
        self._timesteps = model.timestep_index if isinstance(model, QuantModel) else None
        self._handles = []
        modules = {}
        for name in self.names:
            try:
                modules[name] = inner.get_submodule(name)
            except AttributeError:
                raise DiffquantError(f"unit {name!r} does not exist in {type(inner).__name__}") from None
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
            if outputs:
                self._handles.append(module.register_forward_hook(self._post_hook(name), with_kwargs=True))
        self.forwards = [_Forward(index) for index in slices]
        self._closed = False

    # ------------------------------------------------------------------ hooks (worker threads)
    def _pre_hook(self, name: str):
        def hook(module, args, kwargs):
            fwd: _Forward | None = getattr(self._local, "forward", None)
            if fwd is None or name in fwd.seen:  # the engine's own calls, or a later call of a unit
                return None
            fwd.seen.add(name)
            if name != fwd.expected or (fwd.want_output is not None and fwd.output is None):
                fwd.problem = (f"unit {name!r} was called where {fwd.expected!r} was expected"
                               if name != fwd.expected else
                               f"unit {name!r} was called inside or before the end of {fwd.want_output!r}")
                stop_forward()
            fwd.call = (tuple(args), dict(kwargs))
            fwd.at = name
            if self._timesteps is not None:
                fwd.timestep_row = self._timesteps.index
            fwd.paused.release()
            fwd.resume.acquire()
            fwd.call = None
            if fwd.abort:
                stop_forward()
            if self._timesteps is not None and fwd.timestep_row is not None:
                self._timesteps.index = fwd.timestep_row
            return None
        return hook

    def _post_hook(self, name: str):
        def hook(module, args, kwargs, output):
            fwd: _Forward | None = getattr(self._local, "forward", None)
            if fwd is None or fwd.want_output != name or fwd.output is not None:
                return None
            fwd.output = output
            if self.position >= len(self.names):
                stop_forward()  # the last unit: the rest of the network is not needed
            return None
        return hook

    def _work(self, fwd: _Forward) -> None:
        self._local.forward = fwd
        try:
            with torch.no_grad():
                run_stoppable(self.data.run, self.model, fwd.index)
        except BaseException as exc:  # handed to the engine's thread
            fwd.error = exc
        finally:
            fwd.at = None
            fwd.paused.release()

    # ------------------------------------------------------------------ engine side
    def _step(self, fwd: _Forward, start: bool) -> None:
        """Let ``fwd`` run to its next pause (``start``: launch its thread), inside ``state``."""
        with self.state() if self.state is not None else contextlib.nullcontext():
            if start:
                fwd.thread = threading.Thread(target=self._work, args=(fwd,), daemon=True,
                                              name=f"diffquant-propagation-{fwd.index.start}")
                fwd.thread.start()
            else:
                fwd.resume.release()
            fwd.paused.acquire()
        self._check(fwd)

    def _check(self, fwd: _Forward) -> None:
        if fwd.error is not None:
            error, fwd.error = fwd.error, None
            self.close()
            raise error
        if fwd.problem is not None:
            problem = fwd.problem
            self.close()
            raise PropagationUnavailable(problem)

    def advance(self) -> Iterator[tuple[_Forward, Any]]:
        """Move every forward, one after the other, to the input of the next unit, yielding each
        forward with the output of the unit it ran through (when ``outputs``; else None). Consume
        it fully; an output is dropped as soon as the caller has it."""
        if self._closed:
            raise DiffquantError("the propagation is closed")
        start = self.position < 0
        leaving = None if start else self.names[self.position]
        self.position += 1
        target = self.names[self.position] if self.position < len(self.names) else None
        for fwd in self.forwards:
            fwd.expected = target
            fwd.want_output = leaving if self.outputs else None
            fwd.output = None
            self._step(fwd, start)
            if target is not None and fwd.at != target:
                self.close()
                raise PropagationUnavailable(f"unit {target!r} was not reached by the batch at {fwd.index.start}")
            if self.outputs and leaving is not None and fwd.output is None:
                self.close()
                raise PropagationUnavailable(f"unit {leaving!r} returned no output before the next unit")
            output, fwd.output = fwd.output, None
            yield fwd, output

    def move_on(self) -> None:
        """:meth:`advance` when the outputs are not needed."""
        for _ in self.advance():
            pass

    def calls(self) -> Iterator[tuple[slice, tuple, dict]]:
        """The (slice, args, kwargs) of every batch at the current unit."""
        for fwd in self.forwards:
            args, kwargs = fwd.call
            yield fwd.index, args, kwargs

    @property
    def current(self) -> str | None:
        return self.names[self.position] if 0 <= self.position < len(self.names) else None

    def close(self) -> None:
        """End every suspended forward (its hook stops it) and remove the hooks."""
        if self._closed:
            return
        self._closed = True
        for fwd in self.forwards:
            if fwd.thread is not None and fwd.thread.is_alive():
                fwd.abort = True
                fwd.resume.release()
                fwd.thread.join()
        for handle in self._handles:
            handle.remove()

    def __del__(self):  # a propagation dropped without close() must not leave threads waiting
        try:
            self.close()
        except Exception:
            pass


class _LiveTensors(TorchDispatchMode):
    """Records every tensor the ops produce (weakly), to measure what a paused forward holds."""

    def __init__(self):
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor):
                self.refs.append(weakref.ref(leaf))
        return out

    def live_bytes(self, batch: int) -> int:
        """Bytes of the distinct storages of live tensors with ``batch`` rows (per-sample activations)."""
        seen, total = set(), 0
        for ref in self.refs:
            t = ref()
            if t is None or t.dim() == 0 or t.shape[0] != batch:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
        return total


def frontier_bytes(model: nn.Module, names: list[str], data: CalibrationCalls, index: slice) -> int:
    """The largest amount of per-sample activation memory one forward of the samples ``index``
    holds at the input of any of the units ``names`` (the unit's own arguments included)."""
    inner = _inner(model)
    batch = index.stop - index.start
    peak = [0]
    mode = _LiveTensors()

    def pre_hook(module, args):
        peak[0] = max(peak[0], mode.live_bytes(batch))

    handles = [inner.get_submodule(name).register_forward_pre_hook(pre_hook) for name in names]
    try:
        with torch.no_grad(), mode:
            data.run(model, index)
    finally:
        for h in handles:
            h.remove()
    return peak[0]


__all__ = ["Propagation", "PropagationUnavailable", "frontier_bytes"]
