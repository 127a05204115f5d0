"""Recipes: compositions of shared calibration stages."""
from .dmq import DMQConfig, DMQOfficialConfig, run_dmq
from .edadm import EDADMConfig, EDADMOfficialConfig, run_edadm
from .mpqdm import EfficientDMConfig, MPQDMConfig, MPQDMOfficialConfig, run_efficientdm, run_mpqdm
from .naive import NaiveConfig, run_naive
from .qdiffusion import QDiffusionConfig, QDiffusionOfficialConfig, run_qdiffusion

#: recipe name -> (config class, run function)
RECIPES = {
    "naive": (NaiveConfig, run_naive),
    "qdiffusion": (QDiffusionConfig, run_qdiffusion),
    "qdiffusion_official": (QDiffusionOfficialConfig, run_qdiffusion),
    "edadm": (EDADMConfig, run_edadm),
    "edadm_official": (EDADMOfficialConfig, run_edadm),
    "dmq": (DMQConfig, run_dmq),
    "dmq_official": (DMQOfficialConfig, run_dmq),
    "efficientdm": (EfficientDMConfig, run_efficientdm),
    "mpqdm": (MPQDMConfig, run_mpqdm),
    "mpqdm_official": (MPQDMOfficialConfig, run_mpqdm),
}

__all__ = ["RECIPES", "DMQConfig", "DMQOfficialConfig", "run_dmq", "EDADMConfig", "EDADMOfficialConfig", "run_edadm", "NaiveConfig", "QDiffusionConfig", "QDiffusionOfficialConfig", "run_naive", "run_qdiffusion",
           "EfficientDMConfig", "MPQDMConfig", "MPQDMOfficialConfig", "run_efficientdm", "run_mpqdm"]
