"""The stage contract: one registered class per step of a recipe, with a typed option block.

A recipe (:class:`~diffquant.recipes.recipe.Recipe`) is an ordered list of stages. Each stage
declares

- ``Options``: a ``@checked`` dataclass, every knob with its one default, bounds and a one-line
  description (:func:`diffquant.config.knob`);
- ``family``: what it does (selection, coverage, scaling, bit_allocation, weight_init,
  weight_rounding, activation_init, activation_recon, pts, finetune);
- ``provides`` / ``requires`` / ``before``: facts that make the order checkable — a stage may only
  run after stages that provide what it ``requires``, and only while none of its ``before`` facts
  has been provided (LES must scale the weights *before* they are initialised);
- up to five hooks, each a no-op by default: ``wrap_config`` (knobs fixed before wrapping),
  ``capture_options`` / ``select`` (calibration data), ``prepare`` (structural changes to the
  wrapped model, before a checkpoint is restored) and ``run`` (the work, resumable).

The runtime inputs travel in one :class:`StageContext`: calibration set, denoiser call, float
model, bundle, guidance, work dir, device, progress switch, and the shared engine pieces (the
calibration calls, the one checkpoint store, the records) that stages hand to each other.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..config import checked

#: runs calibration data through a model: ``forward_loop(model)``
ForwardLoop = Callable[[nn.Module], None]

FAMILIES = ("selection", "coverage", "scaling", "bit_allocation", "weight_init", "weight_rounding",
            "activation_init", "activation_recon", "pts", "finetune")


@dataclass
@checked
class NoOptions:
    """A stage without options."""


def machine_memory_mb() -> float:
    """Physical memory of this machine in MB (inf where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (ValueError, OSError, AttributeError):
        return float("inf")


@dataclass
@checked
class EngineSettings:
    """Knobs every stage of one recipe shares (seed, unit caches, loss reports)."""

    seed: int = 0
    #: float32 | float16 storage of the unit caches
    cache_dtype: str = "float32"
    #: auto | memory | disk
    cache_storage: str = "auto"
    cache_memory_mb: float = 4096.0
    #: auto (one propagation through the units when it fits the memory limit) | rerun (each unit
    #: cache from the input); the results are bit-identical, only time differs
    cache_propagation: str = "auto"
    #: cached samples on which each unit's initial/final loss is reported
    eval_samples: int = 256
    #: a resume checkpoint is written after a unit (or epoch) only when this many seconds have
    #: passed since the last one (0: after every unit); a resumed run redoes the units after it
    checkpoint_every_s: float = 30.0

    def __post_init__(self) -> None:
        from ..errors import ConfigError
        from ..recon.cache import CacheOptions

        if self.checkpoint_every_s < 0:
            raise ConfigError(f"checkpoint_every_s must be >= 0, got {self.checkpoint_every_s}")
        if self.eval_samples < 1:
            raise ConfigError(f"eval_samples must be >= 1, got {self.eval_samples}")
        CacheOptions(dtype=self.cache_dtype, storage=self.cache_storage, memory_limit_mb=self.cache_memory_mb,
                     propagation=self.cache_propagation)


@dataclass
class StageContext:
    """What a stage's ``prepare`` / ``run`` get besides the model."""

    calib_set: Any = None
    call: Callable | None = None
    fp_model: nn.Module | None = None
    bundle: Any = None
    forward_loop: ForwardLoop | None = None
    guidance: float | None = None
    work_dir: Path | None = None
    device: str | torch.device = "cpu"
    progress: bool = True
    engine: EngineSettings = field(default_factory=EngineSettings)
    # -- filled by the runner
    data: Any = None  # CalibrationCalls over calib_set
    checkpoints: Any = None  # the recipe's one ReconProgress (None without work_dir or passes)
    fingerprint: str = ""
    records: list = field(default_factory=list)  # UnitRecords of the reconstruction-style stages
    #: products one stage hands to a later one (e.g. the mixed-precision layer list)
    shared: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.work_dir is not None:
            self.work_dir = Path(self.work_dir)

    def cache_options(self):
        from ..recon.cache import CacheOptions

        e = self.engine
        limit = min(e.cache_memory_mb, machine_memory_mb() / 4)  # never more than the machine can hold
        return CacheOptions(dtype=e.cache_dtype, storage=e.cache_storage, memory_limit_mb=limit,
                            propagation=e.cache_propagation,
                            directory=None if self.work_dir is None else str(self.work_dir / "unit_cache"))

    def engine_options(self):
        from ..recon.engine import EngineOptions

        return EngineOptions(seed=self.engine.seed, device=self.device, eval_samples=self.engine.eval_samples,
                             progress=self.progress, cache=self.cache_options())

    def schedule(self) -> list[int]:
        """The calibration set's timestep schedule (per-step tables, LES weighting)."""
        if "schedule" not in self.shared:
            from ..recon.time_weight import calibration_schedule, timestep_buckets

            schedule = calibration_schedule(self.calib_set.ts, self.calib_set.steps)
            self.shared["schedule"] = schedule
            self.shared["buckets"] = timestep_buckets(self.calib_set.ts, schedule)
        return self.shared["schedule"]

    def buckets(self):
        self.schedule()
        return self.shared["buckets"]


class Stage:
    """Base class of every recipe stage (see the module docstring)."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    provides: ClassVar[frozenset[str]] = frozenset()
    requires: ClassVar[frozenset[str]] = frozenset()
    before: ClassVar[frozenset[str]] = frozenset()
    #: the run needs the calibration set itself (not only a forward loop)
    uses_calib_set: ClassVar[bool] = False
    #: names of the checkpointed passes the stage can run (for the order check)
    pass_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Any = None, **overrides: Any):
        from ..config import from_dict, to_dict

        if options is None:
            options = self.Options()
        elif isinstance(options, dict):
            options = from_dict(self.Options, options)
        elif not isinstance(options, self.Options):
            from ..errors import ConfigError

            raise ConfigError(f"stage {self.name}: options must be a {self.Options.__name__}, "
                              f"got {type(options).__name__}")
        if overrides:
            options = from_dict(self.Options, {**to_dict(options), **overrides})
        self.options = options

    # ---------------------------------------------------------------- description
    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def to_dict(self) -> dict:
        from ..config import to_dict

        return {self.name: to_dict(self.options)}

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options == self.options  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    def facts(self) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
        """(provides, requires, before) of this stage with its options (see the module docstring)."""
        return self.provides, self.requires, self.before

    def declared_passes(self) -> tuple[str, ...]:
        return self.pass_names

    # ---------------------------------------------------------------- hooks
    def active(self, qmodel) -> bool:
        """Whether the stage has anything to do on ``qmodel`` (e.g. no LSQ without activation quantizers)."""
        return True

    def needs_calib_set(self, qmodel) -> bool:
        return self.uses_calib_set

    def wrap_overrides(self, quant) -> dict:
        """QuantConfig fields this stage fixes before wrapping (``{}``: none)."""
        return {}

    def check_calibration(self, steps: int) -> None:
        """Options that depend on the calibration schedule, checked before any capture."""

    def capture_options(self, unet: nn.Module, example_inputs) -> dict:
        """Extra ``capture_trajectories`` arguments (e.g. TDAC's feature hook)."""
        return {}

    def select(self, cache):
        """Selection stages: the calibration set from captured trajectories."""
        raise NotImplementedError

    def passes(self, qmodel) -> list[str]:
        """Names of the checkpointed passes this stage runs on ``qmodel`` (in order); by default
        its ``pass_names`` (a stage whose passes depend on the model overrides this)."""
        return list(self.pass_names)

    def prepare(self, qmodel, ctx: StageContext) -> None:
        """Structural changes to the wrapped model (before any checkpoint is restored)."""

    def resumed(self, qmodel, ctx: StageContext) -> bool:
        """Whether a restored checkpoint already holds (part of) this stage's work."""
        return ctx.checkpoints is not None and any(ctx.checkpoints.started(p) for p in self.passes(qmodel))

    def run(self, qmodel, ctx: StageContext) -> None:
        """The stage's work; a stage with passes resumes from ``ctx.checkpoints``."""

    def finish(self, qmodel, ctx: StageContext) -> None:
        """After every stage ran: records the stage keeps on the model."""


def options_table(cls: type[Stage]) -> list[dict]:
    """(name, type, default, description) of every option of stage ``cls``."""
    from ..config import _describe, _hints  # one place for type descriptions

    hints = _hints(cls.Options)
    rows = []
    for f in dataclasses.fields(cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append({"option": f.name, "type": _describe(hints.get(f.name, Any)), "default": default,
                     "doc": f.metadata.get("doc", "")})
    return rows
