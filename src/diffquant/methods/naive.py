"""Naive baseline, the papers' "Linear Quant" row (docs/methods.md §2).

Round-to-nearest weights with per-channel ranges, per-tensor activation ranges from the
calibration inputs over all timesteps (one set shared by all steps). No reconstruction.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import QuantConfig, checked
from ..model.qmodel import QuantModel
from ..recipes import ForwardLoop, Recipe, StageContext, run_recipe
from .stages import ActInit, RoundToNearest


@dataclass
@checked
class NaiveConfig:
    """Options of the naive recipe (its coverage is the wrap config's)."""

    #: weight range init: minmax | lp_shrink (applied through QuantConfig.weight_init)
    w_init: str = "minmax"
    #: activation range init: minmax (global) | ema_minmax
    a_init: str = "minmax"

    recipe_name = "naive"

    def to_recipe(self) -> Recipe:
        """These knobs as the stage list of the ``naive`` preset: round-to-nearest weights, then
        activation ranges over the whole calibration loop."""
        return Recipe("naive", [RoundToNearest(policy=self.w_init), ActInit(policy=self.a_init)],
                      description="Linear quantization: round-to-nearest weights, min-max activation ranges")

    def wrap_config(self, quant: QuantConfig) -> QuantConfig:
        """The wrap config with this recipe's range policies (applied before wrapping)."""
        return self.to_recipe().wrap_config(quant)


def run_naive(qmodel: QuantModel, forward_loop: ForwardLoop | None, config: NaiveConfig | None = None) -> QuantModel:
    """Calibrate ``qmodel`` in place: weights, then activation ranges from ``forward_loop``."""
    config = config or NaiveConfig()
    return run_recipe(qmodel, config.to_recipe(), StageContext(forward_loop=forward_loop), recipe_config=config)
