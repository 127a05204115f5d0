"""Strict JSON for every file diffquant writes.

Python's ``json`` writes ``NaN`` and ``Infinity``, which are not JSON: other tools refuse the
file. Here a non-finite float is written as the string ``"nan"``, ``"inf"`` or ``"-inf"``, numpy
and torch scalars as plain numbers, tuples as lists and paths as strings; anything else that is
not JSON is an error rather than a silent ``str()``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def to_json_value(obj: Any) -> Any:
    """``obj`` with every value made strict-JSON-able (see the module docstring)."""
    if isinstance(obj, dict):
        return {str(k): to_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_value(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        obj = obj.item()
    elif hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:
        obj = obj.item()  # a 0-d torch tensor or numpy array
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (os.PathLike,)):
        return os.fspath(obj)
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """``json.dumps`` that never writes NaN/Infinity (``allow_nan=False`` after conversion)."""
    return json.dumps(to_json_value(obj), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, **kwargs) -> Path:
    """Write ``obj`` as strict JSON to ``path`` atomically (temporary file, then rename), so an
    interruption never leaves a half-written file. The temporary name carries the process id, so
    processes writing the same file at once (ranks under torchrun) never rename each other's."""
    path = Path(path)
    text = dumps(obj, indent=indent, **kwargs) + "\n"
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
