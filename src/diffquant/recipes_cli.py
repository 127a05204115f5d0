"""``diffquant recipes``: the registered stages (options, defaults, descriptions) and the presets.

``diffquant recipes`` lists every stage by family and every preset; ``diffquant recipes show NAME``
prints one stage's option table or one preset's (or recipe file's) stage list as YAML;
``diffquant recipes check FILE`` validates a recipe file (order and options) without running it.
"""
from __future__ import annotations

import argparse

import yaml

from .recipes import FAMILIES, STAGES, load_recipe, options_table, preset_names


def add_recipes_parser(sub) -> None:
    p = sub.add_parser("recipes", help="list the recipe stages, their options and defaults, and the presets",
                       description="Recipes are ordered lists of stages. Without arguments: every stage by family "
                                   "and every preset. `show NAME`: a stage's options or a preset's stages; "
                                   "`check FILE`: validate a recipe file.")
    p.add_argument("action", nargs="?", choices=["list", "show", "check"], default="list")
    p.add_argument("name", nargs="?", help="a stage, a preset or a recipe file (show / check)")
    p.set_defaults(handler=run_recipes)


def _format(value) -> str:
    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def stage_text(name: str) -> str:
    cls = STAGES.get(name)
    lines = [f"{name} ({cls.family}): {cls.summary()}", "", "| option | type | default | description |",
             "|---|---|---|---|"]
    lines += [f"| {r['option']} | {r['type']} | {_format(r['default'])} | {r['doc']} |" for r in options_table(cls)]
    if len(lines) == 4:
        lines.append("| (none) | | | |")
    return "\n".join(lines)


def listing() -> str:
    lines = ["Stages (diffquant recipes show STAGE for the options):"]
    for family in FAMILIES:
        names = [n for n in STAGES if STAGES.get(n).family == family]
        if names:
            lines.append(f"  {family}:")
            lines += [f"    {n:<20} {STAGES.get(n).summary()}" for n in names]
    lines += ["", "Presets (diffquant recipes show PRESET for the stage list):"]
    for name in preset_names():
        recipe = load_recipe(name)
        lines.append(f"  {name:<20} {' → '.join(s.name for s in recipe.stages)}")
    lines += ["", "A recipe file lists stages in order: `stages: [{select_tdac: {n: 256}}, les, rtn, adaround, ...]`;",
              "run it with `diffquant quantize --recipe FILE.yaml[:stage.option=value,...]`."]
    return "\n".join(lines)


def run_recipes(args: argparse.Namespace) -> int:
    from .errors import ConfigError

    if args.action == "list":
        print(listing())
        return 0
    if not args.name:
        raise ConfigError(f"recipes {args.action} needs a NAME (a stage, preset or recipe file)")
    if args.action == "show" and args.name in STAGES:
        print(stage_text(args.name))
        return 0
    recipe = load_recipe(args.name)
    if args.action == "check":
        print(f"{args.name}: recipe {recipe.name} is valid: {' → '.join(s.name for s in recipe.stages)}")
    else:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip())
    return 0
