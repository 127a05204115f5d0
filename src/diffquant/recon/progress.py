"""Resumable reconstruction: a checkpoint after every finished unit.

``<work_dir>/progress/`` is a :class:`diffquant.model.resume.ResumeCheckpoint` (the one
checkpoint format: quantizer state, ``state.json`` written last, atomic swap) whose body holds the
pass and index of the last finished unit, the per-unit records so far and the unit lists.

A run given the same ``work_dir`` restores that state into its freshly wrapped model and continues
at the next unit; because every unit is trained with its own seed, it ends in the same state as an
uninterrupted run. A ``work_dir`` holding progress of different settings is refused.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..diffusion import distributed
from ..errors import CheckpointError
from ..model.checkpoint import restore_into
from ..model.qmodel import QuantModel
from ..model.resume import ResumeCheckpoint, fingerprint_of

PROGRESS_DIR = "progress"
KIND = "reconstruction"


class ReconProgress:
    """Checkpoints of the passes ``passes`` (in their order) of one reconstruction run."""

    def __init__(self, work_dir: str | Path, passes: list[str], fingerprint: str, *, min_interval_s: float = 0.0):
        self.root = Path(work_dir)
        self.min_interval_s = float(min_interval_s)
        self._last_write = -float("inf")  # the first unit is always checkpointed
        self.passes = list(passes)
        self.fingerprint = fingerprint
        self.store = ResumeCheckpoint(self.root / PROGRESS_DIR, KIND, fingerprint)
        self.state: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return self.store.root

    def restore(self, qmodel: QuantModel) -> bool:
        """Restore the last checkpoint into ``qmodel``; False when there is none."""
        state = self.store.read({"pass": str, "last_unit": int, "units": dict, "records": dict})
        if state is None:
            return False
        if state["pass"] not in self.passes:
            raise CheckpointError(f"{self.path}: unknown pass {state['pass']!r}")
        self.store.restore_model(qmodel)
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
        """Checkpoint after unit ``last_unit`` of ``pass_name`` (``records``: that pass so far) —
        only when ``min_interval_s`` have passed since the last one: writing the whole quantizer
        state after every small unit cost a sixth of a run. A resumed run redoes the units after
        the last checkpoint; each is trained from its own seed, so it ends in the same state."""
        previous = self.state or {"records": {}, "units": {}}
        state = {
            "pass": pass_name,
            "last_unit": int(last_unit),
            "units": {**previous["units"], pass_name: list(unit_names)},
            "records": {**previous["records"], pass_name: list(records)},
        }
        self.state = state  # what this run has done (records of every pass complete), written or not
        if not distributed.dist_info().is_main:  # ranks hold identical states: rank 0 writes it
            return
        if time.monotonic() - self._last_write < self.min_interval_s:
            return
        self.store.write(qmodel, state, manifest_extra={"progress": {"pass": pass_name, "last_unit": int(last_unit)}})
        self._last_write = time.monotonic()


__all__ = ["PROGRESS_DIR", "ReconProgress", "fingerprint_of", "restore_into"]
