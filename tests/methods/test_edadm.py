"""EDA-DM recipe end to end on a tiny class-conditional UNet2DModel with attention."""
from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

import pytest
import torch

from diffquant.calib.capture import capture_trajectories
from diffquant.config import QuantConfig, load_yaml
from diffquant.diffusion.sampling import sample
from diffquant.errors import ConfigError
from diffquant.methods import RECIPES
from diffquant.methods.edadm import (
    EDADMConfig,
    EDADMOfficialConfig,
    eight_bit_rules,
    configure_range_search,
    run_edadm,
)
from diffquant.model import load, quantize, save
from diffquant.recon import ReconProgress

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: tiny iteration counts; the symmetric 1-D search keeps the 8-bit activation init fast
TINY = dict(iters=3, batch_size=4, tdac_n=6, tdac_b=4, tdac_radius=0.05, act_init_batch=8, eval_samples=8,
            range_search="symmetric_1d")


@pytest.fixture(scope="module")
def trajectories(bundle, tmp_path_factory):
    options = EDADMConfig().capture_options(bundle.unet)
    return capture_trajectories(bundle, 6, steps=4, guidance=2.0, batch_size=6, progress=False,
                                cache_dir=tmp_path_factory.mktemp("traj"), **options)


def wrap(bundle, config: EDADMConfig, wbits=4, abits=8):
    quant = config.wrap_config(QuantConfig(weight_bits=wbits, act_bits=abits, quantize_acts=abits <= 8))
    return quantize(bundle.unet, quant, bundle.example_inputs(2))


def calibrate(bundle, trajectories, config, wbits=4, abits=8, **kwargs):
    calib = config.select_calibration(trajectories).with_uncond()
    qmodel = wrap(bundle, config, wbits, abits)
    run_edadm(qmodel, None, config, calib_set=calib, call=bundle.predict_noise, fp_model=bundle.unet,
              progress=False, **kwargs)
    return qmodel, calib


def test_end_to_end_save_load_and_sampling(bundle, trajectories, tmp_path):
    config = EDADMConfig(**TINY)
    qmodel, calib = calibrate(bundle, trajectories, config)
    assert len(calib) == 2 * 6  # N = 6 trajectories, one sample each, cond and uncond
    assert qmodel.recipe == "edadm" and not qmodel.training
    units = qmodel.plan.units
    assert [r["name"] for r in qmodel.recon_records] == [u.name for u in units]
    assert all(r["pass_name"] == "fbr" and r["iterations"] == 3 for r in qmodel.recon_records)
    layers = qmodel.layers()
    for layer in layers.values():
        assert layer.adaround is not None and all(r.mode == "hard" for r in layer.adaround)
    acts = qmodel.quantizers("act")
    assert all(q.init == "edadm_grid" and q.qdrop_prob == 1.0 and not q.step.requires_grad for q in acts.values())
    assert all(bool(q.initialized.all()) for q in acts.values() if q.active)

    # the library 8-bit rule: conv_in and conv_out at W8, conv_out's input FP, nothing else
    w8 = {n for n, lp in ((lp.name, lp) for lp in qmodel.plan.layers) if lp.weight_bits == 8}
    assert w8 == {"conv_in", "conv_out"}
    assert all(q.bits == 8 for q in layers["conv_in"].weight_quantizers + layers["conv_out"].weight_quantizers)
    assert not qmodel.plan.layer("conv_out").quantize_input and not layers["conv_out"].use_act_quant
    assert layers["conv_in"].use_act_quant and qmodel.plan.layer("conv_in").act_bits == 8

    x, t, labels = calib[0:4]
    with torch.no_grad():
        y = bundle.predict_noise(qmodel, x, t, labels)
    save(qmodel, tmp_path / "q")
    loaded = load(bundle.unet, tmp_path / "q")
    assert loaded.recipe == "edadm" and loaded.recipe_config["iters"] == 3
    assert loaded.plan.layer("conv_in").weight_bits == 8 and not loaded.layers()["conv_out"].use_act_quant
    with torch.no_grad():
        assert torch.equal(bundle.predict_noise(loaded, x, t, labels), y)
    kw = dict(steps=4, guidance=2.0, batch_size=2, progress=False)
    a = sample(bundle.with_unet(qmodel), 2, **kw)
    b = sample(bundle.with_unet(loaded), 2, **kw)
    fp = sample(bundle, 2, **kw)
    assert torch.equal(a.samples, b.samples) and torch.isfinite(a.samples).all()
    assert not torch.equal(a.samples, fp.samples)


def test_resume_of_the_recipe_equals_an_uninterrupted_run(bundle, trajectories, tmp_path, monkeypatch):
    config = EDADMConfig(**TINY)
    expected, _ = calibrate(bundle, trajectories, config)

    class Stop(Exception):
        pass

    original = ReconProgress.save

    def save_then_stop(self, qm, pass_name, last_unit, *args, **kwargs):
        original(self, qm, pass_name, last_unit, *args, **kwargs)
        if (pass_name, last_unit) == ("fbr", 4):
            raise Stop

    monkeypatch.setattr(ReconProgress, "save", save_then_stop)
    with pytest.raises(Stop):
        calibrate(bundle, trajectories, config, work_dir=tmp_path)
    monkeypatch.setattr(ReconProgress, "save", original)
    resumed, _ = calibrate(bundle, trajectories, config, work_dir=tmp_path)
    want, got = expected.quant_state_dict(), resumed.quant_state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [r["final_loss"] for r in resumed.recon_records] == [r["final_loss"] for r in expected.recon_records]
    assert (tmp_path / "records.json").is_file()


def test_official_preset_and_its_switches(bundle, trajectories):
    config_cls, run = RECIPES["edadm_official"]
    assert run is run_edadm and config_cls is EDADMOfficialConfig and RECIPES["edadm"][0] is EDADMConfig
    official = config_cls(**{**TINY, "range_search": "symmetric_1d"})
    assert (official.eight_bit, official.fbr_exclude, official.unit_order) == ("registration", "registered",
                                                                             "registration")
    assert official.fbr_extra_forward and not official.round_reg and official.calib_overlaps_eval
    assert official.capture_options(bundle.unet)["seed"] == 0
    assert "seed" not in EDADMConfig().capture_options(bundle.unet)

    # W4A4 shows the registration rule's 8-bit activation quantizer
    qmodel, _ = calibrate(bundle, trajectories, official, abits=4)
    assert qmodel.recipe == "edadm_official"
    names = [n for n, _ in qmodel.model.named_modules()]
    registered = sorted(qmodel.layers(), key=names.index)
    assert {lp.name for lp in qmodel.plan.layers if lp.weight_bits == 8} == {registered[0], registered[-1]}
    assert not qmodel.layers()[registered[-1]].use_act_quant
    acts = list(qmodel.quantizers("act").values())
    assert acts[-2].bits == 8 and sum(q.bits == 8 for q in acts if q.grid != "unsigned") == 1
    assert all(q.init_options.get("symmetric") for q in qmodel.quantizers().values())
    by_unit = [r["name"] for r in qmodel.recon_records]
    assert by_unit == sorted(by_unit, key=names.index)  # registration unit order


def test_range_search_modes_and_rules_on_a_fresh_wrap(bundle):
    config = EDADMConfig()
    qmodel = wrap(bundle, config)
    assert qmodel.quant_config.weight_init == qmodel.quant_config.act_init == "edadm_grid"
    configure_range_search(qmodel, "symmetric_1d")
    assert all(q.init_options["symmetric"] for q in qmodel.quantizers().values())
    configure_range_search(qmodel, "auto")
    assert not any("symmetric" in q.init_options for q in qmodel.quantizers().values())
    # auto: two-sided weights get the 2-D search (asymmetric ranges), 1-D would be symmetric
    layer = qmodel.layers()["down_blocks.0.resnets.0.conv1"]
    q = layer.weight_quantizers[0]
    q.init_from(layer.weight.detach())
    assert not torch.allclose(q.range_lo, -q.range_hi)
    configure_range_search(qmodel, "symmetric_1d")
    q.init_from(layer.weight.detach())
    assert torch.allclose(q.range_lo, -q.range_hi)
    assert eight_bit_rules("none") == []
    with pytest.raises(ConfigError, match="eight_bit"):
        eight_bit_rules("first_last")
    # the library rule, applied at wrapping: conv_in and conv_out at W8 (conv_out's input FP)
    assert qmodel.plan.layer("conv_in").weight_bits == qmodel.plan.layer("conv_out").weight_bits == 8
    assert not qmodel.plan.layer("conv_out").quantize_input and qmodel.plan.layer("conv_in").quantize_input
    with pytest.warns(UserWarning, match="wrapped with other"):
        run_edadm(quantize(bundle.unet, QuantConfig(weight_bits=4, act_bits=8), bundle.example_inputs(2)),
                  lambda m: None, EDADMConfig(iters=0), progress=False)


@pytest.mark.filterwarnings("ignore:TDAC density")  # the tiny model's features are within r = 3
def test_tdac_off_sequential_passes_and_weight_only(bundle, trajectories):
    uniform = EDADMConfig(**{**TINY, "tdac": False}).select_calibration(trajectories)
    assert torch.bincount(uniform.steps, minlength=4).tolist() == [2, 2, 1, 1]
    with pytest.warns(UserWarning, match="n=1024 but"):
        assert len(EDADMConfig(tdac_b=4).select_calibration(trajectories)) == 6

    seq = EDADMConfig(**{**TINY, "joint": False, "iters": 2})
    qmodel, _ = calibrate(bundle, trajectories, seq)
    n = len(qmodel.plan.units)
    assert [r["pass_name"] for r in qmodel.recon_records] == ["fbr_weights"] * n + ["fbr_acts"] * n

    w_only = EDADMConfig(**{**TINY, "weight_only": True, "iters": 2})
    qmodel, _ = calibrate(bundle, trajectories, w_only)
    assert qmodel.quant_config.tag == "W4A32" and not qmodel.plan.attention
    assert {r["pass_name"] for r in qmodel.recon_records} == {"fbr"}


def test_activation_range_search_reports_progress(bundle, trajectories, capsys):
    from diffquant.methods.edadm import init_activations
    from diffquant.methods.stages import init_weight_quantizers
    from diffquant.recon.cache import CalibrationCalls

    config = EDADMConfig(**TINY)
    data = CalibrationCalls(config.select_calibration(trajectories).with_uncond(), bundle.predict_noise, "cpu")
    qmodel = wrap(bundle, config)
    configure_range_search(qmodel, config.range_search)
    init_weight_quantizers(qmodel)
    init_activations(qmodel, data, config, progress=True)
    assert "activation ranges (edadm_grid)" in capsys.readouterr().err
    assert all(bool(q.initialized.all()) for q in qmodel.quantizers("act").values() if q.active)
    init_activations(qmodel, data, config, progress=False)
    assert "activation ranges" not in capsys.readouterr().err


def test_config_validation(bundle):
    with pytest.raises(ConfigError, match="range_search"):
        EDADMConfig(range_search="2d")
    with pytest.raises(ConfigError, match="qdrop_p"):
        EDADMConfig(qdrop_p=1.5)
    with pytest.raises(ConfigError, match="fbr_exclude"):
        EDADMConfig(fbr_exclude="first")
    with pytest.raises(ConfigError, match="calibration set"):
        run_edadm(wrap(bundle, EDADMConfig()), None, EDADMConfig())


def test_yaml_presets_load():
    files = sorted(glob.glob(str(CONFIGS / "edadm*.yaml")))
    configs = {Path(f).stem: load_yaml(EDADMConfig, f) for f in files}
    assert configs["edadm"] == EDADMConfig()
    assert dataclasses.asdict(configs["edadm_official"]) == dataclasses.asdict(EDADMOfficialConfig())


def test_pipeline_captures_features_and_runs_the_recipe(bundle, tmp_path):
    from diffquant.pipeline import CalibConfig, quantize_bundle

    calib = CalibConfig(n=6, steps=4, batch_size=6, guidance=2.0)
    config = EDADMConfig(**{**TINY, "iters": 1})
    res = quantize_bundle(bundle, "edadm", QuantConfig(weight_bits=4, act_bits=8), calib, cache_dir=tmp_path,
                          recipe_config=config, work_dir=tmp_path / "work")
    assert res.qmodel.recipe == "edadm" and res.qmodel.quant_config.act_init == "edadm_grid"
    reports = list(tmp_path.glob("traj-*/tdac-*/tdac.json"))
    assert len(reports) == 1  # TDAC ran on a capture that recorded the feature hook
    assert (tmp_path / "work" / "progress" / "state.json").is_file()
