"""Q-Diffusion recipe end to end on a tiny class-conditional UNet2DModel with attention."""
from __future__ import annotations

import dataclasses
import glob
from pathlib import Path

import pytest
import torch

from diffquant.config import QuantConfig, load_yaml
from diffquant.diffusion.sampling import sample
from diffquant.errors import ConfigError
from diffquant.methods import RECIPES
from diffquant.methods.qdiffusion import (
    QDiffusionConfig,
    QDiffusionOfficialConfig,
    init_activations,
    run_qdiffusion,
)
from diffquant.methods.stages import init_weight_quantizers
from diffquant.model import load, quantize, save
from diffquant.recon import CalibrationCalls, ReconProgress

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = dict(iters_w=3, iters_a=3, batch_size=4, cali_st=2, cali_n=4, act_init_n=6, eval_samples=8)


def wrap(bundle, config: QDiffusionConfig, wbits=4, abits=8):
    quant = config.wrap_config(QuantConfig(weight_bits=wbits, act_bits=abits, quantize_acts=abits <= 8))
    return quantize(bundle.unet, quant, bundle.example_inputs(2))


def calibrate(bundle, trajectories, config, **kwargs):
    calib = config.select_calibration(trajectories).with_uncond()
    qmodel = wrap(bundle, config)
    run_qdiffusion(qmodel, None, config, calib_set=calib, call=bundle.predict_noise, fp_model=bundle.unet,
                   progress=False, **kwargs)
    return qmodel, calib


def test_end_to_end_save_load_and_sampling(bundle, trajectories, tmp_path):
    config = QDiffusionConfig(**TINY)
    qmodel, calib = calibrate(bundle, trajectories, config)
    assert len(calib) == 2 * 2 * 4  # 2 steps × 4 samples, each cond and uncond
    assert qmodel.recipe == "qdiffusion" and not qmodel.training
    units = qmodel.plan.units
    records = qmodel.recon_records
    assert [r["name"] for r in records] == [u.name for u in units] * 2
    assert [r["pass_name"] for r in records] == ["weights"] * len(units) + ["acts"] * len(units)
    assert all(r["iterations"] == 3 and r["final_loss"] is not None for r in records)
    # weights: AdaRound everywhere, hard; split layers have two parts
    layers = qmodel.layers()
    for layer in layers.values():
        assert layer.adaround is not None and all(r.mode == "hard" for r in layer.adaround)
    assert any(len(layer.adaround) == 2 for layer in layers.values())
    # activations: every quantizer calibrated and frozen, softmax at 8 bit (learned, per the unit)
    procs = qmodel.attention_processors()
    assert procs and all(p.probs_quantizer.bits == 8 and p.probs_quantizer.active for p in procs.values())
    assert all(bool(q.initialized.all()) and not q.step.requires_grad for q in qmodel.quantizers("act").values())

    x, t, labels = calib[0:4]
    with torch.no_grad():
        y = bundle.predict_noise(qmodel, x, t, labels)
    save(qmodel, tmp_path / "q")
    loaded = load(bundle.unet, tmp_path / "q")
    assert loaded.recipe == "qdiffusion" and loaded.recipe_config["iters_w"] == 3
    with torch.no_grad():
        assert torch.equal(bundle.predict_noise(loaded, x, t, labels), y)
    # the normal sampler drives the quantized denoiser; the reloaded one gives the same images
    kw = dict(steps=4, guidance=2.0, batch_size=2, progress=False)
    a = sample(bundle.with_unet(qmodel), 2, **kw)
    b = sample(bundle.with_unet(loaded), 2, **kw)
    fp = sample(bundle, 2, **kw)
    assert torch.equal(a.samples, b.samples) and torch.isfinite(a.samples).all()
    assert not torch.equal(a.samples, fp.samples)


def test_split_quantizers_see_their_own_channel_ranges(bundle, trajectories):
    config = QDiffusionConfig(**TINY)
    qmodel = wrap(bundle, config)
    init_weight_quantizers(qmodel)
    data = CalibrationCalls(config.select_calibration(trajectories).with_uncond(), bundle.predict_noise)
    split = {n: layer for n, layer in qmodel.layers().items() if layer.split is not None}
    assert len(split) >= 2
    seen = {n: [] for n in split}
    handles = [layer.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone()))
               for n, layer in split.items()]
    init_activations(qmodel, data, config)
    for h in handles:
        h.remove()
    for name, layer in split.items():
        x = torch.cat(seen[name])
        first, second = x[:, :layer.split], x[:, layer.split:]
        q1, q2 = layer.act_quantizers
        assert q1.range_lo.item() == first.min().item() and q1.range_hi.item() == first.max().item(), name
        assert q2.range_lo.item() == second.min().item() and q2.range_hi.item() == second.max().item(), name
        # the two halves really differ (otherwise the check proves nothing)
        assert (q1.range_lo.item(), q1.range_hi.item()) != (q2.range_lo.item(), q2.range_hi.item())


def test_weightless_attention_units_do_not_crash(bundle, trajectories):
    config = QDiffusionConfig(**TINY)
    quant = config.wrap_config(QuantConfig(weight_bits=4, act_bits=8, exclude=["*attentions*.to_*"]))
    qmodel = quantize(bundle.unet, quant, bundle.example_inputs(2))
    attn_units = [u.name for u in qmodel.plan.units if u.module_type == "Attention"]
    assert attn_units and all(not u.layers for u in qmodel.plan.units if u.module_type == "Attention")
    run_qdiffusion(qmodel, None, config, calib_set=config.select_calibration(trajectories).with_uncond(),
                   call=bundle.predict_noise, progress=False)
    by = {(r["pass_name"], r["name"]): r for r in qmodel.recon_records}
    assert all(by[("weights", n)]["skipped"] for n in attn_units)
    assert all(not by[("acts", n)]["skipped"] for n in attn_units)


def test_resume_of_the_recipe_equals_an_uninterrupted_run(bundle, trajectories, tmp_path, monkeypatch):
    config = QDiffusionConfig(**TINY)
    expected, calib = calibrate(bundle, trajectories, config)

    class Stop(Exception):
        pass

    original = ReconProgress.save

    def save_then_stop(self, qm, pass_name, last_unit, *args, **kwargs):
        original(self, qm, pass_name, last_unit, *args, **kwargs)
        if (pass_name, last_unit) == ("acts", 3):
            raise Stop

    monkeypatch.setattr(ReconProgress, "save", save_then_stop)
    with pytest.raises(Stop):
        calibrate(bundle, trajectories, config, work_dir=tmp_path)
    monkeypatch.setattr(ReconProgress, "save", original)
    resumed, _ = calibrate(bundle, trajectories, config, work_dir=tmp_path)
    want, got = expected.quant_state_dict(), resumed.quant_state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert (tmp_path / "records.json").is_file()
    assert [r["final_loss"] for r in resumed.recon_records] == [r["final_loss"] for r in expected.recon_records]


def test_weight_only_needs_no_activation_data(bundle, trajectories):
    config = QDiffusionConfig(weight_only=True, **TINY)
    qmodel, _ = calibrate(bundle, trajectories, config)
    assert qmodel.quant_config.tag == "W4A32" and not qmodel.plan.attention
    assert {r["pass_name"] for r in qmodel.recon_records} == {"weights"}
    assert all(not q.active or not layer.use_act_quant
               for layer in qmodel.layers().values() for q in layer.act_quantizers)


def test_official_preset_and_its_quirks(bundle, trajectories):
    config_cls, run = RECIPES["qdiffusion_official"]
    assert run is run_qdiffusion and config_cls is QDiffusionOfficialConfig
    official = config_cls(recon_granularity="layer", **TINY)
    assert official.unit_order == "registration" and official.split_reg_first_half_only
    with pytest.raises(ConfigError, match="a_symmetric"):
        config_cls(a_symmetric=True, a_init="lp_shrink")
    QDiffusionConfig(a_symmetric=True, a_init="lp_shrink")  # the library's symmetric search is fine
    qmodel, _ = calibrate(bundle, trajectories, dataclasses.replace(official, iters_w=6, lr_w=0.1))
    assert qmodel.recipe == "qdiffusion_official"
    # in a layer unit the second half of a split layer keeps round-to-nearest (V never trained)
    layer = next(layer for layer in qmodel.layers().values() if layer.split is not None)
    w2 = layer.weight_parts()[1]
    q2 = layer.weight_quantizers[1]
    s, _ = q2.params(w2.dim())
    frac = w2 / s - torch.floor(w2 / s)
    assert torch.equal(layer.adaround[1].hard_rounding, frac >= 0.5)


def test_calibration_policies(trajectories):
    k = trajectories.num_steps  # 4
    steps = lambda cfg: sorted(set(cfg.select_calibration(trajectories).steps.tolist()))  # noqa: E731
    assert steps(QDiffusionConfig(cali_st=2, cali_n=2)) == [0, 2]
    assert steps(QDiffusionConfig(calib_policy="first_n", cali_st=2, cali_n=2)) == [0, 1]
    assert steps(QDiffusionConfig(calib_policy="middle_n", cali_st=2, cali_n=2)) == [1, 2]
    assert steps(QDiffusionConfig(calib_policy="last_n", cali_st=2, cali_n=2)) == [2, 3]
    assert steps(QDiffusionConfig(calib_policy="single_t", cali_n=2)) == [k - 1]
    first = QDiffusionConfig(cali_st=1, cali_n=2).select_calibration(trajectories)
    assert first.sample_ids.tolist() == [0, 1]
    with pytest.warns(UserWarning, match="cali_n=256"):
        assert len(QDiffusionConfig(cali_st=2).select_calibration(trajectories)) == 2 * 4
    with pytest.raises(ConfigError, match="calib_policy"):
        QDiffusionConfig(calib_policy="tdac")


def test_act_ema_streams_the_whole_set_from_the_init_range(bundle, trajectories):
    config = QDiffusionConfig(act_ema=True, act_ema_batch=4, act_init_pick="first", **TINY)
    qmodel = wrap(bundle, config)
    init_weight_quantizers(qmodel)
    data = CalibrationCalls(config.select_calibration(trajectories).with_uncond(), bundle.predict_noise)
    init_activations(qmodel, data, config)
    # conv_in's input is the model input itself: replay the EMA by hand
    xs = data.calib_set.xs
    lo, hi = xs[:6].min(), xs[:6].max()
    for start in range(0, len(xs), 4):
        batch = xs[start:start + 4]
        lo, hi = 0.95 * lo + 0.05 * batch.min(), 0.95 * hi + 0.05 * batch.max()
    q = qmodel.model.conv_in.act_quantizers[0]
    assert q.range_lo.item() == pytest.approx(lo.item(), rel=1e-5)
    assert q.range_hi.item() == pytest.approx(hi.item(), rel=1e-5)
    assert q.init == "minmax" and q.mode == "quantize"


def test_yaml_presets_load():
    files = sorted(glob.glob(str(CONFIGS / "qdiffusion*.yaml")))
    assert len(files) >= 2
    configs = {Path(f).stem: load_yaml(QDiffusionConfig, f) for f in files}
    assert configs["qdiffusion"] == QDiffusionConfig()
    assert dataclasses.asdict(configs["qdiffusion_official"]) == dataclasses.asdict(QDiffusionOfficialConfig())
    assert configs["qdiffusion_sd"].softmax_bits == 16 and configs["qdiffusion_sd"].cali_st == 25


def test_pipeline_runs_the_recipe_with_its_calibration_set(bundle, tmp_path):
    from diffquant.pipeline import CalibConfig, quantize_bundle

    calib = CalibConfig(n=4, steps=4, every=2, batch_size=4, guidance=2.0)
    config = QDiffusionConfig(**TINY)
    res = quantize_bundle(bundle, "qdiffusion", QuantConfig(weight_bits=4, act_bits=8), calib,
                          cache_dir=tmp_path, recipe_config=config, work_dir=tmp_path / "work")
    assert res.qmodel.recipe == "qdiffusion" and res.qmodel.quant_config.split
    assert (tmp_path / "work" / "progress" / "state.json").is_file()
    naive = quantize_bundle(bundle, "naive", QuantConfig(weight_bits=4, act_bits=8), calib, cache_dir=tmp_path)
    assert naive.qmodel.recipe == "naive" and not naive.qmodel.quant_config.split
