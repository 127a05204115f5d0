"""Sampling loops on diffusers schedulers, with classifier-free guidance.

Determinism: sample ``i`` (a global index, ``start_index + j``) draws its initial noise and all
per-step noise from its own CPU generator seeded from ``(seed, i)`` only, so the same image comes
out whatever the batch size, the device or the number of processes.

The sampler knows nothing about quantization: it calls ``bundle.predict_noise(bundle.unet, ...)``,
so a bundle carrying a quantized denoiser (``bundle.with_unet(...)``) samples the same way.
"""
from __future__ import annotations

import inspect
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffquant.diffusion import distributed
from diffquant.diffusion.grid import save_grid
from diffquant.errors import ConfigError, DiffquantError
from diffquant.bundle import DiffusionBundle
from diffquant.jsonio import write_json

StepCallback = Callable[[int, int, Tensor, "Tensor | None"], None]

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
}
STOCHASTIC_SCHEDULERS = ("ddpm", "ddim")  # those that draw per-step noise (DDIM only when η > 0)


@dataclass
class SampleResult:
    """Samples in global index order."""

    images: np.ndarray  # uint8 [N, H, W, C]
    samples: Tensor  # float32 [N, C, H, W] on the CPU, as returned by the sampler
    labels: np.ndarray | None  # int64 [N] or None for unconditional models
    indices: np.ndarray  # int64 [N] global sample indices
    settings: dict[str, Any] = field(default_factory=dict)


def build_scheduler(scheduler_config: dict[str, Any], name: str):
    """A fresh diffusers scheduler of kind ``name`` built from a (DDPM) scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    class_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in scheduler_config.items() if k in accepted}
    config.update(overrides)
    return cls.from_config(config)


def scheduler_timesteps(scheduler_config: dict[str, Any], name: str, steps: int) -> Tensor:
    """The model timesteps t_0 … t_{K-1} of a run (K = steps, or steps + 1 for PNDM/PLMS)."""
    sched = build_scheduler(scheduler_config, name)
    sched.set_timesteps(steps)
    return sched.timesteps.clone().long()


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample ``index`` under ``seed`` (depends on nothing else)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(index)])
    return torch.Generator("cpu").manual_seed(int(state.generate_state(1, dtype=np.uint64)[0]))


def initial_noise(generators: Sequence[torch.Generator], shape: Sequence[int]) -> Tensor:
    """x_T for each sample from its own generator, on the CPU."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])


def count_non_finite(samples: Tensor) -> int:
    """How many samples [N, ...] hold at least one NaN or Inf."""
    return int((~torch.isfinite(samples)).flatten(1).any(1).sum())


def to_uint8(samples: Tensor) -> np.ndarray:
    """[-1, 1] floats [N, C, H, W] → uint8 [N, H, W, C] (clamped, rounded; NaN → 0)."""
    x = samples.detach().float().nan_to_num(nan=-1.0)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def resolve_labels(bundle: DiffusionBundle, indices: Sequence[int],
                   classes: Sequence[int] | None) -> Tensor | None:
    """Class label of each global sample index: ``classes[i % len(classes)]`` or ``i % num_classes``."""
    if not bundle.is_conditional:
        if classes is not None:
            raise ConfigError(f"{bundle.name} is unconditional: it takes no class labels")
        return None
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    if classes is None:
        return idx % int(bundle.num_classes)
    table = torch.as_tensor(list(classes), dtype=torch.long)
    if table.numel() == 0:
        raise ConfigError("classes must not be empty")
    top = int(bundle.num_classes) if bundle.null_class is None else int(bundle.null_class)
    bad = table[(table < 0) | (table > top)]
    if bad.numel():
        raise ConfigError(f"class label {int(bad[0])} outside 0..{top} for {bundle.name}")
    return table[idx % table.numel()]


def _model_dtype(unet: nn.Module) -> torch.dtype:
    return next((p.dtype for p in unet.parameters() if p.is_floating_point()), torch.float32)


class _NoisePredictor:
    """Runs the denoiser once per step, doubling the batch for classifier-free guidance."""

    def __init__(self, bundle: DiffusionBundle, guidance: float, keep_variance: bool):
        self.bundle = bundle
        self.unet = bundle.unet
        self.guidance = float(guidance)
        self.keep_variance = keep_variance
        self.dtype = _model_dtype(bundle.unet)
        self.checked = False

    def _call(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        try:
            out = self.bundle.predict_noise(self.unet, x.to(self.dtype), t, labels)
        except RuntimeError as err:
            if self.checked:
                raise
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise DiffquantError(
                f"{self.bundle.name}: the denoiser failed on inputs of shape {tuple(x.shape)} "
                f"(sample_shape {self.bundle.sample_shape}): {msg}"
            ) from err
        if not self.checked:
            ok = out.shape[0] == x.shape[0] and out.shape[2:] == x.shape[2:] and \
                out.shape[1] in (x.shape[1], 2 * x.shape[1])
            if not ok:
                raise DiffquantError(
                    f"{self.bundle.name}: the denoiser returned shape {tuple(out.shape)} "
                    f"for input {tuple(x.shape)}"
                )
            self.checked = True
        return out.float()

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        b, c = x.shape[:2]
        tt = t.reshape(1).repeat(b).to(x.device)
        if self.guidance == 1.0 or labels is None:
            out = self._call(x, tt, labels)
            eps, var = out[:, :c], out[:, c:]
        else:
            null = torch.full_like(labels, int(self.bundle.null_class))
            out = self._call(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
            cond, uncond = out[:b], out[b:]
            eps = uncond[:, :c] + self.guidance * (cond[:, :c] - uncond[:, :c])
            var = cond[:, c:]
        if self.keep_variance and var.shape[1]:
            return torch.cat([eps, var], dim=1)
        return eps


def _validate(bundle: DiffusionBundle, n: int, scheduler: str, steps: int, eta: float,
              guidance: float, batch_size: int) -> None:
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if n < 0:
        raise ConfigError(f"number of samples must be >= 0, got {n}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    for name, value in (("eta", eta), ("guidance", guidance)):
        if not math.isfinite(float(value)):
            raise ConfigError(f"{name} must be a finite number, got {value}")
    if eta < 0:
        raise ConfigError(f"eta must be >= 0, got {eta}")
    if eta != 0 and scheduler != "ddim":
        raise ConfigError(f"eta applies to the ddim scheduler only (got scheduler {scheduler!r})")
    if guidance != 1.0 and not bundle.is_conditional:
        raise ConfigError(f"{bundle.name} is unconditional: classifier-free guidance needs a "
                          "class-conditional model (use guidance 1)")
    if guidance != 1.0 and bundle.null_class is None:
        raise ConfigError(f"{bundle.name} has no null class for classifier-free guidance")
    if len(bundle.sample_shape) != 3:
        raise ConfigError(f"{bundle.name}: sample_shape must be (C, H, W), got {bundle.sample_shape}")


def denoise_batch(bundle: DiffusionBundle, indices: Sequence[int], *, seed: int, scheduler: str,
                  steps: int, eta: float, guidance: float, labels: Tensor | None,
                  device: torch.device, step_callback: StepCallback | None = None,
                  on_step: Callable[[], None] | None = None) -> Tensor:
    """Run one full sampling trajectory for the given global sample indices; returns x_0 (float32)."""
    sched = build_scheduler(bundle.scheduler_config, scheduler)
    sched.set_timesteps(steps, device=device)
    generators = [sample_generator(seed, i) for i in indices]
    x = (initial_noise(generators, bundle.sample_shape) * sched.init_noise_sigma).to(device)
    labels = labels.to(device) if labels is not None else None
    learned = scheduler == "ddpm" and str(bundle.scheduler_config.get("variance_type", "")).startswith("learned")
    predictor = _NoisePredictor(bundle, guidance, keep_variance=learned)
    step_kwargs: dict[str, Any] = {}
    if scheduler == "ddpm" or (scheduler == "ddim" and eta > 0):
        step_kwargs["generator"] = generators
    if scheduler == "ddim":
        step_kwargs["eta"] = float(eta)
    for k, t in enumerate(sched.timesteps):
        if step_callback is not None:
            step_callback(k, int(t), x, labels)
        eps = predictor(sched.scale_model_input(x, t), t, labels)
        x = sched.step(eps, t, x, **step_kwargs).prev_sample
        if on_step is not None:
            on_step()
    return x.float()


def sample(bundle: DiffusionBundle, n: int, *, seed: int = 0, start_index: int = 0,
           scheduler: str = "ddim", steps: int = 50, eta: float = 0.0, guidance: float = 1.0,
           classes: Sequence[int] | None = None, batch_size: int = 64,
           device: str | torch.device = "cpu", progress: bool = True,
           step_callback: StepCallback | None = None,
           distributed_mode: bool | None = None) -> SampleResult:
    """Draw samples ``start_index … start_index + n - 1`` from ``bundle``.

    ``scheduler``: ddpm | ddim (with ``eta``) | pndm (PLMS, K = steps + 1 denoiser calls) |
    dpmsolver++. ``guidance`` g gives ε = ε_u + g(ε_c − ε_u) from one doubled batch; g = 1 runs
    the conditional branch only. Labels: ``classes[i % len(classes)]`` or ``i % num_classes``.
    ``step_callback(k, t, x_t, labels)`` runs before every denoiser call, with x_t before any
    CFG duplication. Under torch.distributed (``distributed_mode`` None = auto) each rank samples
    its own block of indices and every rank receives the gathered result.
    """
    _validate(bundle, n, scheduler, steps, eta, guidance, batch_size)
    info = distributed.dist_info() if distributed_mode in (None, True) else distributed.DistInfo()
    device = distributed.device_for_rank(device, info)
    mine = distributed.shard_indices(n, info.rank, info.world_size)
    indices = [start_index + j for j in mine]
    all_labels = resolve_labels(bundle, indices, classes)

    n_batches = -(-len(indices) // batch_size)
    k_steps = len(scheduler_timesteps(bundle.scheduler_config, scheduler, steps))
    bar = tqdm(total=n_batches * k_steps, desc=f"sampling {bundle.name}",
               disable=not progress or not info.is_main, leave=False)
    outputs = []
    with torch.no_grad():
        for b in range(n_batches):
            sl = slice(b * batch_size, (b + 1) * batch_size)
            x0 = denoise_batch(
                bundle, indices[sl], seed=seed, scheduler=scheduler, steps=steps, eta=eta,
                guidance=guidance, labels=None if all_labels is None else all_labels[sl],
                device=device, step_callback=step_callback, on_step=lambda: bar.update(1),
            )
            outputs.append(x0.cpu())
    bar.close()

    samples = torch.cat(outputs) if outputs else torch.zeros((0, *bundle.sample_shape))
    labels = None if all_labels is None else all_labels.numpy()
    idx = np.asarray(indices, dtype=np.int64)
    if info.is_distributed:
        samples = torch.from_numpy(distributed.gather_numpy(samples.numpy()))
        idx = distributed.gather_numpy(idx)
        labels = None if labels is None else distributed.gather_numpy(labels)
    non_finite = count_non_finite(samples)
    if non_finite and info.is_main:
        warnings.warn(f"{non_finite} of {len(samples)} samples from {bundle.name} contain NaN or "
                      "Inf (the denoiser diverged); they are saved as black images", stacklevel=2)
    settings = {
        "model": bundle.name, "n": n, "seed": seed, "start_index": start_index,
        "scheduler": scheduler, "steps": steps, "eta": eta, "guidance": guidance,
        "classes": None if classes is None else [int(c) for c in classes],
        "non_finite": non_finite,
    }
    return SampleResult(images=to_uint8(samples), samples=samples, labels=labels,
                        indices=idx, settings=settings)


GRID_MAX_IMAGES = 100


def save_samples(result: SampleResult, out_dir: str | os.PathLike, grid_images: int = GRID_MAX_IMAGES) -> dict[str, Path]:
    """Write ``samples.npz`` (uint8 images, indices, labels if any), ``grid.png`` of the first
    ``grid_images`` images and ``samples.json`` (the settings)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"images": result.images, "indices": result.indices}
    if result.labels is not None:
        arrays["labels"] = result.labels
    paths = {"npz": out / "samples.npz", "settings": out / "samples.json"}
    np.savez_compressed(paths["npz"], **arrays)
    write_json(paths["settings"], result.settings)
    if len(result.images):
        paths["grid"] = save_grid(out / "grid.png", result.images[:grid_images])
    return paths
