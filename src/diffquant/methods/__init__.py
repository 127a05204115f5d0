"""Recipes: compositions of shared calibration stages."""
from .edadm import EDADMConfig, EDADMOfficialConfig, run_edadm
from .naive import NaiveConfig, run_naive
from .qdiffusion import QDiffusionConfig, QDiffusionOfficialConfig, run_qdiffusion

#: recipe name -> (config class, run function)
RECIPES = {
    "naive": (NaiveConfig, run_naive),
    "qdiffusion": (QDiffusionConfig, run_qdiffusion),
    "qdiffusion_official": (QDiffusionOfficialConfig, run_qdiffusion),
    "edadm": (EDADMConfig, run_edadm),
    "edadm_official": (EDADMOfficialConfig, run_edadm),
}

__all__ = ["RECIPES", "EDADMConfig", "EDADMOfficialConfig", "run_edadm", "NaiveConfig", "QDiffusionConfig", "QDiffusionOfficialConfig", "run_naive", "run_qdiffusion"]
