"""Loading ``.pt``/``.pth`` files without ever running code from them, with one-line errors.

``torch.load(weights_only=True)`` refuses anything but tensors and plain containers, which keeps a
hostile file from running code, but it says so in a multi-line traceback; a state dict that does
not fit the model fails in ``load_state_dict`` with a page of "size mismatch" lines. These
helpers turn both into a :class:`~diffquant.errors.DiffquantError` that names the file and the
first problem.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .errors import DiffquantError


def load_torch_file(path: str | os.PathLike, what: str = "weights file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a refused or damaged file is one line."""
    path = Path(path)
    if not path.is_file():
        raise DiffquantError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DiffquantError(f"{path}: refused to load this {what}: it holds Python objects other than tensors "
                             "and plain containers (loading them could run code from the file)") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DiffquantError(f"{path}: not a readable {what} ({first})") from None


def load_tensor_dict(path: str | os.PathLike, what: str = "weights file") -> dict[str, Tensor]:
    """A file that must hold a flat ``{name: tensor}`` state dict."""
    state = load_torch_file(path, what)
    if not isinstance(state, Mapping):
        raise DiffquantError(f"{path}: expected a state dict (name → tensor), got a {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise DiffquantError(f"{path}: expected a state dict of tensors; entry {key!r} is a "
                                 f"{type(value).__name__}")
    return dict(state)


def load_state_strict(model: nn.Module, state: Mapping[str, Tensor], source: str | os.PathLike) -> None:
    """``model.load_state_dict(state, strict=True)``, reporting the first mismatch in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise DiffquantError(f"{source} does not fit {type(model).__name__}: {len(missing)} missing and "
                             f"{len(unexpected)} unexpected tensors ({detail})")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise DiffquantError(f"{source} does not fit {type(model).__name__}: {key} has shape "
                                 f"{tuple(value.shape)} in the file, {tuple(own[key].shape)} in the model")
    model.load_state_dict(state, strict=True)
