"""Calibration data capture (docs/methods.md §1.5) and a generic module input/output recorder.

:func:`capture_trajectories` runs ONE full-precision sampling pass per batch of trajectories and
records, at every step k, x_t (before CFG duplication), t_k, the class and null labels, and the
inputs of requested feature modules. The denoiser is called exactly K times per batch (CFG is one
doubled call). Results go to a :class:`~diffquant.calib.cache.TrajectoryCache` whose directory
name is a hash of everything that produced it, so a repeated run reuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffquant.calib.cache import (
    UNCOND_SUFFIX, X_KEY, Shard, TrajectoryCache, TrajectoryWriter, dtype_name, feature_key, write_index,
)
from diffquant.diffusion import distributed
from diffquant.diffusion.sampling import resolve_labels, sample, scheduler_timesteps
from diffquant.errors import ConfigError, DiffquantError
from diffquant.calib.select import check_finite_inputs
from diffquant.calib.stop import run_stoppable, stop_forward
from diffquant.paths import cache_dir as default_cache_root
from diffquant.bundle import DiffusionBundle
from diffquant.jsonio import write_json

CACHE_FORMAT = "trajectories-v1"
PART_PREFIX = "part-rank"


def model_fingerprint(module: nn.Module) -> str:
    """A cheap fingerprint of a module's weights (shapes, sums and absolute sums, in key order)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for _, tensor in sorted(module.state_dict().items()):
            h.update(str(tuple(tensor.shape)).encode())
            if tensor.is_floating_point() or tensor.is_complex():
                t = tensor.detach().double()
                h.update(struct.pack("<dd", float(t.sum()), float(t.abs().sum())))
            elif tensor.numel():
                h.update(struct.pack("<q", int(tensor.long().sum())))
    return h.hexdigest()[:16]


def _module_names(unet: nn.Module, hooks: Mapping[str, nn.Module]) -> dict[str, str]:
    by_id = {id(m): name for name, m in unet.named_modules()}
    return {name: f"{type(m).__name__}:{by_id.get(id(m), '?')}" for name, m in hooks.items()}


def capture_settings(bundle: DiffusionBundle, n: int, *, steps: int, scheduler: str, eta: float,
                     guidance: float, classes: Sequence[int] | None, seed: int, dtype: torch.dtype,
                     feature_hooks: Mapping[str, nn.Module]) -> dict[str, Any]:
    """Everything that determines a cache's contents (the batch size and device do not)."""
    return {
        "format": CACHE_FORMAT,
        "model": bundle.name,
        "weights": model_fingerprint(bundle.unet),
        "sample_shape": list(bundle.sample_shape),
        "scheduler_config": bundle.scheduler_config,
        "n": int(n),
        "steps": int(steps),
        "scheduler": scheduler,
        "eta": float(eta),
        "guidance": float(guidance),
        "classes": None if classes is None else [int(c) for c in classes],
        "seed": int(seed),
        "dtype": dtype_name(dtype),
        "features": _module_names(bundle.unet, feature_hooks),
    }


def settings_hash(settings: Mapping[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


class _StepRecorder:
    """Feeds the writer from the sampler's step callback and from feature pre-hooks."""

    def __init__(self, writer: TrajectoryWriter, cfg_doubled: bool):
        self.writer = writer
        self.cfg_doubled = cfg_doubled
        self.step = -1
        self.batch = 0
        self.batch_index = 0
        self.timesteps: list[int] = []
        self.calls = 0

    def on_step(self, k: int, t: int, x_t: Tensor, labels: Tensor | None) -> None:
        check_finite_inputs(x_t, f"calibration capture batch {self.batch_index} at step {k} (t={int(t)})",
                            lambda i: f"sample {i} of the batch")
        self.step = k
        self.batch = x_t.shape[0]
        if len(self.timesteps) == k:
            self.timesteps.append(int(t))
        elif self.timesteps[k] != int(t):
            raise RuntimeError(f"step {k}: timestep {t} differs from the first batch's {self.timesteps[k]}")
        self.writer.add(k, X_KEY, x_t)

    def hook(self, name: str) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], Tensor):
                raise DiffquantError(f"feature hook {name!r}: the module's first input is not a tensor")
            value = args[0]
            if self.cfg_doubled:
                if value.shape[0] != 2 * self.batch:
                    raise DiffquantError(f"feature hook {name!r}: leading dimension {value.shape[0]} "
                                         f"is not the doubled batch {2 * self.batch}")
                self.writer.add(self.step, feature_key(name), value[: self.batch])
                self.writer.add(self.step, feature_key(name + UNCOND_SUFFIX), value[self.batch:])
            else:
                self.writer.add(self.step, feature_key(name), value)
        return pre_hook


def _cache_path(cache_dir: str | os.PathLike | None, digest: str) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_root() / "trajectories"
    return root / f"traj-{digest[:16]}"


def _cache_with_more_features(root: Path, settings: Mapping[str, Any]) -> Path | None:
    """A complete cache under ``root`` made with the same settings but extra feature hooks.

    Feature hooks only record inputs, so its trajectories are the ones a capture with fewer
    hooks would produce; reusing it saves a full sampling pass (e.g. a uniform-selection run
    after a TDAC run on the same trajectories).
    """
    want = settings_hash({k: v for k, v in settings.items() if k != "features"})
    want_features = settings.get("features", {}).items()
    candidates = sorted(root.glob("traj-*")) if root.is_dir() else []
    for candidate in candidates:
        try:
            index = json.loads((candidate / "index.json").read_text())
            theirs = dict(index["settings"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        features = theirs.pop("features", {})
        if (settings_hash(theirs) == want and want_features <= features.items()
                and TrajectoryCache.is_complete(candidate, index.get("hash", ""))):
            return candidate
    return None


def capture_trajectories(bundle: DiffusionBundle, n: int, *, steps: int = 50, scheduler: str = "ddim",
                         eta: float = 0.0, guidance: float = 1.0, classes: Sequence[int] | None = None,
                         seed: int = 0, batch_size: int = 64, device: str | torch.device = "cpu",
                         cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                         memory_limit_mb: float = 1024, feature_hooks: Mapping[str, nn.Module] | None = None,
                         reuse: bool = True, progress: bool = True) -> TrajectoryCache:
    """Sample ``n`` full-precision trajectories and store every step in a trajectory cache.

    The cache lives in ``cache_dir/traj-<hash>`` (``cache_dir`` defaults to the diffquant cache);
    with ``reuse`` an existing complete cache with the same settings (or the same settings and more
    feature hooks) is returned without sampling.
    ``feature_hooks`` maps names to modules of ``bundle.unet`` whose first positional input is
    recorded at every step (under CFG the cond half as ``name`` and the uncond half as
    ``name@uncond``). Works under torch.distributed: each rank captures its own samples into the
    shared directory and rank 0 writes the index.
    """
    if n < 1:
        raise ConfigError(f"number of trajectories must be >= 1, got {n}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if memory_limit_mb <= 0:
        raise ConfigError(f"memory limit must be > 0 MB, got {memory_limit_mb}")
    hooks = dict(feature_hooks or {})
    settings = capture_settings(bundle, n, steps=steps, scheduler=scheduler, eta=eta, guidance=guidance,
                                classes=classes, seed=seed, dtype=dtype, feature_hooks=hooks)
    digest = settings_hash(settings)
    path = _cache_path(cache_dir, digest)
    info = distributed.dist_info()

    if reuse and distributed.all_agree(TrajectoryCache.is_complete(path, digest)):
        return TrajectoryCache.open(path)
    wider = _cache_with_more_features(path.parent, settings) if reuse else None
    if distributed.all_agree(wider is not None):
        return TrajectoryCache.open(wider)
    if info.is_main:
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    distributed.barrier()

    labels_all = resolve_labels(bundle, range(n), classes)
    timesteps = scheduler_timesteps(bundle.scheduler_config, scheduler, steps)
    writer = TrajectoryWriter(path, dtype=dtype, memory_limit_bytes=int(memory_limit_mb * 2**20))
    cfg_doubled = guidance != 1.0 and bundle.is_conditional
    recorder = _StepRecorder(writer, cfg_doubled)
    mine = distributed.shard_indices(n, info.rank, info.world_size)
    batches = [range(s, min(s + batch_size, mine.stop)) for s in range(mine.start, mine.stop, batch_size)]

    handles = [m.register_forward_pre_hook(recorder.hook(name)) for name, m in hooks.items()]
    bar = tqdm(total=len(batches) * len(timesteps), desc=f"capturing {bundle.name}",
               disable=not progress or not info.is_main, leave=False)

    def on_step(k: int, t: int, x_t: Tensor, labels: Tensor | None) -> None:
        recorder.on_step(k, t, x_t, labels)
        bar.update(1)

    try:
        for i, batch in enumerate(batches):
            recorder.batch_index = i
            writer.begin_batch(batch.start, batch.stop)
            sample(bundle, len(batch), seed=seed, start_index=batch.start, scheduler=scheduler,
                   steps=steps, eta=eta, guidance=guidance, classes=classes, batch_size=len(batch),
                   device=device, progress=False, step_callback=on_step, distributed_mode=False)
            writer.end_batch()
    except DiffquantError:
        if not info.is_distributed:
            shutil.rmtree(path, ignore_errors=True)  # leave no half-written cache behind
        raise
    finally:
        for h in handles:
            h.remove()
        bar.close()

    part = {"shards": [s.to_json() for s in writer.shards], "entry_shapes": writer.entry_shapes,
            "peak_buffer_bytes": writer.peak_buffer_bytes}
    write_json(path / f"{PART_PREFIX}{info.rank}.json", part, indent=None)
    distributed.barrier()
    if info.is_main:
        shards: list[Shard] = []
        entry_shapes: dict[str, list[int]] = {}
        for r in range(info.world_size):
            part_file = path / f"{PART_PREFIX}{r}.json"
            rank_part = json.loads(part_file.read_text())
            shards += [Shard(**s) for s in rank_part["shards"]]
            entry_shapes.update(rank_part["entry_shapes"])
            part_file.unlink()
        write_index(path, settings=settings, settings_hash=digest, timesteps=timesteps.tolist(),
                    labels=None if labels_all is None else labels_all.tolist(),
                    null_class=bundle.null_class if bundle.is_conditional else None, dtype=dtype,
                    entry_shapes=entry_shapes, shards=shards)
    distributed.barrier()
    cache = TrajectoryCache.open(path)
    cache.peak_buffer_bytes = writer.peak_buffer_bytes  # this process's writer, for diagnostics
    return cache


# ----------------------------------------------------------------------------------------------
# Generic module input/output capture

@dataclass
class ModuleIO:
    """What one module saw in a forward: positional ``inputs``, ``kwargs`` and ``output``.

    Unpacks as ``inputs, output = io``.
    """

    inputs: tuple
    output: Any
    kwargs: dict[str, Any]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.inputs, self.output))


def _detached(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def capture_module_io(model: nn.Module, modules: Mapping[str, nn.Module], run: Callable[[], Any],
                      stop_after: str | None = None, detach: bool = True) -> dict[str, ModuleIO]:
    """Record the inputs and output of ``modules`` during ``run()`` (typically a forward of ``model``).

    Only each module's first call is recorded. With ``stop_after`` the forward is aborted right
    after that module has run, so later layers cost nothing. Hooks are always removed.
    """
    if stop_after is not None and stop_after not in modules:
        raise ValueError(f"stop_after={stop_after!r} is not one of the captured modules")
    own = {id(m) for m in model.modules()}
    strangers = [name for name, m in modules.items() if id(m) not in own]
    if strangers:
        raise ValueError(f"module {strangers[0]!r} is not part of the model")
    records: dict[str, ModuleIO] = {}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if name not in records:
                keep = _detached if detach else (lambda v: v)
                records[name] = ModuleIO(keep(args), keep(output), keep(dict(kwargs)))
            if name == stop_after:
                stop_forward()
        return hook

    handles = [m.register_forward_hook(make_hook(name), with_kwargs=True) for name, m in modules.items()]
    try:
        run_stoppable(run)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in modules if name not in records]
    if stop_after is None and missing:
        raise DiffquantError(f"module {missing[0]!r} was not called during the forward")
    return records
