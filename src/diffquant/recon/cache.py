"""Per-unit input/output caches over the calibration set (docs/methods.md §1.6).

For one reconstruction unit (a block or a layer) :func:`build_unit_cache` records, for every
calibration sample,

- x_in^q: everything the unit is called with (all positional and keyword arguments: ResnetBlock2D
  gets ``(hidden, temb)``, diffusers Attention ``hidden_states`` plus keyword arguments, the
  mnist-resunet ``ResBlock(x, temb)``) in the partly quantized model — earlier units finalised,
  the pass's quantizer state on;
- x_in^fp: the same in the full-precision model;
- y^fp: the full-precision unit's output on x_in^fp.

A forward pre-hook (``with_kwargs=True``) on the unit copies its arguments into the cache and,
when the output is not needed, aborts the forward at once by raising a private exception; for
y^fp a forward hook records the output and aborts right after the unit. Later layers never run.

Tensors whose leading dimension is the call's batch are stored per sample, [N, …], on the CPU
(optionally fp16) or, above a memory limit, in files on disk read back by positioned I/O (nothing
stays mapped, so resident memory holds only the batches in use); other arguments
(``None``, flags, tensors without a batch axis) are kept once. :meth:`UnitCache.inputs` gathers any
set of sample indices back into ``(args, kwargs)`` on the training device.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..bundle import denoiser_output_tensor
from ..calib.calls import CalibrationCalls, DenoiserCall, default_call  # noqa: F401 (re-exported: public here)
from ..calib.stop import run_stoppable, stop_forward
from ..errors import ConfigError, DiffquantError
from ..model.qmodel import QuantModel
from .state import quant_state
from ..config import checked

STORAGES = ("auto", "memory", "disk")
#: how the unit inputs of a pass are produced: ``auto`` one propagation through the units when the
#: paused forwards fit the memory limit (:mod:`.propagate`), else ``rerun`` (each cache from the input)
PROPAGATIONS = ("auto", "rerun")
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
INPUT_KINDS = ("q", "fp")


@dataclass
@checked
class CacheOptions:
    """Where and how unit caches are stored.

    ``storage``: ``memory`` (CPU tensors), ``disk`` (memory-mapped files) or ``auto`` (memory until
    one unit's cache would exceed ``memory_limit_mb``, disk beyond). ``directory``: where disk
    caches go (default: a temporary directory removed with the cache). ``dtype``: storage dtype of
    floating-point tensors (``float16`` halves memory; reads are cast back to float32).
    """

    dtype: str = "float32"
    storage: str = "auto"
    memory_limit_mb: float = 4096.0
    directory: str | None = None
    #: calibration samples per forward while capturing
    batch_size: int = 64
    propagation: str = "auto"

    def __post_init__(self) -> None:
        if self.dtype not in CACHE_DTYPES:
            raise ConfigError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.dtype!r}")
        if self.storage not in STORAGES:
            raise ConfigError(f"cache storage must be one of {', '.join(STORAGES)}, got {self.storage!r}")
        if self.memory_limit_mb <= 0:
            raise ConfigError(f"cache memory limit must be > 0 MB, got {self.memory_limit_mb}")
        if self.batch_size < 1:
            raise ConfigError(f"cache batch size must be >= 1, got {self.batch_size}")
        if self.propagation not in PROPAGATIONS:
            raise ConfigError(f"cache propagation must be one of {', '.join(PROPAGATIONS)}, got {self.propagation!r}")


class _Budget:
    """Decides memory vs disk per stored tensor and owns the temporary directory."""

    def __init__(self, options: CacheOptions):
        self.options = options
        self.used = 0
        self.directory: Path | None = None
        self._finalizer = None
        self._files = 0

    def wants_disk(self, nbytes: int) -> bool:
        if self.options.storage == "auto":
            return self.used + nbytes > self.options.memory_limit_mb * 2**20
        return self.options.storage == "disk"

    def new_file(self) -> Path:
        if self.directory is None:
            base = self.options.directory
            if base is not None:
                Path(base).mkdir(parents=True, exist_ok=True)
            self.directory = Path(tempfile.mkdtemp(prefix="unit-cache-", dir=base))
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.directory), True)
        self._files += 1
        return self.directory / f"tensor{self._files}.bin"

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


class TensorStore:
    """N rows of one per-sample tensor, in CPU memory or in a file on disk.

    On disk, rows are written and read with explicit positioned I/O (``os.pwrite``/``os.pread``)
    rather than a memory map: what was read is copied into a fresh tensor and nothing of the file
    stays mapped into the process, so resident memory holds only the batches in use (memory-mapped
    pages count as resident, which let a disk cache grow the process by its whole size).
    """

    def __init__(self, n: int, row_shape: tuple[int, ...], dtype: torch.dtype, budget: _Budget):
        self.n = n
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self.row_bytes = int(np.prod(row_shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
        nbytes = n * self.row_bytes
        self.nbytes = nbytes
        self._np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        self._fd: int | None = None
        self._tensor: Tensor | None = None
        if budget.wants_disk(nbytes):
            path = budget.new_file()
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self._fd, nbytes)
            self._finalizer = weakref.finalize(self, os.close, self._fd)
        else:
            self._tensor = torch.empty((n, *row_shape), dtype=dtype)
            budget.used += nbytes

    @property
    def on_disk(self) -> bool:
        return self._fd is not None

    def write(self, index: slice, value: Tensor) -> None:
        value = value.detach().to(device="cpu", dtype=self.dtype).contiguous()
        if self._fd is None:
            self._tensor[index] = value
            return
        start = range(self.n)[index].start
        data = memoryview(value.numpy()).cast("B")
        written = 0
        while written < len(data):  # pwrite may write less than asked
            written += os.pwrite(self._fd, data[written:], start * self.row_bytes + written)

    def read(self, index: Tensor) -> Tensor:
        if self._fd is None:
            return self._tensor.index_select(0, index)
        rows = index.tolist()
        out = np.empty((len(rows), *self.row_shape), dtype=self._np_dtype)
        flat = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
        for k, row in enumerate(rows):
            if not 0 <= row < self.n:
                raise IndexError(f"cache row {row} out of range [0, {self.n})")
            target = flat[k * self.row_bytes:(k + 1) * self.row_bytes]
            got = os.preadv(self._fd, [target], row * self.row_bytes)
            if got != self.row_bytes:
                raise DiffquantError(f"unit cache file is truncated (row {row}: {got} of {self.row_bytes} bytes)")
        return torch.from_numpy(out)


class _Leaf:
    """Placeholder for the i-th tensor of a flattened call."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


def _flatten(value: Any, leaves: list[Tensor]) -> Any:
    if isinstance(value, Tensor):
        leaves.append(value)
        return _Leaf(len(leaves) - 1)
    if isinstance(value, (tuple, list)):
        return type(value)(_flatten(v, leaves) for v in value)
    if isinstance(value, dict):
        return {k: _flatten(v, leaves) for k, v in value.items()}
    return value


def _unflatten(template: Any, leaves: list[Any]) -> Any:
    if isinstance(template, _Leaf):
        return leaves[template.i]
    if isinstance(template, (tuple, list)):
        return type(template)(_unflatten(v, leaves) for v in template)
    if isinstance(template, dict):
        return {k: _unflatten(v, leaves) for k, v in template.items()}
    return template


class CallRecord:
    """The arguments of one unit over all N samples: per-sample tensors stored, the rest kept once."""

    def __init__(self, n: int, storage_dtype: torch.dtype, budget: _Budget):
        self.n = n
        self.storage_dtype = storage_dtype
        self.budget = budget
        self.template: Any = None
        #: per leaf: a TensorStore (per sample) or a constant tensor
        self.leaves: list[TensorStore | Tensor] = []
        self.leaf_dtypes: list[torch.dtype] = []

    def _allocate(self, leaves: list[Tensor], batch: int) -> None:
        for t in leaves:
            self.leaf_dtypes.append(t.dtype)
            if t.dim() >= 1 and t.shape[0] == batch:
                dtype = self.storage_dtype if t.is_floating_point() else t.dtype
                self.leaves.append(TensorStore(self.n, tuple(t.shape[1:]), dtype, self.budget))
            else:
                self.leaves.append(t.detach().to("cpu").clone())

    def write(self, index: slice, args: tuple, kwargs: dict) -> None:
        batch = index.stop - index.start
        leaves: list[Tensor] = []
        template = _flatten((tuple(args), dict(kwargs)), leaves)
        if self.template is None:
            self.template = template
            self._allocate(leaves, batch)
        elif len(leaves) != len(self.leaves):
            raise DiffquantError("a unit was called with a different argument structure on another batch")
        for leaf, t in zip(self.leaves, leaves):
            if isinstance(leaf, TensorStore):
                if t.shape[0] != batch or tuple(t.shape[1:]) != leaf.row_shape:
                    raise DiffquantError(
                        f"unit argument of shape {tuple(t.shape)} does not match the cached rows {leaf.row_shape}"
                    )
                leaf.write(index, t)

    def gather(self, index: Tensor, device: str | torch.device) -> tuple[tuple, dict]:
        values = []
        for leaf, dtype in zip(self.leaves, self.leaf_dtypes):
            t = leaf.read(index) if isinstance(leaf, TensorStore) else leaf
            values.append(t.to(device=device, dtype=dtype))
        args, kwargs = _unflatten(self.template, values)
        return tuple(args), dict(kwargs)

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves if isinstance(leaf, TensorStore))


def first_tensor(output: Any) -> Tensor:
    """The tensor a unit returns (the first one when it returns a tuple or a diffusers output)."""
    try:
        return denoiser_output_tensor(output)
    except TypeError:
        raise DiffquantError(f"cannot take a reconstruction target from a unit returning "
                             f"{type(output).__name__}") from None


@dataclass
class UnitCache:
    """x_in^q, x_in^fp (each optional) and y^fp of one unit for N calibration samples."""

    name: str
    n: int
    targets: TensorStore
    target_dtype: torch.dtype
    ts: Tensor
    q_inputs: CallRecord | None = None
    fp_inputs: CallRecord | None = None
    _budget: _Budget | None = field(default=None, repr=False)

    def inputs(self, index: Tensor, kind: str = "q", device: str | torch.device = "cpu") -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the unit for the samples at ``index`` (``kind`` = q | fp)."""
        record = self.q_inputs if kind == "q" else self.fp_inputs if kind == "fp" else None
        if record is None:
            raise DiffquantError(f"the cache of {self.name} holds no {kind!r} inputs")
        return record.gather(index, device)

    def target(self, index: Tensor, device: str | torch.device = "cpu") -> Tensor:
        return self.targets.read(index).to(device=device, dtype=self.target_dtype)

    def random_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
        """Endless index batches of ``min(batch_size, N)`` distinct random samples each."""
        return random_batches(self.n, batch_size, generator)

    @property
    def nbytes(self) -> int:
        records = [r for r in (self.q_inputs, self.fp_inputs) if r is not None]
        return self.targets.nbytes + sum(r.nbytes for r in records)

    @property
    def on_disk(self) -> bool:
        return self.targets.on_disk

    def close(self) -> None:
        """Drop the stored tensors and remove disk files now (instead of at garbage collection)."""
        self.q_inputs = self.fp_inputs = None
        if self._budget is not None:
            self._budget.close()


def random_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless batches of ``min(batch_size, n)`` distinct random indices of ``range(n)`` each."""
    b = min(batch_size, n)
    while True:
        yield torch.randperm(n, generator=generator)[:b]


def _inner(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, QuantModel) else model


def _capture(model: nn.Module, unit_name: str, data: CalibrationCalls, *, record: CallRecord | None,
             on_output: Callable[[slice, Tensor], None] | None, slices: list[slice]) -> None:
    """Run the calibration batches ``slices`` through ``model`` up to the unit (and through it when
    ``on_output`` wants its output), storing the unit's arguments in ``record``."""
    try:
        module = _inner(model).get_submodule(unit_name)
    except AttributeError:
        raise DiffquantError(f"unit {unit_name!r} does not exist in {type(_inner(model)).__name__}") from None
    current: dict[str, Any] = {}

    def pre_hook(mod, args, kwargs):
        if "seen" in current:
            return None
        current["seen"] = True
        if record is not None:
            record.write(current["index"], args, kwargs)
        if on_output is None:
            stop_forward()  # the unit's input is all this pass needs

    def post_hook(mod, args, kwargs, output):
        if "out" in current:
            return None
        current["out"] = True
        on_output(current["index"], first_tensor(output))
        stop_forward()

    handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if on_output is not None:
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for index in slices:
            current.clear()
            current["index"] = index
            run_stoppable(data.run, model, index)
            if "seen" not in current:
                raise DiffquantError(f"unit {unit_name!r} was not called by the denoiser")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def build_unit_cache(
    qmodel: QuantModel,
    unit_name: str,
    data: CalibrationCalls,
    *,
    keep: tuple[str, ...] = ("q",),
    q_state: tuple[bool, bool] = (True, False),
    fp_model: nn.Module | None = None,
    options: CacheOptions | None = None,
    propagated: tuple[Any, Any] | None = None,
) -> UnitCache:
    """Cache unit ``unit_name`` over ``data`` (see the module docstring).

    Args:
        keep: which inputs to store: ``q`` (x_in^q) and/or ``fp`` (x_in^fp). y^fp is always stored.
        q_state: (weights, acts) quantization of the whole model while x_in^q is captured; the
            units already reconstructed carry their final state (hard rounding, learned steps).
        fp_model: the float model to take x_in^fp and y^fp from (same module names); by default
            ``qmodel`` itself with all quantization switched off.
        propagated: (float, quantized) :class:`~diffquant.recon.propagate.Propagation` objects
            paused at this unit for some of the batches (the quantized one may be None when
            ``keep`` has no ``q``): those batches are taken from them (the float one then runs on
            through the unit to the next), the others are run from the network input.
    """
    options = options or CacheOptions()
    bad = [k for k in keep if k not in INPUT_KINDS]
    if bad or not keep:
        raise ConfigError(f"keep must name inputs among {INPUT_KINDS}, got {keep!r}")
    n = len(data)
    if n == 0:
        raise ConfigError("the calibration set is empty")
    budget = _Budget(options)
    storage_dtype = CACHE_DTYPES[options.dtype]
    records = {kind: CallRecord(n, storage_dtype, budget) for kind in keep}
    stored: dict[str, Any] = {}

    def store_target(index: slice, y: Tensor) -> None:
        if "targets" not in stored:
            dtype = storage_dtype if y.is_floating_point() else y.dtype
            stored["targets"] = TensorStore(n, tuple(y.shape[1:]), dtype, budget)
            stored["dtype"] = y.dtype
        stored["targets"].write(index, y)

    slices = list(data.slices(options.batch_size, bool(qmodel.timestep_index.timesteps)))
    if propagated is not None:
        fp, q = propagated
        for kind, prop in (("fp", fp), ("q", q)):
            if kind in records:
                for index, args, kwargs in prop.calls():
                    records[kind].write(index, args, kwargs)
        for fwd, y in fp.advance():
            store_target(fwd.index, first_tensor(y))
        done = {(f.index.start, f.index.stop) for f in fp.forwards}
        slices = [s for s in slices if (s.start, s.stop) not in done]
    if slices:
        capture = dict(record=records.get("fp"), on_output=store_target, slices=slices)
        if fp_model is not None:
            _capture(fp_model, unit_name, data, **capture)
        else:
            with quant_state(qmodel, weights=False, acts=False):
                _capture(qmodel, unit_name, data, **capture)
        if "q" in records:
            with quant_state(qmodel, *q_state):
                _capture(qmodel, unit_name, data, record=records["q"], on_output=None, slices=slices)
    return UnitCache(unit_name, n, stored["targets"], stored["dtype"], data.timesteps.detach().cpu().clone(),
                     q_inputs=records.get("q"), fp_inputs=records.get("fp"), _budget=budget)
