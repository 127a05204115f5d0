"""Resumable reconstruction: a checkpoint after every finished unit.

``<work_dir>/progress/`` holds the quantizer state written by :func:`diffquant.model.save`
(safetensors + manifest, AdaRound V and hard rounding included) and ``progress.json`` with the
pass and index of the last finished unit, the per-unit records so far, a fingerprint of the run's
settings and the global torch RNG state. A checkpoint is written to a sibling directory first and
then swapped in, so an interruption never leaves a half-written one, nor none at all (a kill
between the two renames of the swap is repaired on the next read: :mod:`diffquant.fsutil`).

A run given the same ``work_dir`` restores that state into its freshly wrapped model and continues
at the next unit; because every unit is trained with its own seed, it ends in the same state as an
uninterrupted run. A ``work_dir`` holding progress of different settings is refused.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..errors import CheckpointError
from ..model.checkpoint import restore_into, save
from ..model.qmodel import QuantModel
from ..fsutil import fresh_directory, recover_directory, replace_directory
from ..jsonio import write_json

PROGRESS_DIR = "progress"
PROGRESS_FILE = "progress.json"
FORMAT = "diffquant-recon-progress"
FORMAT_VERSION = 1
#: quantizer attributes kept in the manifest rather than in tensors


def fingerprint_of(settings: Any) -> str:
    """A short hash of JSON-able settings (dataclasses are converted first)."""
    blob = json.dumps(to_dict(settings), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


class ReconProgress:
    """Checkpoints of the passes ``passes`` (in their order) of one reconstruction run."""

    def __init__(self, work_dir: str | Path, passes: list[str], fingerprint: str):
        self.root = Path(work_dir)
        self.passes = list(passes)
        self.fingerprint = fingerprint
        self.state: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return self.root / PROGRESS_DIR

    def _read(self) -> dict[str, Any] | None:
        recover_directory(self.path, PROGRESS_FILE)
        file = self.path / PROGRESS_FILE
        if not file.is_file():
            return None
        try:
            state = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file} is corrupt ({getattr(exc, 'msg', exc)})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{file} is not a diffquant reconstruction progress file")
        for key, kind in (("fingerprint", str), ("pass", str), ("last_unit", int), ("units", dict),
                          ("records", dict), ("rng", str)):
            if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
                raise CheckpointError(f"{file}: field {key!r} is missing or of the wrong type")
        return state

    def restore(self, qmodel: QuantModel) -> bool:
        """Restore the last checkpoint into ``qmodel``; False when there is none."""
        state = self._read()
        if state is None:
            return False
        if state["fingerprint"] != self.fingerprint:
            raise CheckpointError(
                f"{self.root} holds progress of a run with other settings; use a fresh work_dir"
            )
        if state["pass"] not in self.passes:
            raise CheckpointError(f"{self.path}: unknown pass {state['pass']!r}")
        restore_into(qmodel, self.path)
        torch.set_rng_state(_decode_rng(state["rng"]))
        self.state = state
        return True

    def _pass_position(self, name: str) -> int:
        if name not in self.passes:
            raise CheckpointError(f"pass {name!r} is not one of {self.passes}")
        return self.passes.index(name)

    def started(self, pass_name: str) -> bool:
        """Whether the restored checkpoint is in ``pass_name`` or a later pass."""
        if self.state is None:
            return False
        return self._pass_position(self.state["pass"]) >= self._pass_position(pass_name)

    def finished_units(self, pass_name: str, unit_names: list[str]) -> int:
        """How many units of ``pass_name`` the restored checkpoint has finished (0 … all)."""
        if self.state is None:
            return 0
        here, saved = self._pass_position(pass_name), self._pass_position(self.state["pass"])
        if saved < here:
            return 0
        if self.state["units"].get(pass_name, list(unit_names)) != list(unit_names):
            raise CheckpointError(f"{self.path}: the saved {pass_name} pass has a different list of units")
        return len(unit_names) if saved > here else self.state["last_unit"] + 1

    def records(self, pass_name: str) -> list[dict]:
        return [] if self.state is None else list(self.state["records"].get(pass_name, []))

    def save(self, qmodel: QuantModel, pass_name: str, last_unit: int, unit_names: list[str],
             records: list[dict]) -> None:
        """Checkpoint after unit ``last_unit`` of ``pass_name`` (``records``: that pass so far)."""
        previous = self.state or {"records": {}, "units": {}}
        state = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "pass": pass_name,
            "last_unit": int(last_unit),
            "units": {**previous["units"], pass_name: list(unit_names)},
            "records": {**previous["records"], pass_name: list(records)},
            "rng": _encode_rng(torch.get_rng_state()),
        }
        fresh = fresh_directory(self.path, PROGRESS_FILE)
        save(qmodel, fresh, extra={"progress": {"pass": pass_name, "last_unit": int(last_unit)}})
        write_json(fresh / PROGRESS_FILE, state, indent=1)  # written last: marks the copy complete
        replace_directory(fresh, self.path)
        self.state = state
