"""TRD, MPQ-DM's time-smoothed relation distillation (docs/methods.md §6.4).

The output of the last decoder block (before the norm–SiLU–conv_out head) is recorded in the
float and the quantized model at every step. Over windows of N consecutive steps (pairs (0, 1),
(2, 3), … for N = 2) the features are averaged, L2-normalised along channels and turned into
per-sample pixel-to-pixel similarities S = F̄ᵀF̄ (HW × HW). The loss is

    weight · Σ P_fp (log P_fp − log P_q),   P = softmax(S / T) row-wise (sum reduction),

added on the last step of each window. ``trd_grad`` decides what the quantized side keeps of
its graph: ``current`` — this step's features attached, earlier steps detached; ``window`` — all
steps of the window attached (the loop then updates once per window); ``none`` — everything
detached, as the official code (which therefore trains nothing through TRD).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

TRD_GRADS = ("current", "window", "none")
TRD_LOSSES = ("relation_kl", "l2_feature")


def default_feature_module(model: nn.Module, example_inputs: tuple[tuple, dict] | None = None) -> str:
    """The last block before the output head, found from the traced graph: a quantized model's
    wrap plan holds it; a float model is traced on ``example_inputs`` (default: built for
    diffusers models). A UNet's last up block, a DiT's last transformer block, whatever the
    modules are called (see :meth:`~diffquant.model.trace.TraceResult.last_block`)."""
    from ..model.qmodel import QuantModel
    from ..model.trace import feature_modules

    if isinstance(model, QuantModel):
        name = model.plan.features.get("last_block")
        if name is not None:
            return name
        model = model.model
    name = feature_modules(model, example_inputs).get("last_block")
    if name is None:
        raise ConfigError(f"no TRD feature module found in the traced graph of {type(model).__name__} (no blocks); "
                          "set trd_feature to the name of the last decoder block")
    return name


class FeatureHook:
    """Keeps the output of one module from its latest call (graph kept unless ``detach``)."""

    def __init__(self, module: nn.Module, detach: bool = False):
        self.value: Tensor | None = None
        self.detach = detach
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, Tensor) and out.dim() == 3:  # transformer tokens [B, L, D] → [B, D, L, 1]
            out = out.transpose(1, 2).unsqueeze(-1)
        if not isinstance(out, Tensor) or out.dim() != 4:
            raise ConfigError(f"the TRD feature module must return a [B, C, H, W] or [B, L, D] tensor, got "
                              f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        self.value = out.detach() if self.detach else out

    def pop(self) -> Tensor:
        if self.value is None:
            raise ConfigError("the TRD feature module was not called during the forward")
        value, self.value = self.value, None
        return value

    def remove(self) -> None:
        self.handle.remove()


def normalized(features: Tensor) -> Tensor:
    """Features [B, C, H, W] L2-normalised along channels, as [B, C, HW]."""
    return F.normalize(features.float().flatten(2), dim=1)


def relation_kl(f_q: Tensor, f_fp: Tensor, tau: float = 1.0) -> Tensor:
    """Σ over samples and rows of KL(P_fp ‖ P_q), P = softmax(F̄ᵀF̄ / τ) (sum reduction)."""
    a, b = normalized(f_q), normalized(f_fp)
    s_q = torch.bmm(a.transpose(1, 2), a) / tau
    s_fp = torch.bmm(b.transpose(1, 2), b) / tau
    log_q = F.log_softmax(s_q, dim=-1)
    log_fp = F.log_softmax(s_fp, dim=-1)
    return (log_fp.exp() * (log_fp - log_q)).sum()


def l2_feature(f_q: Tensor, f_fp: Tensor) -> Tensor:
    """Σ (F̄_q − F̄_fp)² of the channel-normalised features (the paper's ablation)."""
    return (normalized(f_q) - normalized(f_fp)).pow(2).sum()


def trd_loss(f_q: Tensor, f_fp: Tensor, *, kind: str = "relation_kl", tau: float = 1.0,
             weight: float = 100.0) -> Tensor:
    if f_q.shape != f_fp.shape:
        raise ConfigError(f"TRD features differ in shape: {tuple(f_q.shape)} vs {tuple(f_fp.shape)}")
    if kind == "relation_kl":
        return weight * relation_kl(f_q, f_fp, tau)
    if kind == "l2_feature":
        return weight * l2_feature(f_q, f_fp)
    raise ConfigError(f"trd_loss must be one of {', '.join(TRD_LOSSES)}, got {kind!r}")


class TRDWindow:
    """Collects per-step features and returns the TRD loss at the end of each N-step window.

    ``add(k, f_q, f_fp)`` for step k; returns the loss on the window's last step (k % N = N−1),
    else None. Incomplete trailing windows give no loss.
    """

    def __init__(self, n: int = 2, grad: str = "current", kind: str = "relation_kl", tau: float = 1.0,
                 weight: float = 100.0):
        if n < 1:
            raise ConfigError(f"trd_n must be >= 1, got {n}")
        if grad not in TRD_GRADS:
            raise ConfigError(f"trd_grad must be one of {', '.join(TRD_GRADS)}, got {grad!r}")
        if kind not in TRD_LOSSES:
            raise ConfigError(f"trd_loss must be one of {', '.join(TRD_LOSSES)}, got {kind!r}")
        if tau <= 0:
            raise ConfigError(f"trd_tau must be > 0, got {tau}")
        self.n, self.grad, self.kind, self.tau, self.weight = n, grad, kind, tau, weight
        self.q: list[Tensor] = []
        self.fp: list[Tensor] = []

    def reset(self) -> None:
        self.q, self.fp = [], []

    def add(self, k: int, f_q: Tensor, f_fp: Tensor) -> Tensor | None:
        if k % self.n == 0:
            self.reset()
        keep: Callable[[Tensor], Tensor] = (lambda t: t) if self.grad == "window" else Tensor.detach
        # the current step enters attached for current/window; earlier ones as stored
        self.q.append(f_q if self.grad != "none" else f_q.detach())
        self.fp.append(f_fp.detach())
        if k % self.n != self.n - 1:
            self.q[-1] = keep(self.q[-1])  # stored for later steps: detached unless window
            return None
        loss = trd_loss(torch.stack(self.q).mean(0), torch.stack(self.fp).mean(0),
                        kind=self.kind, tau=self.tau, weight=self.weight)
        self.reset()
        return loss


__all__ = ["TRD_GRADS", "TRD_LOSSES", "FeatureHook", "TRDWindow", "default_feature_module", "l2_feature",
           "normalized", "relation_kl", "trd_loss"]
