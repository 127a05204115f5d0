"""Regenerate src/diffquant/recipes/presets/*.yaml from the recipes' flat configs (each preset is
the stage list its flat config builds; tests/recipes/test_stage_contract.py checks the two agree).

    python3 scripts/write_presets.py
"""
from __future__ import annotations

import yaml

from diffquant.methods import RECIPES
from diffquant.recipes import PRESETS_DIR


def main() -> None:
    for name, (config_cls, _run) in sorted(RECIPES.items()):
        recipe = config_cls().to_recipe()
        header = f"# preset {name}: the stage list that recipe '{name}' runs (diffquant recipes show {name}).\n"
        (PRESETS_DIR / f"{name}.yaml").write_text(header + yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        print("wrote", PRESETS_DIR / f"{name}.yaml")


if __name__ == "__main__":
    main()
