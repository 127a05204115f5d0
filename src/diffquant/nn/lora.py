"""Low-rank weight update ΔW for quantization-aware LoRA (EfficientDM / MPQ-DM, docs/methods.md §6.3).

For a weight of shape (d0, d1, *kernel) — Linear (out, in), Conv (out, in, kh, kw),
ConvTranspose (in, out, kh, kw) — A has shape (r, d1, *kernel) and B (d0, r, *kernel), and
ΔW[:, :, i, j] = B[:, :, i, j] · A[:, :, i, j] at every kernel position (a plain B·A for Linear).
No α/r scaling, no dropout; A is Kaiming-uniform (a = √5), B = 0, so a fresh update is zero.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError


class LoRADelta(nn.Module):
    def __init__(self, weight_shape: tuple[int, ...], rank: int, device=None, dtype=torch.float32):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"LoRA rank must be a positive integer, got {rank!r}")
        d0, d1, *kernel = weight_shape
        self.rank = rank
        self.lora_A = nn.Parameter(torch.empty(rank, d1, *kernel, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(d0, rank, *kernel, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Kaiming-uniform with a = √5 over the fan-in of A (as nn.Linear / nn.Conv initialise)
        fan_in = self.lora_A[0].numel()
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound)
            self.lora_B.zero_()

    def forward(self) -> Tensor:
        return torch.einsum("ar...,rb...->ab...", self.lora_B, self.lora_A)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
