"""A small CNN classifier for Fashion-MNIST, used to score generated samples.

Stored as ``model.safetensors`` plus ``config.json`` (constructor arguments and training
metadata such as the test accuracy).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffquant.errors import DiffquantError
from diffquant.jsonio import write_json

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FashionClassifier(nn.Module):
    """VGG-style CNN: images in [-1, 1] ``[B,1,28,28]`` -> logits ``[B,num_classes]``.

    ``channels=(c1, c2, c3)``: one conv at 28x28 (c1), two at 14x14 (c2), one at 7x7 (c3), then
    global average pooling and a linear layer. The default has about 130k parameters.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), num_classes: int = 10,
                 dropout: float = 0.2):
        super().__init__()
        if len(channels) != 3:
            raise DiffquantError(f"FashionClassifier needs 3 channel counts, got {tuple(channels)}")
        c1, c2, c3 = (int(c) for c in channels)
        self.channels = (c1, c2, c3)
        self.num_classes = num_classes
        self.dropout = dropout
        self.features = nn.Sequential(
            *_conv_bn(1, c1), nn.MaxPool2d(2),
            *_conv_bn(c1, c2), *_conv_bn(c2, c2), nn.MaxPool2d(2),
            *_conv_bn(c2, c3),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(c3, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def config(self) -> dict[str, Any]:
        return {"arch": "FashionClassifier", "channels": list(self.channels),
                "num_classes": self.num_classes, "dropout": self.dropout,
                "input_range": [-1.0, 1.0], "input_shape": [1, 28, 28]}


def save_classifier(model: FashionClassifier, out_dir: str | os.PathLike,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (with ``extra`` metadata) to ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_NAME))
    write_json(out / CONFIG_NAME, {**model.config(), **(extra or {})})
    return out


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> FashionClassifier:
    """Load a classifier folder written by :func:`save_classifier`, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights.is_file():
        raise DiffquantError(f"{path} is not a classifier folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("arch") != "FashionClassifier":
        raise DiffquantError(f"{cfg_file}: unknown classifier arch {cfg.get('arch')!r}")
    model = FashionClassifier(channels=tuple(cfg["channels"]), num_classes=cfg["num_classes"],
                              dropout=cfg.get("dropout", 0.0))
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()
