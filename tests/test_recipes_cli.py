"""``diffquant recipes``: stages with options and defaults, presets, file checks."""
from __future__ import annotations

from diffquant.cli import main
from diffquant.recipes import STAGES, preset_names


def test_listing_names_every_stage_and_preset(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in list(STAGES) + preset_names():
        assert f" {name} " in out
    assert "qdiffusion           select_uniform → wrap → rtn → adaround → act_init → lsq" in out


def test_show_gives_a_stages_options_with_defaults_and_a_presets_stages(capsys):
    assert main(["recipes", "show", "adaround"]) == 0
    out = capsys.readouterr().out
    assert "| iters | an integer | 20000 | Adam iterations per unit |" in out
    assert main(["recipes", "show", "edadm"]) == 0
    out = capsys.readouterr().out
    assert "name: edadm" in out and "- select_tdac:" in out and "- fbr:" in out


def test_check_validates_a_file_and_bad_input_is_one_line(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("stages: [select_random, rtn, {adaround: {iters: 10}}, act_init]\n")
    assert main(["recipes", "check", str(good)]) == 0
    assert "select_random → rtn → adaround → act_init" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [adaround]\n")
    assert main(["recipes", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the weight quantizers initialised first" in err
    assert main(["recipes", "show"]) == 2
    assert main(["recipes", "show", "no_such_thing"]) == 2
