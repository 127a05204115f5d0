"""QuantConfig / LayerRule: validation, dict and YAML round trips, clear errors."""
from __future__ import annotations

import dataclasses

import pytest

from diffquant.config import LayerRule, QuantConfig, from_dict, load_yaml, parse_yaml, save_yaml, to_dict
from diffquant.errors import ConfigError


def custom_config() -> QuantConfig:
    return QuantConfig(
        weight_bits=4, act_bits=6, act_grid="symmetric", weight_init="lp_shrink", act_init="ema_minmax",
        softmax_bits=16, split=True, include=["down_blocks.*", "conv_*"], exclude=["*.attn2.*"],
        first_last="8bit", time_embedding="fp", timestep_lookup="nearest",
        rules=[LayerRule("@first", weight_bits=8), LayerRule("up_blocks.*.conv_shortcut", act_bits=16, quantize_input=False),
               LayerRule("conv_out", skip=True)],
    )


def test_yaml_round_trip(tmp_path):
    config = custom_config()
    path = save_yaml(config, tmp_path / "sub" / "quant.yaml")
    loaded = load_yaml(QuantConfig, path)
    assert loaded == config
    assert all(isinstance(r, LayerRule) for r in loaded.rules)
    assert loaded.tag == "W4A6"
    text = path.read_text()
    assert "weight_bits: 4" in text and "pattern: '@first'" in text


def test_dict_round_trip_and_defaults():
    config = custom_config()
    assert from_dict(QuantConfig, to_dict(config)) == config
    assert from_dict(QuantConfig, None) == QuantConfig() == from_dict(QuantConfig, {})
    assert QuantConfig(quantize_acts=False).tag == "W8A32"


def test_layer_rule_from_dict():
    config = QuantConfig(rules=[{"pattern": "mid_block.*", "weight_bits": 6, "act_bits": 16}])
    rule = config.rules[0]
    assert rule == LayerRule("mid_block.*", weight_bits=6, act_bits=16)
    assert rule.quantize_input is None and rule.skip is False
    assert from_dict(LayerRule, {"pattern": "x", "skip": True}) == LayerRule("x", skip=True)


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as exc:
        from_dict(QuantConfig, {"weight_bit": 4})
    msg = str(exc.value)
    assert "weight_bit" in msg and "\n" not in msg
    for field in dataclasses.fields(QuantConfig):
        assert field.name in msg
    (tmp_path / "bad.yaml").write_text("act_bits: 8\nsplitt: true\n")
    with pytest.raises(ConfigError, match="splitt"):
        load_yaml(QuantConfig, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="pattern"):
        QuantConfig(rules=[{"pattern": "a", "bitz": 3}])


@pytest.mark.parametrize("bits", [0, 9, 12, -1, 3.5, "8", True])
@pytest.mark.parametrize("field", ["weight_bits", "act_bits", "softmax_bits"])
def test_bad_bits(field, bits):
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**{field: bits})


@pytest.mark.parametrize("bits", [0, 9, 12])
def test_bad_bits_in_rules(bits):
    with pytest.raises(ConfigError, match="weight_bits"):
        LayerRule("x", weight_bits=bits)
    with pytest.raises(ConfigError, match="act_bits"):
        QuantConfig(rules=[{"pattern": "x", "act_bits": bits}])


@pytest.mark.parametrize("bits", [1, 2, 4, 6, 8, 16, 32])
def test_good_bits(bits):
    assert QuantConfig(weight_bits=bits, act_bits=bits).weight_bits == bits


@pytest.mark.parametrize("kwargs,match", [
    ({"weight_grid": "signed"}, "grid"),
    ({"act_init": "percentile"}, "percentile"),
    ({"first_last": "4bit"}, "first_last"),
    ({"time_embedding": "int8"}, "time_embedding"),
    ({"timestep_lookup": "closest"}, "timestep_lookup"),
    ({"include": 3}, "include"),
    ({"exclude": ["a", 1]}, "exclude"),
    ({"rules": "conv_out"}, "rules"),
    ({"rules": ["conv_out"]}, "LayerRule"),
    ({"rules": [{"weight_bits": 4}]}, "LayerRule"),
])
def test_other_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kwargs)


def test_a_single_glob_string_is_a_one_element_list():
    config = from_dict(QuantConfig, {"exclude": "conv_out", "include": "*"})
    assert config.exclude == ["conv_out"] and config.include == ["*"]


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(QuantConfig, tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("weight_bits: [4\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(QuantConfig, tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- weight_bits\n- 4\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(QuantConfig, tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(QuantConfig, tmp_path / "empty.yaml") == QuantConfig()


def test_yaml_reads_words_as_strings_and_exponents_as_floats(tmp_path):
    data = parse_yaml("a: off\nb: yes\nc: true\nd: False\ne: 1e-3\nf: 10\ng: 0.85\nh: null\ni: -.inf")
    assert data == {"a": "off", "b": "yes", "c": True, "d": False, "e": 1e-3, "f": 10, "g": 0.85, "h": None,
                    "i": float("-inf")}
    assert isinstance(data["f"], int)
    path = tmp_path / "q.yaml"
    path.write_text("timestep_lookup: nearest\nsplit: true\n")
    assert load_yaml(QuantConfig, path).split is True


def test_default_of_takes_a_stage_knob_with_its_bounds_and_description():
    """Flat configs re-expose stage knobs through default_of: one default, written once."""
    import dataclasses as dc

    from diffquant.config import checked, default_of, knob
    from diffquant.errors import ConfigError as Error

    @dc.dataclass
    @checked
    class Stage:
        iters: int = knob(7, ge=1, doc="iterations")
        names: list = knob(["a"], doc="globs")

    @dc.dataclass
    @checked
    class Flat:
        iters_w: int = default_of(Stage, "iters")
        names: list = default_of(Stage, "names")
        loose: int = default_of(Stage, "iters", doc="other text", ge=0)

    flat = Flat()
    assert flat.iters_w == 7 and flat.names == ["a"] and flat.loose == 7
    assert dc.fields(Flat)[0].metadata["doc"] == "iterations" and dc.fields(Flat)[2].metadata["doc"] == "other text"
    flat.names.append("b")
    assert Flat().names == ["a"]  # a list default is copied per instance
    with pytest.raises(Error, match="iters_w must be >= 1"):
        Flat(iters_w=0)
    assert Flat(loose=0).loose == 0


def test_the_papers_flat_configs_take_their_stage_defaults():
    """β, λ, iterations and the engine knobs are declared once, on the stages and EngineSettings."""
    from diffquant.methods import DMQConfig, EDADMConfig, QDiffusionConfig
    from diffquant.methods.stages import AdaRoundOptions
    from diffquant.quant.adaround import BetaSchedule
    from diffquant.recipes import EngineSettings

    assert AdaRoundOptions().beta_start == BetaSchedule.start == QDiffusionConfig().beta_start == DMQConfig().beta_start
    assert EDADMConfig().beta_start == BetaSchedule.start and EDADMConfig().warmup == BetaSchedule.warmup
    assert QDiffusionConfig().round_reg_weight == DMQConfig().round_reg_weight == AdaRoundOptions().reg_weight
    for cfg in (QDiffusionConfig(), DMQConfig(), EDADMConfig()):
        assert (cfg.seed, cfg.cache_dtype, cfg.eval_samples) == (EngineSettings.seed, EngineSettings.cache_dtype,
                                                                 EngineSettings.eval_samples)
