"""Recipes: compositions of shared calibration stages."""
from .naive import NaiveConfig, run_naive

#: recipe name -> (config class, run function)
RECIPES = {"naive": (NaiveConfig, run_naive)}

__all__ = ["RECIPES", "NaiveConfig", "run_naive"]
