"""Running recipes: a preset file runs exactly like its flat config; user combinations of the
papers' stages run, resume after an interruption, save/load and export (tiny UNet, not in the zoo)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffquant.config import QuantConfig
from diffquant.errors import ConfigError
from diffquant.methods import DMQConfig, QDiffusionConfig
from diffquant.model import load, save
from diffquant.pipeline import CalibConfig, parse_recipe_spec, quantize_bundle
from diffquant.recipes import load_recipe
from diffquant.recon import ReconProgress

REPO = Path(__file__).resolve().parents[2]
CALIB = CalibConfig(n=4, steps=4, every=1, batch_size=4)
TDAC_LES_PTS = (f"{REPO}/configs/recipes/tdac_les_pts_adaround.yaml:select_tdac.n=4,select_tdac.batch=4,"
                "les.iters=3,adaround.iters=3,adaround.batch_size=4,les.batch_size=4,eval_samples=4,"
                "step_tables.init_n=2,step_tables.batch=4")
LES_OMQ_QALORA = (f"{REPO}/configs/recipes/les_omq_qalora.yaml:cali_n=2,les.iters=3,les.batch_size=4,"
                  "eval_samples=4,qalora.epochs=2,qalora.batch_size=2,omq.batch=8,lora_rank=2")


def run(bundle, spec_or_recipe, wbits=4, abits=6, work_dir=None, recipe_config=None):
    if isinstance(spec_or_recipe, str) and recipe_config is None:
        name, recipe_config = parse_recipe_spec(spec_or_recipe)
    else:
        name = spec_or_recipe
    quant = QuantConfig(weight_bits=wbits, act_bits=abits, quantize_acts=abits <= 8)
    return quantize_bundle(bundle, name, quant, CALIB, "cpu", recipe_config=recipe_config,
                           work_dir=None if work_dir is None else str(work_dir)).qmodel


def same_state(a, b) -> bool:
    sa, sb = a.quant_state_dict(), b.quant_state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("flat, overrides", [
    (QDiffusionConfig(iters_w=3, iters_a=2, cali_n=4, cali_st=2, act_init_n=4, batch_size=4, eval_samples=4),
     {"adaround.iters": 3, "lsq.iters": 2, "cali_n": 4, "cali_st": 2, "act_init.n": 4, "adaround.batch_size": 4,
      "lsq.batch_size": 4, "eval_samples": 4}),
    (DMQConfig(les_iters=3, iters_w=2, cali_n=2, act_init_n=2, act_batch=4, batch_size=4, eval_samples=4),
     {"les.iters": 3, "adaround.iters": 2, "cali_n": 2, "init_n": 2, "step_tables.batch": 4, "les.batch_size": 4,
      "adaround.batch_size": 4, "eval_samples": 4}),
])
def test_a_preset_file_runs_bit_identically_to_its_flat_config(bundle, flat, overrides):
    from_flat = run(bundle, flat.recipe_name, recipe_config=flat)
    preset = load_recipe(flat.recipe_name).replace_options(overrides)
    from_file = run(bundle, preset)
    assert from_file.recipe == from_flat.recipe == flat.recipe_name
    assert same_state(from_flat, from_file)


@pytest.fixture(scope="module")
def tdac_les_pts(bundle):
    return run(bundle, TDAC_LES_PTS)


def test_a_combination_of_four_papers_runs_every_stage(tdac_les_pts):
    qmodel = tdac_les_pts
    assert qmodel.recipe == "tdac_les_pts_adaround"
    assert qmodel.recipe_config["stages"][0] == {"select_tdac": {**qmodel.recipe_config["stages"][0]["select_tdac"]}}
    passes = {r["pass_name"] for r in qmodel.recon_records}
    assert {"les", "weights", "acts", "pts"} <= passes
    layers = qmodel.layers()
    assert any(layer.input_scale is not None for layer in layers.values())  # LES τ
    assert any(layer.adaround is not None for layer in layers.values())  # AdaRound rounding
    from diffquant.quant.variants import PTSQuantizer

    assert any(isinstance(q, PTSQuantizer) for q in qmodel.quantizers("act").values())


def test_the_combination_saves_loads_and_exports(tdac_les_pts, bundle, tmp_path):
    from diffquant.export.onnx_export import export_onnx
    from diffquant.export.onnx_runtime import OnnxDenoiser

    save(tdac_les_pts, tmp_path / "q")
    loaded = load(bundle.unet, tmp_path / "q")
    assert same_state(tdac_les_pts, loaded) and loaded.recipe == "tdac_les_pts_adaround"
    x = torch.randn(2, *bundle.sample_shape, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([10, 500]), torch.tensor([0, 2])
    with torch.no_grad():
        want = bundle.predict_noise(tdac_les_pts, x, t, labels)
        assert torch.equal(bundle.predict_noise(loaded, x, t, labels), want)
        result = export_onnx(tdac_les_pts, bundle.example_inputs(2), tmp_path / "c.onnx", mode="integer")
        got = bundle.predict_noise(OnnxDenoiser(result.paths[0], threads=1), x, t, labels)
    assert float((got - want).pow(2).mean() / want.pow(2).mean()) < 1e-3


@pytest.mark.parametrize("stop", [("les", 1), ("weights", 4), ("pts", 0)])  # weights 0-2: FP units, skipped
def test_the_combination_resumes_to_the_uninterrupted_result(tdac_les_pts, bundle, tmp_path, monkeypatch, stop):
    class Stop(Exception):
        pass

    original = ReconProgress.save

    def save_then_stop(self, qm, pass_name, last_unit, *args, **kwargs):
        original(self, qm, pass_name, last_unit, *args, **kwargs)
        if (pass_name, last_unit) == stop:
            raise Stop

    monkeypatch.setattr(ReconProgress, "save", save_then_stop)
    with pytest.raises(Stop):
        run(bundle, TDAC_LES_PTS, work_dir=tmp_path)
    monkeypatch.setattr(ReconProgress, "save", original)
    assert same_state(run(bundle, TDAC_LES_PTS, work_dir=tmp_path), tdac_les_pts)


def test_les_omq_qalora_runs_resumes_and_reloads(bundle, tmp_path, monkeypatch):
    from diffquant.finetune.qalora import FinetuneCheckpoint

    expected = run(bundle, LES_OMQ_QALORA, wbits=3, abits=4)
    assert expected.recipe == "les_omq_qalora" and len(expected.mpq_records["history"]) == 2
    assert expected.mpq_records["stage1"] and any(m.input_scale is not None for m in expected.layers().values())

    class Stop(Exception):
        pass

    original = FinetuneCheckpoint.save

    def save_then_stop(self, qm, epoch, *args, **kwargs):
        original(self, qm, epoch, *args, **kwargs)
        if epoch == 1:
            raise Stop

    monkeypatch.setattr(FinetuneCheckpoint, "save", save_then_stop)
    with pytest.raises(Stop):
        run(bundle, LES_OMQ_QALORA, wbits=3, abits=4, work_dir=tmp_path / "w")
    monkeypatch.setattr(FinetuneCheckpoint, "save", original)
    resumed = run(bundle, LES_OMQ_QALORA, wbits=3, abits=4, work_dir=tmp_path / "w")
    assert same_state(resumed, expected)
    save(resumed, tmp_path / "q")
    assert same_state(load(bundle.unet, tmp_path / "q"), expected)


def test_a_combination_needing_the_calibration_set_refuses_a_bare_loop(bundle):
    from diffquant.model import quantize
    from diffquant.recipes import StageContext, run_recipe

    recipe = load_recipe(REPO / "configs/recipes/tdac_les_pts_adaround.yaml")
    qmodel = quantize(bundle.unet, recipe.wrap_config(QuantConfig(weight_bits=4, act_bits=6)), bundle.example_inputs(2))
    with pytest.raises(ConfigError, match="stage les of recipe tdac_les_pts_adaround needs the calibration set"):
        run_recipe(qmodel, recipe, StageContext(forward_loop=lambda m: None))
