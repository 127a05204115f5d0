"""Disk-backed store of sampling trajectories: tensors shaped [K steps, n samples, ...].

Layout of a cache directory::

    index.json                          settings, hash, timesteps, labels, shard list
    shard-s{a}-{b}-k{c}-{d}.safetensors  "x" and "feature:<name>" tensors for samples a..b-1,
                                         steps c..d-1, each shaped [d-c, b-a, ...]

The writer keeps at most ``memory_limit_bytes`` of complete steps in RAM before flushing a shard
(one step at least); the reader reads lazily with safetensors slices, so opening a cache costs
nothing and a query loads only the steps and sample ranges it touches.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from diffquant.errors import DiffquantError
from diffquant.jsonio import write_json

INDEX_FILE = "index.json"
FORMAT_VERSION = 1
X_KEY = "x"
FEATURE_PREFIX = "feature:"
UNCOND_SUFFIX = "@uncond"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    raise DiffquantError(f"unsupported cache dtype {dtype}: use float32, float16 or bfloat16")


def feature_key(name: str) -> str:
    return FEATURE_PREFIX + name


@dataclass(frozen=True)
class Shard:
    file: str
    sample_start: int
    sample_end: int
    step_start: int
    step_end: int

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


class TrajectoryWriter:
    """Buffers one batch's per-step tensors and flushes them as shards under a memory limit.

    Call :meth:`begin_batch`, then per step :meth:`add` (x_t first, features during the denoiser
    call), then :meth:`end_batch`. ``peak_buffer_bytes`` records the largest buffer held.
    """

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 memory_limit_bytes: int = 1 << 30):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.memory_limit_bytes = int(memory_limit_bytes)
        self.shards: list[Shard] = []
        self.entry_shapes: dict[str, list[int]] = {}
        self.peak_buffer_bytes = 0
        self._batch: tuple[int, int] | None = None
        self._steps: dict[int, dict[str, Tensor]] = {}
        self._bytes = 0
        self._step_bytes = 0

    def begin_batch(self, sample_start: int, sample_end: int) -> None:
        if self._batch is not None:
            raise RuntimeError("end_batch() was not called")
        self._batch = (sample_start, sample_end)

    def add(self, step: int, key: str, value: Tensor) -> None:
        """Store ``value`` ([batch, ...]) as ``key`` at ``step``; opening a new step may flush."""
        if self._batch is None:
            raise RuntimeError("begin_batch() was not called")
        start, end = self._batch
        if value.shape[0] != end - start:
            raise DiffquantError(f"{key}: leading dimension {value.shape[0]} != batch size {end - start}")
        if step not in self._steps:
            if self._steps and self._bytes + self._step_bytes > self.memory_limit_bytes:
                self._flush()
            self._steps[step] = {}
            self._step_bytes = 0
        if key in self._steps[step]:
            return  # a module called twice in one denoiser call: keep the first input
        stored = value.detach().to(device="cpu", dtype=self.dtype).contiguous()
        shape = list(stored.shape[1:])
        if self.entry_shapes.setdefault(key, shape) != shape:
            raise DiffquantError(f"{key}: shape {shape} differs from earlier {self.entry_shapes[key]}")
        self._steps[step][key] = stored
        self._bytes += stored.numel() * stored.element_size()
        self._step_bytes += stored.numel() * stored.element_size()
        self.peak_buffer_bytes = max(self.peak_buffer_bytes, self._bytes)

    def _flush(self) -> None:
        if not self._steps:
            return
        start, end = self._batch
        steps = sorted(self._steps)
        k0, k1 = steps[0], steps[-1] + 1
        if steps != list(range(k0, k1)):
            raise RuntimeError(f"non-contiguous steps in buffer: {steps}")
        keys = list(self._steps[k0])
        tensors = {}
        for key in keys:
            missing = [k for k in steps if key not in self._steps[k]]
            if missing:
                raise DiffquantError(f"{key} was not recorded at step {missing[0]}")
            tensors[key] = torch.stack([self._steps[k][key] for k in steps])
        name = f"shard-s{start:07d}-{end:07d}-k{k0:04d}-{k1:04d}.safetensors"
        save_file(tensors, str(self.path / name))
        self.shards.append(Shard(name, start, end, k0, k1))
        self._steps = {}
        self._bytes = 0

    def end_batch(self) -> None:
        self._flush()
        self._batch = None


class TrajectoryCache:
    """Read access to a finished trajectory cache (see the module docstring)."""

    def __init__(self, path: Path, index: dict[str, Any]):
        self.path = path
        self.index = index
        self.shards = [Shard(**s) for s in index["shards"]]
        self.timesteps = torch.as_tensor(index["timesteps"], dtype=torch.long)
        labels = index.get("labels")
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.null_class: int | None = index.get("null_class")
        self.sample_shape = tuple(index["entry_shapes"][X_KEY])
        self.dtype = _DTYPES[index["dtype"]]
        self.peak_buffer_bytes: int | None = None  # set by capture_trajectories when it wrote the cache

    @classmethod
    def open(cls, path: str | os.PathLike) -> "TrajectoryCache":
        path = Path(path)
        index_file = path / INDEX_FILE
        if not index_file.is_file():
            raise DiffquantError(f"no trajectory cache at {path} (missing {INDEX_FILE})")
        try:
            index = json.loads(index_file.read_text())
        except json.JSONDecodeError as err:
            raise DiffquantError(f"{index_file}: not valid JSON ({err})") from err
        if index.get("format_version") != FORMAT_VERSION:
            raise DiffquantError(f"{index_file}: unsupported format version {index.get('format_version')}")
        return cls(path, index)

    @staticmethod
    def is_complete(path: str | os.PathLike, settings_hash: str) -> bool:
        """True when ``path`` holds a finished cache made with the given settings hash."""
        index_file = Path(path) / INDEX_FILE
        if not index_file.is_file():
            return False
        try:
            index = json.loads(index_file.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return index.get("hash") == settings_hash and all(
            (Path(path) / s["file"]).is_file() for s in index.get("shards", [])
        )

    @property
    def num_steps(self) -> int:
        return int(self.index["num_steps"])

    @property
    def num_samples(self) -> int:
        return int(self.index["num_samples"])

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.index["settings"])

    @property
    def hash(self) -> str:
        return str(self.index["hash"])

    @property
    def feature_names(self) -> list[str]:
        return [k[len(FEATURE_PREFIX):] for k in self.index["entry_shapes"] if k.startswith(FEATURE_PREFIX)]

    def entry_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.index["entry_shapes"][key])

    def read(self, key: str, steps: Sequence[int] | Tensor, samples: Sequence[int] | Tensor) -> Tensor:
        """Entries (steps[j], samples[j]) of ``key`` ("x" or "feature:<name>"), shaped [M, ...]."""
        if key not in self.index["entry_shapes"]:
            raise DiffquantError(f"the cache has no {key!r} (has {', '.join(self.index['entry_shapes'])})")
        steps = torch.as_tensor(steps, dtype=torch.long).reshape(-1)
        samples = torch.as_tensor(samples, dtype=torch.long).reshape(-1)
        if steps.shape != samples.shape:
            raise ValueError("steps and samples must have the same length")
        if steps.numel() and (steps.min() < 0 or steps.max() >= self.num_steps):
            raise DiffquantError(f"step index outside 0..{self.num_steps - 1}")
        if samples.numel() and (samples.min() < 0 or samples.max() >= self.num_samples):
            raise DiffquantError(f"sample index outside 0..{self.num_samples - 1}")
        out = torch.empty((steps.numel(), *self.entry_shape(key)), dtype=self.dtype)
        filled = torch.zeros(steps.numel(), dtype=torch.bool)
        for shard in self.shards:
            hit = ((steps >= shard.step_start) & (steps < shard.step_end)
                   & (samples >= shard.sample_start) & (samples < shard.sample_end))
            if not hit.any():
                continue
            where = hit.nonzero().reshape(-1)
            with safe_open(str(self.path / shard.file), framework="pt", device="cpu") as f:
                view = f.get_slice(key)
                for k in steps[where].unique().tolist():
                    sel = where[steps[where] == k]
                    local = samples[sel] - shard.sample_start
                    lo, hi = int(local.min()), int(local.max()) + 1
                    block = view[k - shard.step_start, lo:hi]
                    out[sel] = block[local - lo]
            filled[where] = True
        if not bool(filled.all()):
            j = int((~filled).nonzero()[0])
            raise DiffquantError(f"cache {self.path} is missing step {int(steps[j])}, sample {int(samples[j])}")
        return out

    def xs(self, step: int, samples: Sequence[int] | Tensor | None = None) -> Tensor:
        """x_t at step ``step`` for the given samples (all by default), [m, C, H, W]."""
        samples = torch.arange(self.num_samples) if samples is None else torch.as_tensor(samples)
        return self.read(X_KEY, torch.full_like(samples, step), samples)

    def features(self, name: str, step: int, samples: Sequence[int] | Tensor | None = None) -> Tensor:
        """The recorded input of feature hook ``name`` at ``step`` (``name@uncond``: CFG half)."""
        samples = torch.arange(self.num_samples) if samples is None else torch.as_tensor(samples)
        return self.read(feature_key(name), torch.full_like(samples, step), samples)

    def __repr__(self) -> str:
        return (f"TrajectoryCache({str(self.path)!r}, steps={self.num_steps}, samples={self.num_samples}, "
                f"features={self.feature_names})")


def write_index(path: Path, *, settings: dict[str, Any], settings_hash: str, timesteps: Sequence[int],
                labels: Sequence[int] | None, null_class: int | None, dtype: torch.dtype,
                entry_shapes: dict[str, list[int]], shards: Sequence[Shard]) -> None:
    """Write ``index.json`` atomically (a cache is complete once its index exists)."""
    index = {
        "format_version": FORMAT_VERSION,
        "hash": settings_hash,
        "settings": settings,
        "num_steps": len(timesteps),
        "num_samples": int(settings["n"]),
        "timesteps": [int(t) for t in timesteps],
        "labels": None if labels is None else [int(c) for c in labels],
        "null_class": null_class,
        "dtype": dtype_name(dtype),
        "entry_shapes": entry_shapes,
        "shards": [s.to_json() for s in sorted(shards, key=lambda s: (s.sample_start, s.step_start))],
    }
    write_json(path / INDEX_FILE, index, indent=1)
