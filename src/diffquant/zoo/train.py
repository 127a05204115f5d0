"""Training of the bundled default models: a class-conditional DDPM UNet and a classifier.

Both are trained on Fashion-MNIST on the CPU. All randomness of a diffusion training step is
drawn from generators seeded by ``(seed, step)`` (and ``(seed, epoch)`` for the data order), so
a run that is interrupted and resumed from its checkpoint continues exactly as an
uninterrupted one, independently of when checkpoints were written.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffquant.config import checked, from_dict, knob
from diffquant.data import FASHION_CLASSES, load_split, to_model_range
from diffquant.errors import DiffquantError
from diffquant.jsonio import write_json
from diffquant.safeload import load_state_strict, load_torch_file

CHECKPOINT_NAME = "checkpoint.pt"
NULL_CLASS = 10  # label used for the unconditional branch of classifier-free guidance


# --------------------------------------------------------------------------------------------
# configs


@dataclass
@checked
class UNetConfig:
    """Architecture of the diffusers ``UNet2DModel``; ``attn_levels`` are the resolution levels
    (0 = full resolution) whose down and mirrored up blocks get self-attention."""

    sample_size: int = 28
    in_channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attn_levels: tuple[int, ...] = (2,)
    norm_num_groups: int = 8
    attention_head_dim: int = 32
    num_class_embeds: int = 11

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        self.attn_levels = tuple(int(a) for a in self.attn_levels)
        n = len(self.block_out_channels)
        bad = [a for a in self.attn_levels if not 0 <= a < n]
        if bad:
            raise DiffquantError(f"attention levels {bad} out of range for {n} blocks")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise DiffquantError(
                f"channels {self.block_out_channels} must be divisible by norm_num_groups="
                f"{self.norm_num_groups}"
            )

    def unet_kwargs(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        down = tuple("AttnDownBlock2D" if i in self.attn_levels else "DownBlock2D" for i in range(n))
        up = tuple(
            "AttnUpBlock2D" if (n - 1 - i) in self.attn_levels else "UpBlock2D" for i in range(n)
        )
        return dict(
            sample_size=self.sample_size,
            in_channels=self.in_channels,
            out_channels=self.in_channels,
            block_out_channels=self.block_out_channels,
            layers_per_block=self.layers_per_block,
            down_block_types=down,
            up_block_types=up,
            norm_num_groups=self.norm_num_groups,
            attention_head_dim=self.attention_head_dim,
            num_class_embeds=self.num_class_embeds,
        )


@dataclass
@checked
class TrainConfig:
    """Diffusion training run. ``steps`` fixes the LR schedule; ``max_minutes`` only stops early."""

    out_dir: str
    model: UNetConfig = field(default_factory=UNetConfig)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    steps: int = 10_000
    batch_size: int = 64
    lr: float = knob(1e-3, gt=0)
    lr_schedule: str = "constant"  # "constant" or "cosine" (after linear warm-up)
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_drop_prob: float = 0.1
    hflip: bool = True
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    seed: int = 0
    max_minutes: float | None = None
    checkpoint_minutes: float = 5.0
    checkpoint_every: int | None = None  # additionally every N steps (tests)
    log_every: int = 100
    resume: bool = False
    export: bool = True
    device: str = "cpu"
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = UNetConfig(**self.model)
        if self.lr_schedule not in ("constant", "cosine"):
            raise DiffquantError(f"unknown lr schedule {self.lr_schedule!r}; use constant or cosine")
        if self.steps < 1 or self.batch_size < 1:
            raise DiffquantError("steps and batch size must be positive")


@dataclass
@checked
class ClassifierTrainConfig:
    """Classifier training run on the Fashion-MNIST training split."""

    out_dir: str
    channels: tuple[int, ...] = (32, 64, 128)
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    epochs: int = 3
    batch_size: int = 128
    lr: float = knob(3e-3, gt=0)
    weight_decay: float = 5e-4
    hflip: bool = True
    seed: int = 0
    max_steps: int | None = None  # stop early (tests)
    eval_limit: int | None = None  # evaluate on the first N test images only (tests)
    device: str = "cpu"
    num_threads: int | None = None
    progress: bool = True


# --------------------------------------------------------------------------------------------
# model construction


def build_unet(cfg: UNetConfig):
    """A fresh diffusers ``UNet2DModel`` for ``cfg``."""
    from diffusers import UNet2DModel

    return UNet2DModel(**cfg.unet_kwargs())


def build_scheduler(cfg: TrainConfig):
    """The DDPM noise schedule used for training (epsilon prediction, linear betas).

    ``clip_sample=False``: clipping the predicted x0 to [-1, 1] at every step saturates guided
    samples (class accuracy of the bundled model at guidance 2: 41% with clipping, 87% without,
    200 samples, DDIM 50); training itself never clips.
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# helpers


def _rng(seed: int, *key: int) -> np.random.Generator:
    """A numpy generator determined by the seed and an integer key (step, epoch, ...)."""
    return np.random.default_rng([seed, *key])


def _torch_gen(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for (0-based) ``step``: linear warm-up, then constant or cosine."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay_at(decay: float, step: int) -> float:
    """EMA warm-up: average quickly over the first steps, when early weights are useless."""
    return min(decay, (1 + step) / (10 + step))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def _config_dict(cfg: Any) -> dict[str, Any]:
    d = asdict(cfg)
    return json.loads(json.dumps(d))  # tuples -> lists, plain JSON types only


class DiffusionData:
    """Training images as a uint8 tensor; batches follow a per-epoch permutation."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
        self.images = torch.from_numpy(images).unsqueeze(1)  # uint8 [N,1,28,28]
        self.labels = torch.from_numpy(labels)
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(self.images) // batch_size
        if self.steps_per_epoch < 1:
            raise DiffquantError(f"batch size {batch_size} exceeds the {len(images)} images")
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = torch.from_numpy(_rng(self.seed, 1, epoch).permutation(len(self.images)))
            self._perm_epoch = epoch
        assert self._perm is not None
        idx = self._perm[i * self.batch_size : (i + 1) * self.batch_size]
        return to_model_range(self.images[idx].squeeze(1).numpy()), self.labels[idx]


# --------------------------------------------------------------------------------------------
# diffusion training


def diffusion_step_inputs(
    cfg: TrainConfig, step: int, x0: torch.Tensor, labels: torch.Tensor, alphas_cumprod: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noised images, timesteps, (dropped) labels and target noise for one step."""
    rng = _rng(cfg.seed, 2, step)
    b = x0.shape[0]
    t = torch.from_numpy(rng.integers(0, cfg.num_train_timesteps, size=b)).long()
    if cfg.hflip:
        flip = torch.from_numpy(rng.random(b) < 0.5)
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
    drop = torch.from_numpy(rng.random(b) < cfg.cond_drop_prob)
    labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
    noise = torch.randn(x0.shape, generator=_torch_gen(rng))
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return xt, t, labels, noise


def _save_diffusion_checkpoint(path: Path, cfg: TrainConfig, step: int, model, ema, opt, loss_avg):
    _atomic_torch_save(
        {
            "step": step,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "loss_avg": loss_avg,
            "config": _config_dict(cfg),
        },
        path,
    )


CHECKPOINT_KEYS = ("step", "model", "ema", "optimizer", "torch_rng", "loss_avg", "config")


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training checkpoint (plain tensors and dicts only: ``weights_only=True``)."""
    state = load_torch_file(path, "training checkpoint")
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        have = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise DiffquantError(f"{path}: not a diffquant training checkpoint (expected the entries "
                             f"{', '.join(CHECKPOINT_KEYS)}; found {have})")
    if not isinstance(state["config"], dict):
        raise DiffquantError(f"{path}: the checkpoint's config entry is not a mapping")
    return state


def train_diffusion(cfg: TrainConfig) -> Path:
    """Train (or resume) the diffusion UNet; returns the output directory.

    Writes ``checkpoint.pt`` every ``checkpoint_minutes`` and at the end, and, when the run has
    reached ``cfg.steps`` and ``cfg.export`` is set, the exported EMA model (see
    :func:`export_diffusion`). Stopping at ``max_minutes`` leaves a resumable checkpoint and also
    exports the EMA weights reached so far.
    """
    _set_threads(cfg.num_threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT_NAME
    device = torch.device(cfg.device)

    torch.manual_seed(cfg.seed)
    model = build_unet(cfg.model).to(device)
    ema = build_unet(cfg.model).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, loss_avg = 0, None

    if ckpt_path.exists():
        if not cfg.resume:
            raise DiffquantError(f"{ckpt_path} exists; pass --resume to continue it or pick another --out")
        state = load_checkpoint(ckpt_path)
        saved = from_dict(TrainConfig, state["config"])
        if asdict(saved.model) != asdict(cfg.model):
            raise DiffquantError(f"{ckpt_path} was trained with a different model config: {saved.model}")
        load_state_strict(model, state["model"], ckpt_path)
        load_state_strict(ema, state["ema"], ckpt_path)
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DiffquantError(f"{ckpt_path}: the optimizer state does not fit this model ({exc})") from None
        torch.set_rng_state(state["torch_rng"])
        step, loss_avg = int(state["step"]), state["loss_avg"]
    write_json(out / "train_config.json", _config_dict(cfg))

    images, labels = load_split(cfg.dataset, "train", cfg.data_dir)
    data = DiffusionData(images, labels, cfg.batch_size, cfg.seed)
    alphas_cumprod = build_scheduler(cfg).alphas_cumprod.float()
    ema_params = list(ema.parameters())
    params = list(model.parameters())

    start = time.monotonic()
    first_step = step
    last_ckpt = start
    stopped_early = False
    bar = tqdm(
        total=cfg.steps, initial=step, disable=not cfg.progress, dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0, desc="train diffusion",
    )
    model.train()
    while step < cfg.steps:
        if cfg.max_minutes is not None and time.monotonic() - start >= cfg.max_minutes * 60:
            stopped_early = True
            break
        x0, y = data.batch(step)
        xt, t, y, noise = diffusion_step_inputs(cfg, step, x0, y, alphas_cumprod)
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        pred = model(xt.to(device), t.to(device), class_labels=y.to(device)).sample
        loss = F.mse_loss(pred, noise.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            d = ema_decay_at(cfg.ema_decay, step)
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        step += 1
        value = float(loss.detach())
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", refresh=False)
        if cfg.log_every and step % cfg.log_every == 0:
            elapsed = time.monotonic() - start
            done = step - first_step
            bar.write(
                f"step {step}/{cfg.steps} loss {loss_avg:.4f} lr {lr:.2e} "
                f"elapsed {elapsed / 60:.1f} min ({elapsed / done:.2f} s/step)", file=sys.stderr,
            )
        now = time.monotonic()
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (
            now - last_ckpt >= cfg.checkpoint_minutes * 60
        ):
            _save_diffusion_checkpoint(ckpt_path, cfg, step, model, ema, opt, loss_avg)
            last_ckpt = now
    bar.close()
    _save_diffusion_checkpoint(ckpt_path, cfg, step, model, ema, opt, loss_avg)
    if stopped_early:
        print(f"stopped at step {step}/{cfg.steps} after {cfg.max_minutes} min; "
              f"resume with --resume", file=sys.stderr)
    if cfg.export:
        export_diffusion(out, out / "model")
    return out


def export_diffusion(run_dir: str | os.PathLike, export_dir: str | os.PathLike) -> Path:
    """Write the EMA weights of ``run_dir``'s checkpoint as a diffusers folder.

    Layout: ``unet/`` (``save_pretrained``: config.json + diffusion_pytorch_model.safetensors),
    ``scheduler/scheduler_config.json`` and ``diffquant_model.json`` (classes, null class,
    training step).
    """
    run_dir, export_dir = Path(run_dir), Path(export_dir)
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    cfg = from_dict(TrainConfig, state["config"])
    unet = build_unet(cfg.model)
    load_state_strict(unet, state["ema"], run_dir / CHECKPOINT_NAME)
    export_dir.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(export_dir / "unet", safe_serialization=True)
    build_scheduler(cfg).save_pretrained(export_dir / "scheduler")
    meta = {
        "kind": "class-conditional-ddpm",
        "dataset": cfg.dataset,
        "classes": list(FASHION_CLASSES) if cfg.dataset == "fashion-mnist" else list(map(str, range(10))),
        "null_class": NULL_CLASS,
        "image_range": [-1.0, 1.0],
        "prediction_type": "epsilon",
        "train_steps": int(state["step"]),
        "planned_steps": cfg.steps,
        "ema_decay": cfg.ema_decay,
        "parameters": count_parameters(unet),
    }
    write_json(export_dir / "diffquant_model.json", meta)
    return export_dir


# --------------------------------------------------------------------------------------------
# classifier training


@torch.no_grad()
def evaluate_classifier(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``model`` on images in [-1, 1] [N,1,28,28]."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == labels[i : i + batch_size]).sum())
    return correct / len(images)


def train_classifier(cfg: ClassifierTrainConfig) -> tuple[Path, float]:
    """Train the Fashion-MNIST classifier; saves it to ``cfg.out_dir`` and returns (dir, test acc)."""
    from diffquant.zoo.classifier import FashionClassifier, save_classifier

    _set_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    tr_x, tr_y = load_split(cfg.dataset, "train", cfg.data_dir)
    te_x, te_y = load_split(cfg.dataset, "test", cfg.data_dir)
    train_x, train_y = to_model_range(tr_x), torch.from_numpy(tr_y)
    model = FashionClassifier(channels=tuple(cfg.channels)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = len(train_x) // cfg.batch_size
    total = cfg.epochs * per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    bar = tqdm(total=total, disable=not cfg.progress, desc="train classifier",
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    step = 0
    while step < total:
        epoch = step // per_epoch
        perm = torch.from_numpy(_rng(cfg.seed, 3, epoch).permutation(len(train_x)))
        model.train()
        for i in range(per_epoch):
            if step >= total:
                break
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            x, y = train_x[idx], train_y[idx]
            if cfg.hflip:
                flip = torch.from_numpy(_rng(cfg.seed, 4, step).random(len(x)) < 0.5)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            # one-cycle style: short warm-up then cosine decay to zero
            warm = max(1, total // 20)
            lr = cfg.lr * (step + 1) / warm if step < warm else (
                cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = F.cross_entropy(model(x.to(device)), y.to(device), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
    bar.close()
    test_x, test_y = to_model_range(te_x), torch.from_numpy(te_y)
    if cfg.eval_limit is not None:
        test_x, test_y = test_x[: cfg.eval_limit], test_y[: cfg.eval_limit]
    acc = evaluate_classifier(model, test_x, test_y)
    out = save_classifier(model.cpu(), cfg.out_dir, extra={
        "test_accuracy": acc, "test_images": len(test_x), "train": _config_dict(cfg)})
    return out, acc
