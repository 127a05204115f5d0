"""EfficientDM's data-free quantization-aware LoRA fine-tuning (docs/methods.md §6.3), with TRD.

Pieces, in the order a recipe uses them:

- :func:`expand_act_tables`: TALSQ — every activation quantizer becomes a table of K rows (one
  per sampling step, selected by the timestep given to the denoiser), each row initialised to the
  Stage-1 value;
- :func:`attach_adapters`: LoRA (B = 0) on the trained layers;
- :func:`set_trainable` / :func:`build_optimizer`: LoRA, weight (s, z) and TALSQ tables trainable,
  all else frozen; AdamW (weight decay 0.01) with per-layer groups — LoRA lr = ā/2500 (ā the
  layer's mean weight step), weight (s, z) 1e-6, TALSQ 5e-4 — and a linear decay to 0;
- :func:`finetune`: the loop. Each epoch e draws, with seed ``seed + e``, a batch of random
  classes (the null class as the unconditional branch under CFG) and x_T ~ N(0, I); at each of the
  K DDIM (η = 0) steps both models predict ε, the loss Σ(ε_q − ε_fp)² (+ TRD) is back-propagated
  and the optimiser and scheduler step; x advances with the **float** ε.

Progress is checkpointed after Stage 1 and after every epoch (:class:`FinetuneCheckpoint`, in the
one checkpoint format of :mod:`diffquant.model.resume`: the quantizer state, the AdamW moments in
safetensors and the schedule in JSON), so an interrupted run resumes at the next epoch and ends bit-identical to
an uninterrupted one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..diffusion import distributed
from ..errors import CheckpointError, ConfigError
from ..model.qmodel import QuantModel
from ..model.resume import ResumeCheckpoint
from ..nn.layers import attach_lora
from ..quant.quantizer import UniformQuantizer
from ..quant.variants import MixedBitQuantizer, replace_module
from .trd import FeatureHook, TRDWindow
from ..config import checked, knob

LORA_LR_MODES = ("library", "code")
#: step and zero point of the official code's unused group-quantizer entries (§6.2 step 5)
PLACEHOLDER_STEP = 0.005
CHECKPOINT_DIR = "finetune"
CHECKPOINT_KIND = "finetune"


@dataclass
@checked
class FinetuneOptions:
    epochs: int = 800
    #: K: DDIM steps of the fine-tuning trajectory (= the sampling schedule of the TALSQ tables)
    steps: int = 20
    batch_size: int = 4
    guidance: float = 1.0
    seed: int = 3407
    lora_lr_divisor: float = 2500.0
    #: library: ā over the channels' own steps | code: placeholders of the 3 group quantizers too
    lora_lr: str = "library"
    weight_lr: float = knob(1e-6, gt=0)
    act_lr: float = knob(5e-4, gt=0)
    weight_decay: float = 0.01
    learn_weight_zero_point: bool = True
    trd: bool = True
    trd_grad: str = "current"
    trd_n: int = 2
    trd_tau: float = 1.0
    trd_weight: float = 100.0
    trd_loss: str = "relation_kl"
    trd_feature: str | None = None

    def __post_init__(self) -> None:
        if self.lora_lr not in LORA_LR_MODES:
            raise ConfigError(f"lora_lr must be one of {', '.join(LORA_LR_MODES)}, got {self.lora_lr!r}")
        for name in ("epochs",):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def window_updates(self) -> bool:
        return self.trd and self.trd_grad == "window"

    @property
    def updates_per_epoch(self) -> int:
        return math.ceil(self.steps / self.trd_n) if self.window_updates else self.steps


# ---------------------------------------------------------------------- model surgery
@torch.no_grad()
def expand_act_tables(qmodel: QuantModel, timesteps: list[int]) -> None:
    """Give every activation quantizer one row per step of ``timesteps`` (copies of row 0) and
    set the model's schedule, so each denoiser call selects its row by its timestep."""
    k = len(timesteps)
    for name, q in qmodel.quantizers("act").items():
        if q.num_steps == k:
            continue
        if type(q) is not UniformQuantizer or q.num_steps != 1:
            raise ConfigError(f"{name}: cannot expand a {type(q).__name__} with {q.num_steps} rows")
        new = UniformQuantizer(q.bits, q.grid, q.channel_axis, q.channels, q.init, num_steps=k,
                               include_zero=q.include_zero, clamp_zero_point=q.clamp_zero_point,
                               momentum=q.momentum, init_options=q.init_options).to(q.step.device)
        for attr in ("step", "zero_point", "range_lo", "range_hi"):
            getattr(new, attr).data[:] = getattr(q, attr).data[0]
        for attr in ("initialized", "batches_seen", "search_side"):
            getattr(new, attr)[:] = getattr(q, attr)[0]
        new.enabled, new.mode = q.enabled, q.mode
        new.timestep_index = qmodel.timestep_index
        replace_module(qmodel.model, name, new)
    qmodel.set_timesteps([int(t) for t in timesteps])


def attach_adapters(qmodel: QuantModel, layers: list[str], rank: int, seed: int = 0) -> None:
    """LoRA of ``rank`` on ``layers`` (A from a ``seed``-ed generator, B = 0: outputs unchanged)."""
    modules = qmodel.layers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in layers:
            attach_lora(modules[name], rank)


def set_trainable(qmodel: QuantModel, layers: list[str], learn_weight_zero_point: bool = True) -> None:
    """Freeze everything, then unfreeze LoRA, weight (s[, z]) and TALSQ tables of ``layers``."""
    for p in qmodel.parameters():
        p.requires_grad_(False)
    modules = qmodel.layers()
    for name in layers:
        layer = modules[name]
        if layer.weight_delta is not None:
            layer.weight_delta.requires_grad_(True)
        for q in layer.weight_quantizers:
            if q.active:
                q.set_learnable(step=True, zero_point=learn_weight_zero_point)
        for q in layer.act_quantizers:
            if q.active:
                q.set_learnable(step=True, zero_point=True)


def mean_weight_step(layer: nn.Module, mode: str = "library") -> float:
    """ā: the mean of the channels' own weight steps; ``code`` adds the official code's
    placeholders (s = 0.005 for each channel in the two group quantizers it is not part of), i.e.
    ā + 0.01 for a mixed-bit (OMQ) layer and ā for a uniform one."""
    steps = [q.step.detach()[0].reshape(-1).float() for q in layer.weight_quantizers if q.active]
    if not steps:
        return 0.0
    mean = float(torch.cat(steps).mean())
    if mode == "code" and any(isinstance(q, MixedBitQuantizer) for q in layer.weight_quantizers):
        mean += 2 * PLACEHOLDER_STEP
    return mean


def build_optimizer(qmodel: QuantModel, layers: list[str], options: FinetuneOptions
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR, list[str]]:
    """AdamW with per-layer groups (LoRA, weight qparams, TALSQ) and the linear decay to 0."""
    groups: list[dict[str, Any]] = []
    names: list[str] = []
    modules = qmodel.layers()
    for name in layers:
        layer = modules[name]
        delta = layer.weight_delta
        lora = [p for p in (delta.parameters() if delta is not None else []) if p.requires_grad]
        if lora:
            groups.append({"params": lora, "lr": mean_weight_step(layer, options.lora_lr) / options.lora_lr_divisor})
            names.append(f"{name}:lora")
        wq = [p for q in layer.weight_quantizers for p in (q.step, q.zero_point) if p.requires_grad]
        if wq:
            groups.append({"params": wq, "lr": options.weight_lr})
            names.append(f"{name}:weight_qparams")
        aq = [p for q in layer.act_quantizers for p in (q.step, q.zero_point) if p.requires_grad]
        if aq:
            groups.append({"params": aq, "lr": options.act_lr})
            names.append(f"{name}:talsq")
    if not groups:
        raise ConfigError("nothing to fine-tune: no layer has LoRA, weight or activation quantizers to learn")
    optimizer = torch.optim.AdamW(groups, weight_decay=options.weight_decay)
    total = max(1, options.epochs * options.updates_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(0.0, 1.0 - i / total))
    return optimizer, scheduler, names


# ---------------------------------------------------------------------- checkpoints
class FinetuneCheckpoint:
    """``<work_dir>/finetune/``: quantizer state, AdamW moments and schedule after an epoch, in the
    one checkpoint format (:class:`diffquant.model.resume.ResumeCheckpoint`)."""

    def __init__(self, work_dir: str | Path, fingerprint: str, *, min_interval_s: float = 0.0):
        self.store = ResumeCheckpoint(Path(work_dir) / CHECKPOINT_DIR, CHECKPOINT_KIND, fingerprint)
        self.min_interval_s = float(min_interval_s)
        self._last_write = -float("inf")  # the first (Stage-1) checkpoint is always written
        self.root = self.store.root
        self.fingerprint = fingerprint
        #: JSON-able records written with every checkpoint (e.g. the Stage-1 records)
        self.extra: dict = {}

    def read_state(self) -> dict | None:
        state = self.store.read({"epoch": int, "history": list, "extra": dict})
        if state is not None:
            self.extra = dict(state["extra"])
        return state

    def restore_model(self, qmodel: QuantModel) -> dict | None:
        state = self.read_state()
        if state is not None:
            self.store.restore_model(qmodel)
        return state

    def restore_optimizer(self, state: dict, optimizer: torch.optim.Optimizer, scheduler) -> None:
        if state.get("optimizer") is None:
            return
        tensors = self.store.tensors()
        if len(tensors) != state["optimizer"].get("moments", len(tensors)):
            raise CheckpointError(f"{self.root}: the optimizer moments are missing or incomplete")
        if len(state["optimizer"]["lrs"]) != len(optimizer.param_groups):
            raise CheckpointError(f"{self.root}: saved optimizer has a different number of parameter groups")
        for gi, group in enumerate(optimizer.param_groups):
            group["lr"] = state["optimizer"]["lrs"][gi]
            for pi, p in enumerate(group["params"]):
                prefix = f"{gi}.{pi}."
                entry = {k[len(prefix):]: v.to(p.device) for k, v in tensors.items() if k.startswith(prefix)}
                if entry:
                    optimizer.state[p] = entry
        scheduler.load_state_dict(state["optimizer"]["scheduler"])

    def save(self, qmodel: QuantModel, epoch: int, history: list[dict], optimizer=None, scheduler=None,
             extra: dict | None = None) -> None:
        """Checkpoint after ``epoch`` — only when ``min_interval_s`` have passed since the last one
        (a resumed run redoes the epochs after it: each draws its data from its own seed)."""
        self.extra.update(extra or {})
        if not distributed.dist_info().is_main:  # ranks hold identical states: rank 0 writes it
            return
        if time.monotonic() - self._last_write < self.min_interval_s:
            return
        opt_state, tensors = None, {}
        if optimizer is not None:
            for gi, group in enumerate(optimizer.param_groups):
                for pi, p in enumerate(group["params"]):
                    for key, value in optimizer.state.get(p, {}).items():
                        if isinstance(value, Tensor):
                            tensors[f"{gi}.{pi}.{key}"] = value.detach().cpu().contiguous().clone()
            sched = scheduler.state_dict()
            sched["lr_lambdas"] = [None] * len(sched["lr_lambdas"])  # plain functions: rebuilt, not saved
            opt_state = {"lrs": [g["lr"] for g in optimizer.param_groups], "scheduler": sched, "moments": len(tensors)}
        self.store.write(qmodel, {"epoch": epoch, "history": history, "optimizer": opt_state, "extra": self.extra},
                         tensors)
        self._last_write = time.monotonic()


# ---------------------------------------------------------------------- the loop
def guided_eps(bundle, model: nn.Module, x: Tensor, t: Tensor, labels: Tensor | None, guidance: float) -> Tensor:
    """ε of one step, with classifier-free guidance ε_u + g(ε_c − ε_u) from one doubled batch."""
    b, c = x.shape[:2]
    tt = t.reshape(1).repeat(b).to(x.device)
    if labels is None or guidance == 1.0:
        return bundle.predict_noise(model, x, tt, labels)[:, :c].float()
    null = torch.full_like(labels, int(bundle.null_class))
    out = bundle.predict_noise(model, torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
    cond, uncond = out[:b, :c].float(), out[b:, :c].float()
    return uncond + guidance * (cond - uncond)


class SampledTrajectories:
    """The paper's source: fresh DDIM trajectories of the float model, one batch per epoch, with
    random class labels and classifier-free guidance (``bundle`` gives scheduler and shapes)."""

    def __init__(self, bundle, options: FinetuneOptions, device: torch.device):
        from ..diffusion.sampling import build_scheduler

        if options.guidance != 1.0 and (not bundle.is_conditional or bundle.null_class is None):
            raise ConfigError(f"{bundle.name}: guidance {options.guidance} needs a class-conditional model with "
                              "a null class")
        self.bundle, self.options, self.device = bundle, options, device
        self.sched = build_scheduler(bundle.scheduler_config, "ddim")
        self.sched.set_timesteps(options.steps, device=device)
        self.timesteps = [int(t) for t in self.sched.timesteps]
        self.eps_fp: Tensor | None = None

    def steps(self, epoch: int):
        """Yield ``(k, predict)`` per step; ``predict(model)`` is ε of ``model`` on this step's input.
        Set ``eps_fp`` before resuming: the float trajectory moves on with it."""
        bundle, options = self.bundle, self.options
        gen = torch.Generator().manual_seed(options.seed + epoch)
        labels = None
        if bundle.is_conditional:
            labels = torch.randint(0, int(bundle.num_classes), (options.batch_size,), generator=gen).to(self.device)
        x = torch.randn(options.batch_size, *bundle.sample_shape, generator=gen) * self.sched.init_noise_sigma
        rows = distributed.my_shard(options.batch_size, "fine-tuning samples per batch")  # under torch.distributed each rank follows its block of the batch
        if rows is not None:
            x = x[rows.start:rows.stop]
            labels = None if labels is None else labels[rows.start:rows.stop]
        x = x.to(self.device)
        for k, t in enumerate(self.sched.timesteps):
            xin = self.sched.scale_model_input(x, t)
            yield k, lambda model, xin=xin, t=t: guided_eps(bundle, model, xin, t, labels, options.guidance)
            with torch.no_grad():
                x = self.sched.step(self.eps_fp, t, x, eta=0.0).prev_sample


class RecordedTrajectories:
    """Float trajectories recorded from the user's own pipeline or sampler (every argument of every
    denoiser call, CFG halves as separate rows): each epoch follows ``batch_size`` recorded
    trajectories (seeded choice) through every step, teacher-forced on the recorded x_t. The loss
    compares each half's ε, not the guided combination (the recording holds no guidance scale)."""

    def __init__(self, calib_set, call, options: FinetuneOptions, device: torch.device):
        steps = calib_set.steps
        self.timesteps = []
        for k in sorted(set(steps.tolist())):
            ts = {int(t) for t in calib_set.ts[steps == k].tolist()}
            if len(ts) != 1:
                raise ConfigError(f"recorded step {k} holds several timesteps {sorted(ts)[:4]}; record one schedule")
            self.timesteps.append(ts.pop())
        self.calib_set, self.call, self.options, self.device = calib_set, call, options, device
        self.trajectories = sorted(set(calib_set.sample_ids.tolist()))
        self.eps_fp = None

    def steps(self, epoch: int):
        options, cs = self.options, self.calib_set
        gen = torch.Generator().manual_seed(options.seed + epoch)
        order = torch.randperm(len(self.trajectories), generator=gen)[: options.batch_size]
        rows = distributed.my_shard(len(order), "fine-tuning samples per batch")  # under torch.distributed each rank follows its block of the batch
        if rows is not None:
            order = order[rows.start:rows.stop]
        chosen = torch.tensor([self.trajectories[i] for i in order.tolist()])
        for k in sorted(set(cs.steps.tolist())):
            rows = ((cs.steps == k) & torch.isin(cs.sample_ids, chosen)).nonzero().flatten()
            if rows.numel() == 0:
                continue
            x, t, cond = cs[rows]
            x, t = x.to(self.device), t.to(self.device)
            cond = None if cond is None else cond.to(self.device)
            yield k, lambda model, x=x, t=t, cond=cond: self.call(model, x, t, cond).float()


def finetune(qmodel: QuantModel, fp_model: nn.Module, bundle, layers: list[str], options: FinetuneOptions, *,
             checkpoint: FinetuneCheckpoint | None = None, start_epoch: int = 0, history: list[dict] | None = None,
             optimizer=None, scheduler=None, device: str | torch.device = "cpu", progress: bool = True,
             source=None) -> list[dict]:
    """Run epochs ``start_epoch … options.epochs − 1`` of the loop (see the module docstring).

    ``qmodel`` must have its TALSQ tables on the schedule of the trajectories and the trainable
    parameters set; ``optimizer``/``scheduler`` default to :func:`build_optimizer`. The trajectories
    are ``source`` (a :class:`RecordedTrajectories`) or, by default, sampled from ``bundle``
    (:class:`SampledTrajectories`, the paper's). Returns the per-epoch history (mean ε-loss and
    TRD loss).
    """
    history = list(history or [])
    if optimizer is None:
        optimizer, scheduler, _ = build_optimizer(qmodel, layers, options)
    device = torch.device(device)
    source = source or SampledTrajectories(bundle, options, device)
    timesteps = source.timesteps
    if list(qmodel.timestep_index.timesteps) not in ([], timesteps):
        raise ConfigError("the TALSQ tables are calibrated for another schedule than the fine-tuning's "
                          f"{len(timesteps)} steps")
    hooks = None
    window = None
    if options.trd:
        from .trd import default_feature_module

        feature = options.trd_feature or default_feature_module(qmodel)
        try:
            hooks = (FeatureHook(qmodel.model.get_submodule(feature)),
                     FeatureHook(fp_model.get_submodule(feature), detach=True))
        except AttributeError:
            raise ConfigError(f"TRD feature module {feature!r} does not exist in the model") from None
        window = TRDWindow(options.trd_n, options.trd_grad, options.trd_loss, options.trd_tau, options.trd_weight)
    total = (options.epochs - start_epoch) * len(timesteps)
    bar = tqdm(total=total, desc="fine-tuning", disable=not progress or not distributed.dist_info().is_main,
               leave=False)
    fp_model.eval()
    qmodel.eval()
    try:
        for epoch in range(start_epoch, options.epochs):
            eps_sum = trd_sum = 0.0
            pending: Tensor | None = None
            if window is not None:
                window.reset()
            last = len(timesteps) - 1
            for k, predict in source.steps(epoch):
                with torch.no_grad():
                    eps_fp = predict(fp_model)
                eps_q = predict(qmodel)
                loss = (eps_q - eps_fp).pow(2).sum()
                eps_sum += float(loss.detach())
                if window is not None:
                    extra = window.add(k, hooks[0].pop(), hooks[1].pop())
                    if extra is not None:
                        trd_sum += float(extra.detach())
                        loss = loss + extra
                if options.window_updates:
                    pending = loss if pending is None else pending + loss
                    if k % options.trd_n == options.trd_n - 1 or k == last:
                        _update(pending, optimizer, scheduler)
                        pending = None
                else:
                    _update(loss, optimizer, scheduler)
                source.eps_fp = eps_fp
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.4g}")
            if distributed.dist_info().is_distributed:  # the losses of the whole batch, as one process reports
                eps_sum, trd_sum = distributed.all_reduce_sum(torch.tensor([eps_sum, trd_sum],
                                                                           dtype=torch.float64)).tolist()
            history.append({"epoch": epoch, "eps_loss": eps_sum / len(timesteps), "trd_loss": trd_sum})
            if checkpoint is not None:
                checkpoint.save(qmodel, epoch + 1, history, optimizer, scheduler)
    finally:
        bar.close()
        if hooks is not None:
            for h in hooks:
                h.remove()
        for p in qmodel.parameters():
            p.requires_grad_(False)
        qmodel.clear_weight_cache()
    return history


def _update(loss: Tensor, optimizer, scheduler) -> None:
    """One step; under torch.distributed the loss is each rank's sum over its block of the batch,
    so summing the gradients over ranks gives exactly the whole batch's gradient."""
    optimizer.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
    if distributed.dist_info().is_distributed:
        distributed.sum_gradients([p for g in optimizer.param_groups for p in g["params"] if p.requires_grad])
    optimizer.step()
    scheduler.step()


__all__ = ["FinetuneCheckpoint", "FinetuneOptions", "LORA_LR_MODES", "attach_adapters", "build_optimizer",
           "expand_act_tables", "finetune", "guided_eps", "mean_weight_step", "set_trainable"]
