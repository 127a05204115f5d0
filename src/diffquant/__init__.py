"""diffquant: post-training quantization of diffusion models.

Public API::

    import diffquant
    qmodel = diffquant.quantize(unet, diffquant.QuantConfig(weight_bits=4, act_bits=8))
    diffquant.run_naive(qmodel, forward_loop)          # or another recipe
    diffquant.save(qmodel, "out/w4a8")
    qmodel = diffquant.load(fresh_unet, "out/w4a8")
"""
__version__ = "0.1.0"

from .config import LayerRule, QuantConfig, load_yaml, save_yaml  # noqa: E402
from .errors import CheckpointError, ConfigError, DiffquantError  # noqa: E402
from .methods import RECIPES, NaiveConfig, run_naive  # noqa: E402
from .model import QuantModel, load, quantize, save  # noqa: E402

__all__ = [
    "CheckpointError", "ConfigError", "DiffquantError", "LayerRule", "NaiveConfig", "QuantConfig",
    "QuantModel", "RECIPES", "load", "load_yaml", "quantize", "run_naive", "save", "save_yaml",
]
