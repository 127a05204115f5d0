"""Reconstruction engine: unit caches, losses, passes, the unit-by-unit loop and its checkpoints."""
from .cache import (
    CacheOptions,
    CalibrationCalls,
    UnitCache,
    build_unit_cache,
    default_call,
)
from .engine import EngineOptions, ReconPass, UnitOptim, UnitRecord, evaluate_unit, reconstruct, reconstruct_unit
from .loss import channel_axis_of, lp_loss, rounding_regularizer
from .passes import AdaRoundPass, LSQPass
from .progress import ReconProgress, fingerprint_of, restore_into
from .state import quant_state
from .units import Unit, make_units

__all__ = [
    "AdaRoundPass",
    "CacheOptions",
    "CalibrationCalls",
    "EngineOptions",
    "LSQPass",
    "ReconPass",
    "ReconProgress",
    "Unit",
    "UnitCache",
    "UnitOptim",
    "UnitRecord",
    "build_unit_cache",
    "channel_axis_of",
    "default_call",
    "evaluate_unit",
    "fingerprint_of",
    "lp_loss",
    "make_units",
    "quant_state",
    "reconstruct",
    "reconstruct_unit",
    "restore_into",
    "rounding_regularizer",
]
