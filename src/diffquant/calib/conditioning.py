"""Per-sample conditioning of recorded denoiser calls, carried through every recipe.

A calibration entry of a text-to-image, DiT or any other conditioned denoiser is more than
(x_t, t, class label): it is every argument the pipeline passed — ``encoder_hidden_states``,
``added_cond_kwargs``, ``timestep_cond``, ``class_labels``, attention masks — with the
conditional and unconditional halves of classifier-free guidance as separate rows.
:class:`Conditioning` stores the batched ones as tensors with a leading sample axis (nested
dicts flattened to ``outer/inner`` keys) and the rest as constants, and rebuilds the keyword
arguments of any subset of rows. It sits in a :class:`~diffquant.calib.select.CalibrationSet`'s
``labels`` slot, so selection, subsets, devices and the recipes' ``call(model, x, t, labels)``
carry it without knowing what it holds; :func:`conditioned_call` is that call.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import DiffquantError

SEP = "/"


def _flatten(kwargs: Mapping[str, Any], batch: int, prefix: str = "") -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    constants: dict[str, Any] = {}
    for key, value in kwargs.items():
        name = prefix + key
        if isinstance(value, Mapping):
            t, c = _flatten(value, batch, name + SEP)
            tensors.update(t)
            constants.update(c)
            if not value:
                constants[name] = {}
        elif isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
            tensors[name] = value.detach()
        else:
            constants[name] = value.detach() if isinstance(value, Tensor) else value
    return tensors, constants


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        parts = name.split(SEP)
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return type(a) is type(b) and a == b


class Conditioning:
    """Keyword arguments of ``n`` recorded denoiser inputs: per-row tensors plus shared constants."""

    def __init__(self, tensors: Mapping[str, Tensor], constants: Mapping[str, Any] | None = None,
                 n: int | None = None):
        self.tensors = dict(tensors)
        self.constants = dict(constants or {})
        sizes = {int(v.shape[0]) for v in self.tensors.values()}
        if n is None:
            if len(sizes) != 1:
                raise DiffquantError("conditioning needs its row count when it holds no per-row tensor")
            n = sizes.pop()
        elif sizes and sizes != {n}:
            raise DiffquantError(f"conditioning tensors have {sorted(sizes)} rows, expected {n}")
        self.n = int(n)

    @classmethod
    def from_call(cls, kwargs: Mapping[str, Any], batch: int) -> "Conditioning":
        """The conditioning of one call with ``batch`` rows (tensors with that leading size are per row)."""
        tensors, constants = _flatten(kwargs, batch)
        return cls(tensors, constants, batch)

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Rows of several recorded calls, in order; they must share keys and constants."""
        if not parts:
            raise DiffquantError("no conditioning to concatenate")
        first = parts[0]
        for part in parts[1:]:
            if set(part.tensors) != set(first.tensors) or set(part.constants) != set(first.constants):
                raise DiffquantError("recorded denoiser calls differ in their keyword arguments "
                                     f"({sorted(set(part.tensors) ^ set(first.tensors))}); capture them separately")
            for key, value in part.constants.items():
                if not _same(value, first.constants[key]):
                    raise DiffquantError(f"recorded denoiser calls differ in the non-batched argument {key!r}")
        tensors = {k: torch.cat([p.tensors[k] for p in parts]) for k in first.tensors}
        return Conditioning(tensors, first.constants, sum(p.n for p in parts))

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int]:
        return (self.n,)

    def __getitem__(self, index) -> "Conditioning":
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        elif not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long)
        rows = torch.arange(self.n)[index]
        return Conditioning({k: v[index] for k, v in self.tensors.items()}, self.constants, int(rows.numel()))

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Moved to ``device``; floating-point tensors cast to ``dtype`` when given."""
        def move(v: Tensor) -> Tensor:
            return v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)

        constants = {k: move(v) if isinstance(v, Tensor) else v for k, v in self.constants.items()}
        return Conditioning({k: move(v) for k, v in self.tensors.items()}, constants, self.n)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of one denoiser call on these rows (nested dicts rebuilt)."""
        return _unflatten({**self.constants, **self.tensors})

    def fingerprint(self) -> str:
        """A digest of the contents (for resumable-run fingerprints)."""
        h = hashlib.sha256()
        for key in sorted(self.tensors):
            v = self.tensors[key].detach().cpu().contiguous()
            h.update(f"{key}:{tuple(v.shape)}:{v.dtype};".encode())
            h.update(v.double().sum().item().hex().encode() if v.is_floating_point() else v.numpy().tobytes())
        h.update(repr(sorted((k, repr(v)) for k, v in self.constants.items())).encode())
        return h.hexdigest()[:20]

    def non_finite(self) -> tuple[str, int] | None:
        """The first per-row tensor with NaN/Inf and its count, else None."""
        for key, value in self.tensors.items():
            if value.is_floating_point():
                bad = int((~torch.isfinite(value)).sum())
                if bad:
                    return key, bad
        return None

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}{list(v.shape[1:])}" for k, v in self.tensors.items())
        return f"Conditioning({self.n} rows: {keys}; constants {sorted(self.constants)})"


def conditioned_call(model: nn.Module, x: Tensor, t: Tensor, labels: Any = None) -> Tensor:
    """``model(x, t, **conditioning)`` for a recorded call (or with ``class_labels=labels``), returning
    the prediction tensor — the ``call`` recipes use for calibration sets captured from a pipeline."""
    from ..bundle import denoiser_output_tensor

    if isinstance(labels, Conditioning):
        kwargs = labels.to(x.device).kwargs()
        return denoiser_output_tensor(model(x, t, **kwargs))
    if labels is None:
        return denoiser_output_tensor(model(x, t))
    return denoiser_output_tensor(model(x, t, class_labels=labels))
