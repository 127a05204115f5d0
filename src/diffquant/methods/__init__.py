"""Recipes: compositions of shared calibration stages."""
from .naive import NaiveConfig, run_naive
from .qdiffusion import QDiffusionConfig, QDiffusionOfficialConfig, run_qdiffusion

#: recipe name -> (config class, run function)
RECIPES = {
    "naive": (NaiveConfig, run_naive),
    "qdiffusion": (QDiffusionConfig, run_qdiffusion),
    "qdiffusion_official": (QDiffusionOfficialConfig, run_qdiffusion),
}

__all__ = ["RECIPES", "NaiveConfig", "QDiffusionConfig", "QDiffusionOfficialConfig", "run_naive", "run_qdiffusion"]
