"""DMQ recipe end to end on a tiny class-conditional UNet2DModel (docs/methods.md §5)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from diffquant.config import QuantConfig, load_yaml
from diffquant.diffusion.sampling import sample
from diffquant.errors import ConfigError, DiffquantError
from diffquant.methods import RECIPES
from diffquant.methods.dmq import DMQConfig, DMQOfficialConfig, calibrate_step, run_dmq, use_activation_tables
from diffquant.methods.stages import init_weight_quantizers
from diffquant.model import load, quantize, save
from diffquant.quant.variants import PTSQuantizer
from diffquant.recon import CalibrationCalls, ReconProgress
from diffquant.recon.les import les_layers

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = dict(les_iters=4, iters_w=3, batch_size=4, cali_n=4, act_init_n=2, act_batch=4, eval_samples=8)
FP_LAYERS = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")


def wrap(bundle, config: DMQConfig, wbits=4, abits=6):
    quant = config.wrap_config(QuantConfig(weight_bits=wbits, act_bits=abits, quantize_acts=abits <= 8))
    return quantize(bundle.unet, quant, bundle.example_inputs(2))


def calibrate(bundle, trajectories, config, **kwargs):
    calib = config.select_calibration(trajectories).with_uncond()
    qmodel = wrap(bundle, config)
    run_dmq(qmodel, None, config, calib_set=calib, call=bundle.predict_noise, fp_model=bundle.unet,
            progress=False, **kwargs)
    return qmodel, calib


@pytest.fixture(scope="module")
def calibrated(bundle, trajectories):
    return calibrate(bundle, trajectories, DMQConfig(**TINY))


def test_end_to_end_coverage_tables_and_records(calibrated, trajectories):
    qmodel, calib = calibrated
    schedule = trajectories.timesteps.tolist()
    assert len(calib) == 4 * 4 * 2 and qmodel.recipe == "dmq" and not qmodel.training
    assert qmodel.timestep_index.timesteps == schedule and qmodel.plan.timesteps == schedule
    layers, plans = qmodel.layers(), {lp.name: lp for lp in qmodel.plan.layers}
    fp = [n for n in layers if n in FP_LAYERS or n.endswith("time_emb_proj")]
    assert len(fp) == 4 + 8  # 8 ResBlocks
    for name, layer in layers.items():
        if name in fp:  # DMQ coverage: FP, no τ
            assert plans[name].weight_bits == 32 and plans[name].act_bits == 32 and layer.input_scale is None
            continue
        assert layer.input_scale is not None and not layer.input_scale.requires_grad, name
        assert not torch.equal(layer.input_scale, torch.ones_like(layer.input_scale)), name  # learned
        assert layer.adaround is not None and all(r.mode == "hard" for r in layer.adaround)
        for q in layer.act_quantizers:  # one row per step, calibrated, no zero widening, z unclamped
            assert q.num_steps == 4 and bool(q.initialized.all()) and not q.include_zero
            assert not q.clamp_zero_point
        pts = all(isinstance(q, PTSQuantizer) for q in layer.act_quantizers)
        assert pts == ("shortcut" in name), name
    assert not qmodel.plan.attention  # attention matmuls FP
    records = qmodel.recon_records
    les = [r["name"] for r in records if r["pass_name"] == "les"]
    assert les == [n for n in layers if n not in fp]
    assert [r["name"] for r in records if r["pass_name"] == "weights"] == [u.name for u in qmodel.plan.units]
    assert [r["name"] for r in records if r["pass_name"] == "acts"] == [f"step{k}" for k in range(4)]
    assert [r["name"] for r in records if r["pass_name"] == "pts"] == [n for n in layers if "shortcut" in n]
    # the tables really differ per step
    q = layers["up_blocks.0.resnets.0.conv1"].act_quantizers[0]
    assert len(set(q.step.reshape(-1).tolist())) == 4


def test_save_load_is_bit_identical_and_sampling_runs(calibrated, bundle, tmp_path):
    qmodel, calib = calibrated
    x, t, labels = calib[0:4]
    with torch.no_grad():
        y = bundle.predict_noise(qmodel, x, t, labels)
    save(qmodel, tmp_path / "q")
    loaded = load(bundle.unet, tmp_path / "q")
    assert loaded.recipe == "dmq" and loaded.recipe_config["les_iters"] == 4
    assert loaded.timestep_index.timesteps == qmodel.timestep_index.timesteps
    want, got = qmodel.quant_state_dict(), loaded.quant_state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(bundle.predict_noise(loaded, x, t, labels), y)
    kw = dict(steps=4, guidance=2.0, batch_size=2, progress=False)  # the calibration schedule
    a = sample(bundle.with_unet(qmodel), 2, **kw)
    b = sample(bundle.with_unet(loaded), 2, **kw)
    assert torch.equal(a.samples, b.samples) and torch.isfinite(a.samples).all()
    assert not torch.equal(a.samples, sample(bundle, 2, **kw).samples)


def test_tables_pick_the_row_of_the_given_timestep(calibrated, bundle):
    qmodel, calib = calibrated
    schedule = qmodel.timestep_index.timesteps
    layer = qmodel.layers()["up_blocks.0.resnets.0.conv1"]
    q = layer.act_quantizers[0]
    seen = []
    handle = q.register_forward_hook(lambda m, a, out: seen.append((a[0].clone(), out.clone())))
    x, _, labels = calib[0:2]
    try:
        for k, t in enumerate(schedule):
            with torch.no_grad():
                bundle.predict_noise(qmodel, x, torch.full((2,), t), labels)
            assert qmodel.timestep_index.index == k
            inp, out = seen[-1]
            assert torch.equal(out, q.quantize(inp, row=k))
            assert not torch.equal(out, q.quantize(inp, row=(k + 1) % len(schedule)))
    finally:
        handle.remove()
    # a schedule other than the calibration one: exact lookup fails loudly ...
    with pytest.raises(DiffquantError, match="not in the calibrated schedule"):
        with torch.no_grad():
            bundle.predict_noise(qmodel, x, torch.full((2,), schedule[1] + 7), labels)
    with pytest.raises(DiffquantError, match="timestep_lookup='nearest'"):
        sample(bundle.with_unet(qmodel), 1, steps=5, guidance=2.0, progress=False)
    # ... and the nearest lookup maps to the closest calibrated step
    qmodel.timestep_index.lookup = "nearest"
    try:
        with torch.no_grad():
            bundle.predict_noise(qmodel, x, torch.full((2,), schedule[1] + 7), labels)
        assert qmodel.timestep_index.index == 1
        assert torch.isfinite(sample(bundle.with_unet(qmodel), 1, steps=5, guidance=2.0, progress=False).samples).all()
    finally:
        qmodel.timestep_index.lookup = "exact"


def test_nearest_lookup_is_a_config_switch_saved_with_the_model(bundle, trajectories, tmp_path):
    config = DMQConfig(timestep_lookup="nearest", les=False, weight_recon=False, pts="off", **TINY)
    qmodel, _ = calibrate(bundle, trajectories, config)
    assert qmodel.quant_config.timestep_lookup == "nearest"
    save(qmodel, tmp_path / "q")
    assert load(bundle.unet, tmp_path / "q").timestep_index.lookup == "nearest"


def test_step_calibration_is_minmax_then_ema(bundle, trajectories):
    config = DMQConfig(act_init_n=3, act_batch=4, **{k: v for k, v in TINY.items() if k not in ("act_init_n", "act_batch")})
    calib = config.select_calibration(trajectories).with_uncond()
    qmodel = wrap(bundle, config)
    schedule = trajectories.timesteps.tolist()
    use_activation_tables(qmodel, schedule)
    init_weight_quantizers(qmodel)
    data = CalibrationCalls(calib, bundle.predict_noise)
    step2 = data.subset(torch.nonzero(calib.ts == schedule[2]).reshape(-1))
    q = qmodel.layers()["down_blocks.0.resnets.0.conv1"].act_quantizers[0]
    seen = []
    handle = q.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    calibrate_step(qmodel, step2, 2, torch.Generator().manual_seed(0), init_n=3, batch=4, momentum=0.95)
    handle.remove()
    assert seen[0].shape[0] == 3 and sum(s.shape[0] for s in seen[1:]) == len(step2)
    lo, hi = seen[0].min(), seen[0].max()
    for batch in seen[1:]:
        lo, hi = 0.95 * lo + 0.05 * batch.min(), 0.95 * hi + 0.05 * batch.max()
    assert q.range_lo[2].item() == pytest.approx(lo.item(), rel=1e-5)
    assert q.range_hi[2].item() == pytest.approx(hi.item(), rel=1e-5)
    assert q.step[2].item() == pytest.approx((hi - lo).item() / 63, rel=1e-5)  # 6 bit, range not widened to 0
    assert bool(q.initialized[2]) and not bool(q.initialized[0])  # other rows untouched
    assert q.mode == "quantize" and q.init == "minmax"


def _assert_resume_matches(expected, bundle, trajectories, config, tmp_path, monkeypatch, stop_after):
    """Interrupt a run right after the first checkpoint where ``stop_after(pass_name, last_unit)``,
    resume it from ``tmp_path`` and check it ends in ``expected``'s state and records."""

    class Stop(Exception):
        pass

    original = ReconProgress.save

    def save_then_stop(self, qm, pass_name, last_unit, *args, **kwargs):
        original(self, qm, pass_name, last_unit, *args, **kwargs)
        if stop_after(pass_name, last_unit):
            raise Stop

    monkeypatch.setattr(ReconProgress, "save", save_then_stop)
    with pytest.raises(Stop):
        calibrate(bundle, trajectories, config, work_dir=tmp_path)
    monkeypatch.setattr(ReconProgress, "save", original)
    resumed, _ = calibrate(bundle, trajectories, config, work_dir=tmp_path)
    want, got = expected.quant_state_dict(), resumed.quant_state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert [r["final_loss"] for r in resumed.recon_records] == [r["final_loss"] for r in expected.recon_records]


@pytest.mark.parametrize("stop", [("les", 5), ("weights", 5), ("acts", 1), ("pts", 1)])
def test_resume_equals_an_uninterrupted_run(calibrated, bundle, trajectories, tmp_path, monkeypatch, stop):
    expected, _ = calibrated
    _assert_resume_matches(expected, bundle, trajectories, DMQConfig(**TINY), tmp_path, monkeypatch,
                           lambda pass_name, last_unit: (pass_name, last_unit) == stop)


def test_ablation_switches(bundle, trajectories):
    base = DMQConfig(**TINY)
    off, _ = calibrate(bundle, trajectories, dataclasses.replace(base, les=False, pts="off", per_step_acts=False))
    assert all(layer.input_scale is None for layer in off.layers().values())
    assert not any(isinstance(q, PTSQuantizer) for q in off.quantizers("act").values())
    assert not off.timestep_index.timesteps and off.plan.timesteps is None
    assert all(q.num_steps == 1 for q in off.quantizers("act").values())
    static, _ = calibrate(bundle, trajectories, dataclasses.replace(base, pts_per_step=False, pts_kappa=0.0))
    pts = [q for q in static.quantizers("act").values() if isinstance(q, PTSQuantizer)]
    assert pts and all(torch.equal(q.multiplier, q.multiplier[:1].expand_as(q.multiplier)) for q in pts)
    assert any(bool((q.multiplier < 1).any()) for q in pts)  # κ = 0: every mode is kept
    per_step, _ = calibrate(bundle, trajectories, dataclasses.replace(base, pts_kappa=0.0))
    pts = [q for q in per_step.quantizers("act").values() if isinstance(q, PTSQuantizer)]
    assert any(not torch.equal(q.multiplier[0], q.multiplier[k]) for q in pts for k in range(1, 4))
    mse, _ = calibrate(bundle, trajectories, dataclasses.replace(base, pts="mse", time_weight="uniform",
                                                                 pts_layers="all"))
    assert all(isinstance(q, PTSQuantizer) for name, q in mse.quantizers("act").items()
               if q.active and "time_emb" not in name)


def test_weight_only(bundle, trajectories):
    qmodel, _ = calibrate(bundle, trajectories, DMQConfig(weight_only=True, **TINY))
    assert qmodel.quant_config.tag == "W4A32" and not qmodel.timestep_index.timesteps
    assert {r["pass_name"] for r in qmodel.recon_records} == {"les", "weights"}


def test_official_preset_and_config_errors():
    config_cls, run = RECIPES["dmq_official"]
    assert run is run_dmq and config_cls is DMQOfficialConfig and RECIPES["dmq"] == (DMQConfig, run_dmq)
    official = config_cls()
    assert official.unit_order == "registration" and not official.fold_les and official.recipe_name == "dmq_official"
    with pytest.raises(ConfigError, match="independent_trajectories_per_step"):
        DMQConfig(independent_trajectories_per_step=True)
    for bad in (dict(pts="sometimes"), dict(time_weight="exp"), dict(pts_kappa=1.5), dict(les_scope="model"),
                dict(timestep_lookup="linear"), dict(cali_st=0)):
        with pytest.raises(ConfigError):
            DMQConfig(**bad)
    assert DMQConfig(les_scope="block").les_scope == "block"
    assert DMQConfig(pts_layers="skip_connection").pts_layers == DMQConfig().pts_layers
    with pytest.raises(ConfigError, match="calibration set"):
        run_dmq(None, None, DMQConfig())


def test_yaml_presets_load():
    assert load_yaml(DMQConfig, CONFIGS / "dmq.yaml") == DMQConfig()
    official = load_yaml(DMQOfficialConfig, CONFIGS / "dmq_official.yaml")
    assert dataclasses.asdict(official) == dataclasses.asdict(DMQOfficialConfig())


def test_pipeline_runs_the_recipe(bundle, tmp_path):
    from diffquant.pipeline import CalibConfig, quantize_bundle

    calib = CalibConfig(n=4, steps=4, every=2, batch_size=4, guidance=2.0)
    res = quantize_bundle(bundle, "dmq", QuantConfig(weight_bits=4, act_bits=8), calib, cache_dir=tmp_path,
                          recipe_config=DMQConfig(**TINY), work_dir=tmp_path / "work")
    assert res.qmodel.recipe == "dmq" and res.qmodel.quant_config.split
    assert len(res.qmodel.timestep_index.timesteps) == 4  # all_steps: every sampler step
    assert (tmp_path / "work" / "progress" / "state.json").is_file()


def test_smoothquant_alpha_options():
    assert DMQConfig().smoothquant_alpha is None
    assert DMQConfig(les=False, smoothquant_alpha=1).smoothquant_alpha == 1.0
    with pytest.raises(ConfigError, match="les=False"):
        DMQConfig(smoothquant_alpha=0.5)  # LES is on by default: the two are exclusive
    for bad in (-0.1, 1.5, "0.5", True):
        with pytest.raises(ConfigError, match="smoothquant_alpha"):
            DMQConfig(les=False, smoothquant_alpha=bad)


def test_smoothquant_yaml_loads(tmp_path):
    path = tmp_path / "sq.yaml"
    path.write_text("les: false\nsmoothquant_alpha: 0.5\nles_scope: block\n")
    config = load_yaml(DMQConfig, path)
    assert config.smoothquant_alpha == 0.5 and not config.les and config.les_scope == "block"
    path.write_text("smoothquant_alpha: 0.5\n")
    with pytest.raises(ConfigError, match="exclusive"):
        load_yaml(DMQConfig, path)


def _float_input_max(bundle, calib, name: str) -> torch.Tensor:
    """max |X_c| of the float UNet's layer ``name`` over the calibration set, by hand."""
    seen = []
    handle = bundle.unet.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            x, t, labels = calib[0:len(calib)]
            bundle.predict_noise(bundle.unet, x, t, labels)
    finally:
        handle.remove()
    return torch.cat([s.abs().amax(dim=(0, 2, 3)).reshape(1, -1) for s in seen]).amax(dim=0)


def test_smoothquant_baseline_end_to_end(bundle, trajectories):
    config = DMQConfig(les=False, smoothquant_alpha=0.5, **TINY)
    qmodel, calib = calibrate(bundle, trajectories, config)
    layers = qmodel.layers()
    names = [r["name"] for r in qmodel.recon_records if r["pass_name"] == "smoothquant"]
    assert names and not any(r["pass_name"] == "les" for r in qmodel.recon_records)
    covered = [n for n, layer in layers.items() if layer.input_scale is not None]
    assert names == covered
    assert not any(n in FP_LAYERS or n.endswith("time_emb_proj") for n in covered)
    # τ is the formula on the float model's calibration inputs
    name = "down_blocks.0.resnets.0.conv1"
    w_max = bundle.unet.get_submodule(name).weight.detach().abs().amax(dim=(0, 2, 3))
    want = (_float_input_max(bundle, calib, name).sqrt() / w_max.sqrt())
    torch.testing.assert_close(layers[name].input_scale, want, rtol=1e-4, atol=1e-6)
    # the rest of the recipe ran on top of it, and with quantization off the model is the float one
    assert {r["pass_name"] for r in qmodel.recon_records} == {"smoothquant", "weights", "acts", "pts"}
    x, t, labels = calib[0:4]
    qmodel.set_quant_state(weights=False, acts=False)
    with torch.no_grad():
        torch.testing.assert_close(bundle.predict_noise(qmodel, x, t, labels),
                                   bundle.predict_noise(bundle.unet, x, t, labels), rtol=1e-4, atol=1e-4)
    qmodel.set_quant_state(weights=True, acts=True)


def test_block_scope_les_end_to_end(bundle, trajectories):
    qmodel, _ = calibrate(bundle, trajectories, DMQConfig(les_scope="block", **TINY))
    layers = qmodel.layers()
    les = [r for r in qmodel.recon_records if r["pass_name"] == "les"]
    units = {u.name: u for u in qmodel.plan.units}
    # one record per reconstruction unit holding LES layers, every LES layer inside one of them
    assert les and all(r["name"] in units and r["iterations"] == 4 for r in les)
    assert any(r["kind"] == "block" for r in les)
    covered = [n for r in les for n in units[r["name"]].layers if layers[n].input_scale is not None]
    assert sorted(covered) == sorted(les_layers(qmodel))
    for name in covered:
        assert not torch.equal(layers[name].input_scale, torch.ones_like(layers[name].input_scale)), name
    assert all("forward" not in layer.__dict__ for layer in layers.values())
    assert [r["name"] for r in qmodel.recon_records if r["pass_name"] == "acts"] == [f"step{k}" for k in range(4)]


@pytest.mark.parametrize("overrides, stop_pass", [(dict(les_scope="block"), "les"),
                                                  (dict(les=False, smoothquant_alpha=0.5), "smoothquant")])
def test_resume_with_block_les_or_smoothquant(bundle, trajectories, tmp_path, monkeypatch, overrides, stop_pass):
    config = DMQConfig(**{**TINY, **overrides})
    expected, _ = calibrate(bundle, trajectories, config)
    # stop right after the first block / the SmoothQuant checkpoint
    _assert_resume_matches(expected, bundle, trajectories, config, tmp_path, monkeypatch,
                           lambda pass_name, last_unit: pass_name == stop_pass)


def test_dmq_result_exports_as_produced(calibrated, bundle, tmp_path):
    """τ not yet folded and PTS factors on shortcut convs: the ONNX export folds τ itself, runs the
    PTS layers as per-channel Q/DQ, and the graphs reproduce the fake-quant model per timestep;
    the int8 backend folds τ too and keeps PTS layers on fake quantization, saying why."""
    from diffquant.export.int8_backend import to_int8
    from diffquant.export.onnx_export import export_onnx
    from diffquant.export.onnx_runtime import OnnxDenoiser

    qmodel, _ = calibrated
    assert any(layer.input_scale is not None for layer in qmodel.layers().values())  # LES τ, unfolded
    pts = [n for n, q in qmodel.quantizers("act").items() if isinstance(q, PTSQuantizer) and not torch.all(q.multiplier == 1)]
    assert pts  # PTS chose factors ≠ 1 somewhere
    example = bundle.example_inputs(2)
    result = export_onnx(qmodel, example, tmp_path / "dmq.onnx", mode="integer")
    assert result.preparation.folded_tau and not result.preparation.changed_outputs
    assert any("DMQ PTS" in why for why in result.not_integer.values())
    denoiser = OnnxDenoiser(result.paths[0], threads=1)
    int8 = to_int8(qmodel)
    assert int8.int8_report.preparation.folded_tau and any("PTS" in w for w in int8.int8_report.fake_quant.values())
    gen = torch.Generator().manual_seed(3)
    for t in qmodel.timestep_index.timesteps[:: max(1, len(qmodel.timestep_index.timesteps) // 2)]:
        x = torch.randn(3, *bundle.sample_shape, generator=gen)
        ts = torch.full((3,), t)
        labels = torch.tensor([0, 1, 2])
        with torch.no_grad():
            fake = bundle.predict_noise(qmodel, x, ts, labels)
            for got in (bundle.predict_noise(denoiser, x, ts, labels), bundle.predict_noise(int8, x, ts, labels)):
                # per sample: a rounding-boundary flip (float order) stays within its sample
                per_sample = sorted(float((g - f).pow(2).mean().sqrt() / f.pow(2).mean().sqrt()) for g, f in zip(got, fake))
                assert per_sample[1] < 1e-3, (t, per_sample)
