"""Example inputs for model families whose call convention diffquant knows (diffusers)."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


def _param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _size(value, default: int = 32) -> tuple[int, int]:
    if value is None:
        return default, default
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def example_inputs_for(model: nn.Module, batch: int = 2) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for one valid forward of a diffusers UNet2DModel,
    UNet2DConditionModel or Transformer2DModel / DiTTransformer2DModel."""
    p = _param(model)
    dev, dtype = p.device, p.dtype
    cfg = getattr(model, "config", None)
    cls = type(model).__name__
    t = torch.full((batch,), 10, dtype=torch.long, device=dev)
    if cls == "UNet2DModel":
        h, w = _size(cfg.sample_size)
        x = torch.randn(batch, cfg.in_channels, h, w, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
        kwargs = {}
        if cfg.num_class_embeds is not None:
            kwargs["class_labels"] = torch.arange(batch, device=dev) % cfg.num_class_embeds
        return (x, t), kwargs
    if cls == "UNet2DConditionModel":
        h, w = _size(cfg.sample_size, 16)
        x = torch.randn(batch, cfg.in_channels, h, w, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
        ctx = torch.randn(batch, 4, cfg.cross_attention_dim, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
        kwargs = {"encoder_hidden_states": ctx}
        if cfg.num_class_embeds is not None:
            kwargs["class_labels"] = torch.arange(batch, device=dev) % cfg.num_class_embeds
        return (x, t), kwargs
    if cls in ("Transformer2DModel", "DiTTransformer2DModel"):
        h, w = _size(cfg.sample_size, 8)
        x = torch.randn(batch, cfg.in_channels, h, w, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
        kwargs = {"timestep": t}
        if getattr(cfg, "num_embeds_ada_norm", None):
            kwargs["class_labels"] = torch.arange(batch, device=dev) % cfg.num_embeds_ada_norm
        return (x,), kwargs
    if hasattr(model, "example_inputs"):
        return model.example_inputs(batch)
    raise ConfigError(
        f"don't know how to call a {cls}: pass example_inputs=(args, kwargs) to quantize()"
    )
