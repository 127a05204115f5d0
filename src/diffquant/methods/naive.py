"""Naive baseline, the papers' "Linear Quant" row (METHODS.md §2).

Round-to-nearest weights with per-channel ranges, per-tensor activation ranges from the
calibration inputs over all timesteps (one set shared by all steps). No reconstruction.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import QuantConfig, checked
from ..errors import ConfigError
from ..model.qmodel import QuantModel
from .stages import ForwardLoop, init_weight_quantizers, observe_activations


@dataclass
@checked
class NaiveConfig:
    """Options of the naive recipe (its coverage is the wrap config's)."""

    #: weight range init: minmax | lp_shrink (applied through QuantConfig.weight_init)
    w_init: str = "minmax"
    #: activation range init: minmax (global) | ema_minmax
    a_init: str = "minmax"

    def wrap_config(self, quant: QuantConfig) -> QuantConfig:
        """The wrap config with this recipe's range policies (applied before wrapping)."""
        quant = dataclasses.replace(quant)
        quant.weight_init = self.w_init
        quant.act_init = self.a_init
        quant.__post_init__()
        return quant


def run_naive(qmodel: QuantModel, forward_loop: ForwardLoop | None, config: NaiveConfig | None = None) -> QuantModel:
    """Calibrate ``qmodel`` in place: weights, then activation ranges from ``forward_loop``."""
    config = config or NaiveConfig()
    init_weight_quantizers(qmodel)
    if qmodel.quant_config.quantize_acts and qmodel.quantizers("act"):
        if forward_loop is None:
            raise ConfigError("activation quantization needs calibration data: pass a forward_loop")
        observe_activations(qmodel, forward_loop)
    qmodel.set_quant_state(weights=qmodel.quant_config.quantize_weights, acts=qmodel.quant_config.quantize_acts)
    qmodel.recipe = "naive"
    qmodel.recipe_config = config
    qmodel.eval()
    return qmodel
