"""The reconstruction engine shared by Q-Diffusion, EDA-DM and DMQ (docs/methods.md §1.6).

For each unit in order: build its cache (:mod:`.cache`; its inputs from one propagation of the
calibration set through the units, :mod:`.propagate`, or rebuilt from the network input where that
does not fit in memory) → optimise the unit's trainable tensors for
N iterations, each on B distinct random cached samples → harden / freeze → checkpoint. *What* is
trained and how the loss is formed is a :class:`ReconPass` (AdaRound weights, LSQ activation
steps, a joint EDA-DM pass, ...); the engine only runs the loop.

Determinism: unit i of pass P is optimised inside ``torch.random.fork_rng`` seeded from
(seed, P, i), and its batches come from a generator with the same seed, so a run resumed from a
checkpoint (:mod:`.progress`) ends in the same state as an uninterrupted one, and the caller's
global RNG is left untouched.

Each unit's loss is measured on a fixed evaluation subset (``eval_samples`` cached samples spread
evenly over the set, hence over its timesteps) before the pass touches it — e.g. round-to-nearest
weights, initial activation ranges — and after it has been hardened; these are the ``initial_loss`` / ``final_loss`` of its record.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..model.qmodel import QuantModel
from ..quant.quantizer import UniformQuantizer
from ..diffusion import distributed
from .cache import CacheOptions, CalibrationCalls, UnitCache, build_unit_cache, first_tensor, random_batches
from .propagate import Propagation, PropagationUnavailable, frontier_bytes
from .loss import lp_loss
from .progress import ReconProgress
from .state import quant_state
from .units import Unit
from ..config import checked

log = logging.getLogger("diffquant.recon")
INPUT_SOURCES = ("q", "fp", "both")


@dataclass
class UnitOptim:
    """The optimisers (and LR schedulers, stepped once per iteration) of one unit."""

    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    schedulers: list = field(default_factory=list)


@dataclass
class UnitRecord:
    """What happened to one unit in one pass."""

    name: str
    kind: str
    pass_name: str
    iterations: int
    initial_loss: float | None
    final_loss: float | None
    skipped: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class ReconPass:
    """One kind of reconstruction, applied unit by unit. Subclasses override the hooks.

    Attributes:
        name: the pass name (checkpoints, records, seeds).
        inputs: which cached inputs the unit is fed: ``q`` (x_in^q), ``fp`` (x_in^fp) or ``both``
            (both cached; :meth:`unit_inputs` decides, e.g. EDA-DM's mixing).
        quant_state: (weights, acts) quantization of the model while x_in^q is captured and the
            unit is trained.
        iters, batch_size: N iterations of B distinct random samples per unit.
        p: exponent of the reconstruction loss :func:`lp_loss`.
    """

    name = "recon"
    inputs = "q"
    quant_state: tuple[bool, bool] = (True, False)

    def __init__(self, iters: int, batch_size: int = 32, p: float = 2.0):
        if iters < 0:
            raise ConfigError(f"{self.name}: iterations must be >= 0, got {iters}")
        if batch_size < 1:
            raise ConfigError(f"{self.name}: batch size must be >= 1, got {batch_size}")
        if self.inputs not in INPUT_SOURCES:
            raise ConfigError(f"{self.name}: inputs must be one of {INPUT_SOURCES}, got {self.inputs!r}")
        self.iters = int(iters)
        self.batch_size = int(batch_size)
        self.p = float(p)

    # ------------------------------------------------------------------ hooks
    def applies(self, unit: Unit) -> bool:
        """False skips the unit (nothing to learn in it for this pass)."""
        return True

    def setup(self, unit: Unit) -> UnitOptim:
        """Make the unit's tensors trainable; return their optimisers."""
        raise NotImplementedError

    def unit_inputs(self, cache: UnitCache, index: Tensor, device, training: bool) -> tuple[tuple, dict]:
        """The unit's (args, kwargs) for the samples at ``index``."""
        return cache.inputs(index, "fp" if self.inputs == "fp" else "q", device)

    def rec_loss(self, unit: Unit, pred: Tensor, target: Tensor) -> Tensor:
        return lp_loss(pred, target, self.p)

    def loss(self, unit: Unit, pred: Tensor, target: Tensor, count: int) -> Tensor:
        """The training loss at iteration ``count`` (1-based); default: the reconstruction loss."""
        return self.rec_loss(unit, pred, target)

    def training_loss(self, unit: Unit, cache: UnitCache, index: Tensor, device, count: int) -> Tensor:
        """The loss of training iteration ``count`` (1-based) on the cached samples at ``index``.

        Default: the unit on :meth:`unit_inputs` against the cached y^fp, through :meth:`loss`.
        Passes that need more than one forward per iteration (EDA-DM's FBR) override this.
        """
        args, kwargs = self.unit_inputs(cache, index, device, training=True)
        pred = first_tensor(unit.module(*args, **kwargs))
        return self.loss(unit, pred, cache.target(index, device), count)

    def after_step(self, unit: Unit) -> None:
        """Called after every optimiser step (e.g. to keep steps above their floor)."""

    def finish(self, unit: Unit) -> None:
        """Harden and freeze what the unit learned."""

    # ------------------------------------------------------------------ helpers
    @property
    def keep(self) -> tuple[str, ...]:
        return ("q", "fp") if self.inputs == "both" else (self.inputs,)


@dataclass
@checked
class EngineOptions:
    seed: int = 0
    device: str | torch.device = "cpu"
    #: cached samples (evenly spread over the set) on which each unit's initial / final loss is measured
    eval_samples: int = 256
    cache: CacheOptions = field(default_factory=CacheOptions)
    progress: bool = True


def unit_seed(seed: int, pass_name: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}/{pass_name}/{index}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def _quantizers(module: nn.Module) -> Iterable[UniformQuantizer]:
    return (m for m in module.modules() if isinstance(m, UniformQuantizer))


def _set_quantizer_training(unit: Unit, on: bool) -> None:
    """Only quantizers change with the training flag (QDrop); the unit's own layers stay in eval."""
    for q in _quantizers(unit.module):
        q.train(on)


@torch.no_grad()
def evaluate_unit(unit: Unit, cache: UnitCache, recon_pass: ReconPass, index: Tensor, device) -> float:
    """Mean reconstruction loss of the unit on the cached samples at ``index``."""
    total, count = _loss_sum(unit, cache, recon_pass, index, device)
    return total / max(count, 1)


@torch.no_grad()
def _loss_sum(unit: Unit, cache: UnitCache, recon_pass: ReconPass, index: Tensor, device) -> tuple[float, int]:
    _set_quantizer_training(unit, False)
    total, count = 0.0, 0
    for chunk in index.split(recon_pass.batch_size):
        args, kwargs = recon_pass.unit_inputs(cache, chunk, device, training=False)
        pred = first_tensor(unit.module(*args, **kwargs))
        total += float(recon_pass.rec_loss(unit, pred, cache.target(chunk, device))) * len(chunk)
        count += len(chunk)
    return total, count


def _evaluate_sharded(unit: Unit, cache: UnitCache, recon_pass: ReconPass, index: Tensor, device,
                      shard: range) -> float:
    """:func:`evaluate_unit` over the global ``index`` when each rank caches only its ``shard``."""
    total, count = _loss_sum(unit, cache, recon_pass, distributed.global_to_local(index, shard), device)
    sums = distributed.all_reduce_sum(torch.tensor([total, float(count)], dtype=torch.float64))
    return float(sums[0]) / max(float(sums[1]), 1.0)


def eval_indices(n: int, m: int) -> Tensor:
    """``min(n, m)`` distinct indices spread evenly over 0 … n−1 (calibration sets are step-major,
    so the first samples would all come from the noisiest steps)."""
    if m >= n:
        return torch.arange(n)
    return torch.linspace(0, n - 1, m).round().long().unique()


def _check_tables(unit: Unit, recon_pass: ReconPass) -> None:
    if recon_pass.quant_state[1] and any(q.num_steps > 1 for q in unit.act_quantizers()):
        raise ConfigError(f"{unit.name}: per-timestep activation tables cannot be reconstructed unit by unit "
                          "(the unit is called without its timestep); calibrate them after the pass")


def _fork_devices(device) -> list:
    dev = torch.device(device)
    return [dev.index or 0] if dev.type == "cuda" else []


def _shard_of(data: CalibrationCalls) -> range | None:
    """This rank's contiguous block of the calibration set under torch.distributed, else None."""
    return distributed.my_shard(len(data), "calibration samples")


def _local(data: CalibrationCalls, shard: range | None) -> CalibrationCalls:
    return data if shard is None else data.subset(slice(shard.start, shard.stop))


class _Propagated:
    """The unit inputs of one pass from one propagation (:mod:`.propagate`) of the batches
    ``slices``: a float side paused one unit ahead of the quantized side, which moves through a
    unit only once it is finished. Batches not in ``slices`` are run from the input per unit."""

    def __init__(self, qmodel: QuantModel, units: list[Unit], data: CalibrationCalls, recon_pass: ReconPass,
                 fp_model: nn.Module | None, slices: list[slice]):
        names = [u.name for u in units]
        self.fp = Propagation(fp_model if fp_model is not None else qmodel, names, data, slices=slices, outputs=True,
                              state=None if fp_model is not None else (lambda: quant_state(qmodel, False, False)))
        self.q = Propagation(qmodel, names, data, slices=slices) if "q" in recon_pass.keep else None
        try:
            self.fp.move_on()
            if self.q is not None:
                self.q.move_on()
        except BaseException:
            self.close()
            raise

    def at(self, unit: Unit) -> tuple[Propagation, Propagation | None]:
        """Both sides paused at ``unit`` (for :func:`build_unit_cache`)."""
        if self.q is not None and self.q.current != unit.name:
            self.q.move_on()  # through the unit before, now finished
        return self.fp, self.q

    def skip(self, unit: Unit) -> None:
        self.at(unit)
        self.fp.move_on()

    def close(self) -> None:
        for prop in (self.fp, getattr(self, "q", None)):
            if prop is not None:
                prop.close()


def _open_propagation(qmodel: QuantModel, units: list[Unit], data: CalibrationCalls, recon_pass: ReconPass,
                      fp_model: nn.Module | None, options: CacheOptions) -> _Propagated | None:
    """A propagation of as many leading calibration batches as ``options.memory_limit_mb`` holds
    (the paused forwards' live activations, measured on one batch and scaled by batch size); the
    other batches are run from the input per unit. None when not even one batch fits."""
    if options.propagation == "rerun" or not units:
        return None
    names = [u.name for u in units]
    slices = list(data.slices(options.batch_size, bool(qmodel.timestep_index.timesteps)))
    probe = slices[0]
    with quant_state(qmodel, False, False) if fp_model is None else contextlib.nullcontext():
        held = frontier_bytes(fp_model if fp_model is not None else qmodel, names, data, probe)
    if "q" in recon_pass.keep:
        held += frontier_bytes(qmodel, names, data, probe)
    per_sample = held / (probe.stop - probe.start)
    limit = options.memory_limit_mb * 2**20
    chosen, total = [], 0.0
    for index in slices:
        total += per_sample * (index.stop - index.start)
        if total > limit:
            break
        chosen.append(index)
    if len(chosen) < len(slices):
        log.info("%s: %d of %d calibration batches propagated through the units, the rest run from the input per "
                 "unit (paused forwards would hold %.0f MB > %.0f MB)", recon_pass.name, len(chosen), len(slices),
                 per_sample * len(data) / 2**20, limit / 2**20)
    if not chosen:
        return None
    try:
        return _Propagated(qmodel, units, data, recon_pass, fp_model, chosen)
    except PropagationUnavailable as exc:
        log.info("%s: building each unit cache from the input (%s)", recon_pass.name, exc)
        return None


def _trainable(optim: UnitOptim) -> list[Tensor]:
    return [p for opt in optim.optimizers for group in opt.param_groups for p in group["params"] if p.requires_grad]


def reconstruct_unit(qmodel: QuantModel, unit: Unit, data: CalibrationCalls, recon_pass: ReconPass, *,
                     fp_model: nn.Module | None = None, options: EngineOptions | None = None,
                     cache: UnitCache | None = None) -> UnitRecord:
    """Cache, optimise, harden one unit (see the module docstring).

    Under torch.distributed each rank caches only its block of the calibration set; every
    iteration draws the same global batch on all ranks, each rank back-propagates the loss of its
    share weighted by that share's size, and the gradients are summed over ranks before the step.
    For a loss averaged over the batch (every pass here) this is the single-process gradient up to
    float summation order, so all ranks hold identical unit states throughout.

    ``cache``: the unit's cache, already built (by :class:`_Propagated`) over this rank's samples.
    """
    options = options or EngineOptions()
    start = time.perf_counter()
    if not recon_pass.applies(unit):
        return UnitRecord(unit.name, unit.kind, recon_pass.name, 0, None, None, skipped=True)
    _check_tables(unit, recon_pass)
    shard = _shard_of(data)
    if cache is None:
        cache = build_unit_cache(qmodel, unit.name, _local(data, shard), keep=recon_pass.keep,
                                 q_state=recon_pass.quant_state, fp_model=fp_model, options=options.cache)
    device = options.device
    seed = unit_seed(options.seed, recon_pass.name, unit.index)
    eval_index = eval_indices(len(data), options.eval_samples)

    def evaluate() -> float:
        if shard is None:
            return evaluate_unit(unit, cache, recon_pass, eval_index, device)
        return _evaluate_sharded(unit, cache, recon_pass, eval_index, device, shard)

    try:
        with torch.random.fork_rng(devices=_fork_devices(device)):
            torch.manual_seed(seed)
            initial = evaluate()
            optim = recon_pass.setup(unit)
            params = _trainable(optim) if shard is not None else []
            iters = recon_pass.iters if optim.optimizers else 0
            batches = random_batches(len(data), recon_pass.batch_size, torch.Generator().manual_seed(seed))
            _set_quantizer_training(unit, True)
            for count in range(1, iters + 1):
                index = next(batches)
                for opt in optim.optimizers:
                    opt.zero_grad(set_to_none=True)
                if shard is None:
                    recon_pass.training_loss(unit, cache, index, device, count).backward()
                else:
                    mine = distributed.global_to_local(index, shard)
                    if len(mine):
                        loss = recon_pass.training_loss(unit, cache, mine, device, count)
                        (loss * (len(mine) / len(index))).backward()
                    distributed.sum_gradients(params)
                for opt in optim.optimizers:
                    opt.step()
                for scheduler in optim.schedulers:
                    scheduler.step()
                recon_pass.after_step(unit)
            _set_quantizer_training(unit, False)
            recon_pass.finish(unit)
            final = evaluate()
    finally:
        _set_quantizer_training(unit, False)
        cache.close()
    return UnitRecord(unit.name, unit.kind, recon_pass.name, iters, initial, final,
                      seconds=time.perf_counter() - start)


def reconstruct(qmodel: QuantModel, units: list[Unit], data: CalibrationCalls, recon_pass: ReconPass, *,
                fp_model: nn.Module | None = None, options: EngineOptions | None = None,
                progress: ReconProgress | None = None) -> list[UnitRecord]:
    """Run ``recon_pass`` over ``units`` in order; returns one record per unit.

    With ``progress`` the quantizer state is checkpointed after every unit that learned something,
    and units a restored checkpoint has already finished are not run again.
    """
    options = options or EngineOptions()
    names = [u.name for u in units]
    done = progress.finished_units(recon_pass.name, names) if progress is not None else 0
    records = [UnitRecord(**r) for r in progress.records(recon_pass.name)[:done]] if progress is not None else []
    # units after the last checkpoint of a finished pass learned nothing (skipped units are not
    # checkpointed): restore their records too, so a resumed run reports what an uninterrupted one does
    records += [UnitRecord(u.name, u.kind, recon_pass.name, 0, None, None, skipped=True)
                for u in units[len(records):done]]
    qmodel.eval()
    bar = tqdm(total=len(units), initial=done, desc=f"reconstruct {recon_pass.name}",
               disable=not options.progress or not distributed.dist_info().is_main, leave=False)
    local = _local(data, _shard_of(data))
    propagated = None
    try:
        with quant_state(qmodel, *recon_pass.quant_state):
            propagated = _open_propagation(qmodel, units[done:], local, recon_pass, fp_model, options.cache)
            for unit in units[done:]:
                cache = None
                if propagated is not None:
                    try:
                        if recon_pass.applies(unit):
                            _check_tables(unit, recon_pass)
                            cache = build_unit_cache(qmodel, unit.name, local, keep=recon_pass.keep,
                                                     q_state=recon_pass.quant_state, fp_model=fp_model,
                                                     options=options.cache, propagated=propagated.at(unit))
                        else:
                            propagated.skip(unit)
                    except PropagationUnavailable as exc:
                        log.info("%s: building the remaining unit caches from the input (%s)", recon_pass.name, exc)
                        propagated.close()
                        propagated = None
                record = reconstruct_unit(qmodel, unit, data, recon_pass, fp_model=fp_model, options=options,
                                          cache=cache)
                records.append(record)
                if record.skipped:
                    log.info("%s %s: skipped (nothing to learn)", recon_pass.name, unit.name)
                else:
                    log.info("%s %s: loss %.4g -> %.4g in %d iterations (%.1f s)", recon_pass.name, unit.name,
                             record.initial_loss, record.final_loss, record.iterations, record.seconds)
                    bar.set_postfix_str(f"{unit.name}: {record.initial_loss:.3g}->{record.final_loss:.3g}")
                    if progress is not None:
                        progress.save(qmodel, recon_pass.name, unit.index, names, [r.to_dict() for r in records])
                bar.update(1)
    finally:
        if propagated is not None:
            propagated.close()
        bar.close()
    return records
