"""Tensor-level quantization: affine grids, the quantizer, range searches, AdaRound, QDrop."""
from .adaround import GAMMA, ZETA, AdaRound, BetaSchedule, rectified_sigmoid
from .affine import (
    FLOAT_BITS,
    GRIDS,
    MIN_STEP,
    GridSpec,
    fake_quantize,
    floor_ste,
    qparams_from_range,
    quantize_to_int,
    round_ste,
    validate_bits,
    validate_grid,
)
from .qdrop import mix_inputs
from .quantizer import UniformQuantizer
from .ranges import POLICIES, batch_range, combine_ranges, minmax_range, validate_policy
from .search import data_side, edadm_grid_range, lp_shrink_range
from .timestep import LOOKUP_MODES, TimestepIndex

__all__ = [
    "AdaRound",
    "BetaSchedule",
    "FLOAT_BITS",
    "GAMMA",
    "GRIDS",
    "GridSpec",
    "LOOKUP_MODES",
    "MIN_STEP",
    "POLICIES",
    "TimestepIndex",
    "UniformQuantizer",
    "ZETA",
    "batch_range",
    "combine_ranges",
    "data_side",
    "edadm_grid_range",
    "fake_quantize",
    "floor_ste",
    "lp_shrink_range",
    "minmax_range",
    "mix_inputs",
    "qparams_from_range",
    "quantize_to_int",
    "rectified_sigmoid",
    "round_ste",
    "validate_bits",
    "validate_grid",
    "validate_policy",
]
