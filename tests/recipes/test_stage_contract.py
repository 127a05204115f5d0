"""The contract every registered stage and every preset passes (diffquant.recipes)."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from diffquant.config import from_dict, to_dict
from diffquant.errors import ConfigError
from diffquant.methods import RECIPES
from diffquant.recipes import FAMILIES, STAGES, Recipe, load_recipe, options_table, preset_names

STAGE_NAMES = sorted(STAGES)


def test_the_registry_holds_every_family_the_issue_names():
    families = {STAGES.get(n).family for n in STAGES}
    assert families == set(FAMILIES)
    for name in ("select_uniform", "select_window", "select_random", "select_tdac", "les", "smoothquant", "omq",
                 "rtn", "adaround", "fbr", "act_init", "lsq", "step_tables", "pts", "qalora"):
        assert name in STAGES
    with pytest.raises(ConfigError, match="unknown stage 'nope'; available: "):
        STAGES.get("nope")
    with pytest.raises(ValueError, match="registered twice"):
        STAGES.register("rtn")(type("Again", (), {}))


@pytest.mark.parametrize("name", STAGE_NAMES)
class TestEveryStage:
    def test_options_round_trip_through_yaml(self, name):
        cls = STAGES.get(name)
        stage = cls()
        text = yaml.safe_dump(stage.to_dict())
        (key, options), = yaml.safe_load(text).items()
        assert key == name and cls(options) == stage
        assert from_dict(cls.Options, to_dict(stage.options)) == stage.options

    def test_every_option_has_one_documented_default(self, name):
        cls = STAGES.get(name)
        assert cls.family in FAMILIES and cls.summary()
        for row in options_table(cls):
            assert row["doc"], f"{name}.{row['option']} has no description"

    def test_unknown_and_wrongly_typed_options_are_refused_in_one_line(self, name):
        cls = STAGES.get(name)
        with pytest.raises(ConfigError, match="unknown") as err:
            cls({"no_such_option": 1})
        assert "\n" not in str(err.value)
        fields = dataclasses.fields(cls.Options)
        if fields:
            with pytest.raises(ConfigError):
                cls({fields[0].name: object()})

    def test_order_facts_are_consistent(self, name):
        provides, requires, before = STAGES.get(name)().facts()
        assert not (requires & before) and not (provides & requires)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_preset_file_is_its_documented_stage_list(name):
    """The preset file equals the stage list the recipe's flat config builds (so the file is what runs)."""
    config_cls, _ = RECIPES[name]
    preset = load_recipe(name)
    assert preset.to_dict() == config_cls().to_recipe().to_dict()
    assert Recipe.from_dict(yaml.safe_load(yaml.safe_dump(preset.to_dict()))).to_dict() == preset.to_dict()


def test_every_recipe_name_has_a_preset():
    assert set(preset_names()) == set(RECIPES)


def _stages(*entries):
    return {"name": "mine", "stages": list(entries)}


@pytest.mark.parametrize("entries, message", [
    (["adaround"], "stage adaround needs the weight quantizers initialised first (put one of rtn, omq before it)"),
    (["rtn", "les"], "stage les must run before rtn"),
    (["les", {"omq": {"smooth": True}}], "stages les and omq both have per-channel input scales"),
    (["rtn", "adaround", "fbr"], "stages adaround and fbr both have the weight rounding learned"),
    (["rtn", "select_uniform"], "selection stage select_uniform must come first"),
    (["rtn", "lsq"], "stage lsq needs the activation ranges initialised first"),
    (["rtn", "qalora", "adaround"], "stage adaround must run before qalora"),
    (["rtn", "omq"], "stages rtn and omq both have the weight quantizers initialised"),
    (["rtn", "act_init", "registration_act_quirk"], "stage registration_act_quirk must run before act_init"),
    (["select_uniform", "select_tdac"], "selection stage select_tdac must come first"),
])
def test_incompatible_orders_are_refused_in_one_line_naming_the_conflict(entries, message):
    with pytest.raises(ConfigError) as err:
        Recipe.from_dict(_stages(*entries))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_two_stages_asking_for_different_wrapping_are_refused():
    from diffquant.config import QuantConfig

    recipe = Recipe.from_dict(_stages({"wrap": {"split": True}}, "omq", {"act_init": {"policy": "minmax"}}))
    with pytest.raises(ConfigError, match="stages omq and act_init ask for act_init='lp_shrink' and 'minmax'"):
        recipe.wrap_config(QuantConfig())


def test_bad_recipe_files_are_one_line_errors(tmp_path):
    for text, message in [("stages: []", "non-empty list"), ("stages: [{rtn: {}, lsq: {}}]", "one 'stage_name"),
                          ("stagez: [rtn]", "unknown key"), ("stages: [{rtn: {policy: sideways}}]", "stage rtn"),
                          (": : :", "not valid YAML")]:
        path = tmp_path / "r.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message) as err:
            load_recipe(path)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides_address_a_stage_option_or_a_unique_option():
    recipe = load_recipe("qdiffusion")
    changed = recipe.replace_options({"adaround.iters": 7, "lsq.p": 2.2, "reg_weight": 0.5, "eval_samples": 5})
    assert changed.stage("adaround").options.iters == 7 and changed.stage("lsq").options.p == 2.2
    assert changed.stage("adaround").options.reg_weight == 0.5 and changed.stage("adaround").options.p == 2.0
    assert changed.engine.eval_samples == 5 and recipe.stage("adaround").options.iters == 20000
    with pytest.raises(ConfigError, match="2 stages of it has option 'iters'; write stage.iters"):
        recipe.replace_options({"iters": 3})
    with pytest.raises(ConfigError, match="has no stage 'fbr'"):
        recipe.replace_options({"fbr.iters": 3})
