"""Recipes as ordered lists of registered stages (the contract, the registry, the runner).

The stages themselves live with their algorithms in :mod:`diffquant.methods`, which registers
them on import; the papers' recipes are preset files in ``recipes/presets``.
"""
from .recipe import EXCLUSIVE, FACTS, PRESETS_DIR, Recipe, fingerprint, load_recipe, preset_names, run_recipe
from .registry import STAGES, Registry
from .stage import FAMILIES, EngineSettings, ForwardLoop, NoOptions, Stage, StageContext, options_table

__all__ = ["EXCLUSIVE", "FACTS", "FAMILIES", "PRESETS_DIR", "STAGES", "EngineSettings", "ForwardLoop", "NoOptions",
           "Recipe", "Registry", "Stage", "StageContext", "fingerprint", "load_recipe", "options_table",
           "preset_names", "run_recipe"]
