"""diffquant: post-training quantization of diffusion models.

Public API::

    import diffquant
    qmodel = diffquant.quantize(unet, diffquant.QuantConfig(weight_bits=4, act_bits=8))
    diffquant.run_naive(qmodel, forward_loop)          # or another recipe
    diffquant.save(qmodel, "out/w4a8")
    qmodel = diffquant.load(fresh_unet, "out/w4a8")

A diffusers pipeline, drop-in::

    calib = diffquant.capture_pipeline(pipe, prompts=["a cat"], num_inference_steps=20)
    pipe.unet = diffquant.apply_recipe(pipe.unet, calib, "qdiffusion", diffquant.QuantConfig(weight_bits=4))
"""
from ._version import __version__  # noqa: F401 (public: diffquant.__version__)

from .bundle import DiffusionBundle  # noqa: E402
from .config import LayerRule, QuantConfig, load_yaml, save_yaml  # noqa: E402
from .errors import CheckpointError, ConfigError, DiffquantError  # noqa: E402
from .methods import (  # noqa: E402
    RECIPES, DMQConfig, EDADMConfig, EfficientDMConfig, MPQDMConfig, NaiveConfig, QDiffusionConfig, run_naive,
)
from .model import QuantModel, load, load_pipeline, quantize, save, save_pipeline  # noqa: E402
from .calib.conditioning import Conditioning, conditioned_call  # noqa: E402
from .calib.pipeline_capture import PipelineCalibration, capture_pipeline, read_prompts, record_calls  # noqa: E402
from .pipeline import apply_recipe, quantize_bundle  # noqa: E402
from .recipes import STAGES, Recipe, Stage, StageContext, load_recipe, preset_names, run_recipe  # noqa: E402

# A pipeline saved with a QuantModel component names it ["diffquant", "QuantModel"] in
# model_index.json; diffusers loads such a component by looking up its base classes by name in
# the library module, so the base class diffquant's component derives from is reachable here.
from diffusers import ModelMixin  # noqa: E402,F401

__all__ = [
    "CheckpointError", "ConfigError", "Conditioning", "DMQConfig", "DiffusionBundle", "DiffquantError", "EDADMConfig",
    "EfficientDMConfig", "LayerRule", "MPQDMConfig", "NaiveConfig", "QDiffusionConfig",
    "PipelineCalibration", "QuantConfig", "QuantModel", "RECIPES", "apply_recipe", "capture_pipeline",
    "conditioned_call", "load", "load_pipeline", "load_yaml", "quantize", "read_prompts", "record_calls", "run_naive", "save",
    "save_pipeline", "save_yaml", "STAGES", "Recipe", "Stage", "StageContext", "load_recipe", "preset_names",
    "quantize_bundle", "run_recipe",
]
