"""The one resumable-checkpoint format of every long stage (reconstruction passes, fine-tuning).

A checkpoint is one directory ``<work_dir>/<name>/``:

- ``model/``: the quantizer state written by :func:`diffquant.model.checkpoint.save`
  (safetensors + JSON manifest: AdaRound V, LoRA, tables and rounding included);
- ``tensors.safetensors`` (optional): the stage's own tensors, e.g. AdamW moments;
- ``state.json``, written last: format and version, the kind of stage that wrote it, a
  fingerprint of the run's settings, the global torch RNG state and the stage's JSON body
  (position, per-unit records, schedule state).

A checkpoint is written into a sibling directory and then swapped in, so a kill at any moment
leaves a complete one (:mod:`diffquant.fsutil`). Reading validates every field, refuses a
checkpoint of other settings in one line, and never unpickles anything.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..config import to_dict
from ..errors import CheckpointError
from ..fsutil import fresh_directory, recover_directory, replace_directory
from ..jsonio import write_json
from .checkpoint import restore_into, save
from .qmodel import QuantModel

STATE_FILE = "state.json"
MODEL_DIR = "model"
TENSORS_FILE = "tensors.safetensors"
FORMAT = "diffquant-progress"
FORMAT_VERSION = 2


def fingerprint_of(settings: Any) -> str:
    """A short hash of JSON-able settings (dataclasses are converted first)."""
    blob = json.dumps(to_dict(settings), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode_rng(text: str) -> torch.Tensor:
    try:
        return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8).clone()
    except ValueError as exc:
        raise CheckpointError(f"the saved RNG state is corrupt ({exc})") from None


class ResumeCheckpoint:
    """The checkpoint directory ``root`` of one stage ``kind`` of a run with ``fingerprint``."""

    def __init__(self, root: str | Path, kind: str, fingerprint: str):
        self.root = Path(root)
        self.kind = kind
        self.fingerprint = fingerprint

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    def read(self, required: dict[str, type] | None = None) -> dict[str, Any] | None:
        """The saved body (a dict), or None when there is no checkpoint. ``required``: body fields
        and their types, checked here so a damaged file fails in one line."""
        recover_directory(self.root, STATE_FILE)
        file = self.state_file
        if not file.is_file():
            return None
        try:
            state = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file} is corrupt ({getattr(exc, 'msg', exc)})") from None
        if (not isinstance(state, dict) or state.get("format") != FORMAT
                or state.get("format_version") != FORMAT_VERSION):
            raise CheckpointError(f"{file} is not a diffquant progress file (format {FORMAT} v{FORMAT_VERSION})")
        if state.get("kind") != self.kind:
            raise CheckpointError(f"{file} holds {state.get('kind')!r} progress, not {self.kind!r}")
        for key, kind in (("fingerprint", str), ("rng", str), ("body", dict)):
            if not isinstance(state.get(key), kind):
                raise CheckpointError(f"{file}: field {key!r} is missing or of the wrong type")
        if state["fingerprint"] != self.fingerprint:
            raise CheckpointError(f"{self.root.parent} holds {self.kind} progress of a run with other settings; "
                                  "use a fresh work_dir")
        body = state["body"]
        for key, kind in (required or {}).items():
            if not isinstance(body.get(key), kind) or isinstance(body.get(key), bool):
                raise CheckpointError(f"{file}: field {key!r} is missing or of the wrong type")
        self._rng = state["rng"]
        return body

    def restore_model(self, qmodel: QuantModel) -> None:
        """Load the saved quantizer state into ``qmodel`` (same plan) and the saved torch RNG state."""
        restore_into(qmodel, self.root / MODEL_DIR)
        torch.set_rng_state(_decode_rng(self._rng))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stage's own saved tensors (empty when it saved none)."""
        file = self.root / TENSORS_FILE
        if not file.is_file():
            return {}
        try:
            return load_file(str(file))
        except Exception as exc:  # safetensors raises its own error types for damaged files
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{file} is truncated or corrupt ({first})") from None

    def write(self, qmodel: QuantModel, body: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
              *, manifest_extra: dict | None = None) -> None:
        """Replace the checkpoint by ``qmodel``'s state, ``body`` and ``tensors`` (atomically)."""
        fresh = fresh_directory(self.root, STATE_FILE)
        save(qmodel, fresh / MODEL_DIR, extra=manifest_extra)
        if tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(fresh / TENSORS_FILE))
        state = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind,
                 "fingerprint": self.fingerprint, "rng": _encode_rng(torch.get_rng_state()), "body": body}
        write_json(fresh / STATE_FILE, state, indent=1, default=float)  # written last: the copy is complete
        replace_directory(fresh, self.root)
        self._rng = state["rng"]


__all__ = ["FORMAT", "FORMAT_VERSION", "MODEL_DIR", "STATE_FILE", "TENSORS_FILE", "ResumeCheckpoint",
           "fingerprint_of"]
