"""MPQ-DM / EfficientDM recipes end to end on a tiny class-conditional UNet2DModel."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffquant.calib.capture import capture_trajectories
from diffquant.config import QuantConfig, load_yaml
from diffquant.diffusion.sampling import sample
from diffquant.errors import ConfigError, DiffquantError
from diffquant.finetune.coverage import coverage_of
from diffquant.methods import RECIPES
from diffquant.methods.mpqdm import EfficientDMConfig, MPQDMConfig, MPQDMOfficialConfig, run_mpqdm
from diffquant.model import load, quantize, save
from diffquant.pipeline import CalibConfig, quantize_bundle
from diffquant.quant.variants import MixedBitQuantizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
K = 4
TINY = dict(lora_rank=4, stage1_batch=16, batch_size=2, guidance=2.0, epochs=1)


@pytest.fixture(scope="module")
def pool(bundle, tmp_path_factory):
    cache = capture_trajectories(bundle, 4, steps=K, guidance=2.0, batch_size=4, progress=False,
                                 cache_dir=tmp_path_factory.mktemp("traj"))
    return MPQDMConfig().select_calibration(cache).with_uncond()


def calibrate(bundle, pool, config, wbits=3, abits=6, **kwargs):
    qmodel = quantize(bundle.unet, config.wrap_config(QuantConfig(weight_bits=wbits, act_bits=abits)),
                      bundle.example_inputs(2))
    run_mpqdm(qmodel, None, config, calib_set=pool, bundle=bundle, progress=False, **kwargs)
    return qmodel


def test_recipes_registered_with_their_switches():
    assert RECIPES["mpqdm"][0] is MPQDMConfig and RECIPES["efficientdm"][0] is EfficientDMConfig
    assert RECIPES["mpqdm_official"][0] is MPQDMOfficialConfig
    official = MPQDMOfficialConfig()
    assert (official.omq_candidates, official.trd_grad, official.lora_lr) == ("code", "none", "code")
    assert official.recipe_name == "mpqdm_official"
    edm = EfficientDMConfig()
    assert edm.recipe_name == "efficientdm"
    assert not (edm.omq or edm.smooth or edm.trd or edm.learn_weight_zero_point)
    lib = MPQDMConfig()
    assert (lib.omq_candidates, lib.trd_grad, lib.lora_lr, lib.lora_rank, lib.trd_n, lib.trd_weight) == \
        ("paper", "current", "library", 32, 2, 100.0)
    for name, cls in (("mpqdm", MPQDMConfig), ("mpqdm_official", MPQDMOfficialConfig),
                      ("efficientdm", EfficientDMConfig)):
        assert load_yaml(cls, CONFIGS / f"{name}.yaml") == cls()
    for bad in ({"omq_criterion": "max"}, {"trd_grad": "all"}, {"trd_loss": "mse"}, {"lora_lr": "x"},
                {"omq_candidates": "all"}, {"trd_n": 0}, {"smooth_alpha": 2.0}):
        with pytest.raises(ConfigError):
            MPQDMConfig(**bad)


def test_coverage_rules_on_the_zoo_architectures():
    """MPQ-DM's coverage is a rule list on the plan's roles, applied when the model is wrapped."""
    from diffquant.zoo.mnist_convunet import MnistConvUNet
    from diffquant.zoo.mnist_resunet import MnistResUNet

    config = MPQDMConfig()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 5])
    res = quantize(MnistResUNet().eval(), config.wrap_config(QuantConfig(weight_bits=3, act_bits=6)), ((x, t), {}))
    cov = coverage_of(res)
    assert set(cov["eight_bit"]) == {"conv_in", "pe_linear.0", "pe_linear.2", "conv_out"}
    shortcuts = {lp.name for lp in res.plan.layers if lp.name.endswith("residual_conv")}
    assert len(shortcuts) == 9 and set(cov["fp"]) == {"downs.0", "downs.1", "downs.2"} | shortcuts
    assert all("shortcut" in res.plan.layer(n).roles for n in shortcuts)
    assert "ups.0" in cov["mixed"] and res.plan.layer("downs.0").weight_bits == 32
    assert res.plan.layer("conv_in").weight_bits == 8 and res.plan.layer("conv_in").act_bits == 8
    conv = quantize(MnistConvUNet().eval(), config.wrap_config(QuantConfig(weight_bits=3, act_bits=6)), ((x, t), {}))
    cov = coverage_of(conv)
    assert "b1.0.conv1" in cov["eight_bit"] and "conv_out" in cov["eight_bit"]
    assert {"down1", "down2", "down3.2"} <= set(cov["fp"]) and "down3.0" in cov["mixed"]
    with pytest.raises(ConfigError, match="unknown layer role '@stem'"):
        MPQDMConfig(eight_bit_layers=["@stem"])


def test_mpqdm_end_to_end_save_load_and_sampling(bundle, pool, tmp_path):
    config = MPQDMConfig(**TINY, omq_candidates="paper")
    qmodel = calibrate(bundle, pool, config)
    assert qmodel.recipe == "mpqdm" and not qmodel.training
    assert not any(p.requires_grad for p in qmodel.parameters())
    cov = qmodel.mpq_records["coverage"]
    assert set(cov["eight_bit"]) == {"conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "conv_out"}
    names = [lp.name for lp in qmodel.plan.layers]
    assert set(cov["fp"]) == {n for n in names if n.endswith("conv_shortcut") or "downsamplers" in n}
    layers = qmodel.layers()
    for name in cov["eight_bit"]:  # W8A8, static: identical rows, no LoRA or smoothing
        layer = layers[name]
        assert layer.weight_quantizers[0].bits == 8 and layer.act_quantizers[0].bits == 8
        assert layer.weight_delta is None and layer.input_scale is None
        step = layer.act_quantizers[0].step
        assert torch.equal(step, step[:1].expand_as(step))
    for name in cov["fp"]:
        assert not any(q.active for q in layers[name].weight_quantizers + layers[name].act_quantizers)
    mixed = [layers[n] for n in cov["mixed"]]
    assert all(isinstance(m.weight_quantizers[0], MixedBitQuantizer) for m in mixed)
    assert all(m.weight_quantizers[0].average_bits == 3.0 for m in mixed)
    assert any(len(torch.unique(m.weight_quantizers[0].channel_bits)) == 3 for m in mixed)
    assert all(m.weight_delta is not None and m.weight_delta.rank == 4 and m.input_scale is not None for m in mixed)
    # TALSQ rows learned separately per step
    assert any(not torch.equal(m.act_quantizers[0].step[0], m.act_quantizers[0].step[-1]) for m in mixed)
    assert len(qmodel.mpq_records["history"]) == 1
    assert "(2:" in qmodel.summary()

    save(qmodel, tmp_path / "q")
    loaded = load(bundle.unet, tmp_path / "q")
    assert loaded.recipe == "mpqdm" and loaded.recipe_config["lora_rank"] == 4
    lm = loaded.layers()[cov["mixed"][0]]
    assert torch.equal(lm.weight_quantizers[0].channel_bits, mixed[0].weight_quantizers[0].channel_bits)
    a, b = qmodel.quant_state_dict(), loaded.quant_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
    kw = dict(steps=K, guidance=2.0, batch_size=2, progress=False)
    s1 = sample(bundle.with_unet(qmodel), 2, **kw)
    s2 = sample(bundle.with_unet(loaded), 2, **kw)
    fp = sample(bundle, 2, **kw)
    assert torch.equal(s1.samples, s2.samples) and torch.isfinite(s1.samples).all()
    assert not torch.equal(s1.samples, fp.samples)
    with pytest.raises(DiffquantError):  # the TALSQ tables belong to the K-step schedule
        sample(bundle.with_unet(qmodel), 1, steps=K + 1, guidance=2.0, progress=False)


def test_efficientdm_end_to_end(bundle, pool):
    stage1 = calibrate(bundle, pool, EfficientDMConfig(**{**TINY, "epochs": 0}))
    tuned = calibrate(bundle, pool, EfficientDMConfig(**TINY))
    assert tuned.recipe == "efficientdm"
    for name in tuned.mpq_records["coverage"]["mixed"]:
        a, b = stage1.layers()[name], tuned.layers()[name]
        wa, wb = a.weight_quantizers[0], b.weight_quantizers[0]
        assert not isinstance(wb, MixedBitQuantizer) and b.input_scale is None
        assert torch.equal(wa.zero_point, wb.zero_point)  # EfficientDM learns the weight step only
    assert any(not torch.equal(stage1.layers()[n].weight_quantizers[0].step, tuned.layers()[n].weight_quantizers[0].step)
               for n in tuned.mpq_records["coverage"]["mixed"])
    assert all(h["trd_loss"] == 0 for h in tuned.mpq_records["history"])


def test_official_preset_and_ablation_switches_run(bundle, pool):
    official = calibrate(bundle, pool, MPQDMOfficialConfig(**TINY))
    assert official.recipe == "mpqdm_official"
    # {0, ⌊C/10⌋}: 8-channel layers have only k = 0, 16-channel layers {0, 1}
    candidates = [r["candidates"] for r in official.mpq_records["stage1"]]
    assert all(c in ([0], [0, 1]) for c in candidates) and [0, 1] in candidates
    assert official.mpq_records["history"][0]["trd_loss"] > 0  # computed, though without gradient
    ablation = calibrate(bundle, pool, MPQDMConfig(**TINY, omq=False, smooth=False, trd_loss="l2_feature",
                                                   trd_grad="window", omq_criterion="random"))
    mixed = ablation.mpq_records["coverage"]["mixed"]
    assert not any(isinstance(ablation.layers()[n].weight_quantizers[0], MixedBitQuantizer) for n in mixed)
    with pytest.raises(ConfigError):  # fine-tuning needs the bundle
        run_mpqdm(quantize(bundle.unet, MPQDMConfig().wrap_config(QuantConfig(weight_bits=3, act_bits=6)),
                           bundle.example_inputs(2)), None, MPQDMConfig(**TINY), calib_set=pool, progress=False)


def test_pipeline_dispatch(bundle, tmp_path):
    config = MPQDMConfig(**TINY)
    result = quantize_bundle(bundle, "mpqdm", QuantConfig(weight_bits=3, act_bits=6),
                             CalibConfig(n=2, steps=K, batch_size=2, guidance=2.0), cache_dir=tmp_path / "c",
                             recipe_config=config, work_dir=tmp_path / "w")
    assert result.qmodel.recipe == "mpqdm" and len(result.qmodel.timestep_index.timesteps) == K
    assert (tmp_path / "w" / "mpqdm_records.json").is_file()
    assert (tmp_path / "w" / "finetune" / "state.json").is_file()


def test_mpqdm_and_efficientdm_results_export_as_produced(bundle, pool, tmp_path):
    """LoRA updates and learned real-valued weight zero points: the export merges the update
    (no change), rounds the zero points and reports the output change it causes."""
    from diffquant.export.int8_backend import to_int8
    from diffquant.export.onnx_export import export_onnx
    from diffquant.export.onnx_runtime import OnnxDenoiser

    example = bundle.example_inputs(2)
    for config in (MPQDMConfig(**TINY), EfficientDMConfig(**TINY)):
        qmodel = calibrate(bundle, pool, config, wbits=4, abits=8)
        assert any(layer.weight_delta is not None for layer in qmodel.layers().values())
        with pytest.warns(UserWarning, match="rounded the real-valued zero points") if _real_zero_points(qmodel) \
                else _no_warning():
            result = export_onnx(qmodel, example, tmp_path / f"{config.__class__.__name__}.onnx", mode="qdq")
        prep = result.preparation
        assert prep.merged_lora
        if prep.changed_outputs:
            assert 0 < prep.output_change < 0.5
        assert any(layer.weight_delta is not None for layer in qmodel.layers().values())  # caller's model untouched
        got = OnnxDenoiser(result.paths[0], threads=1)(*example[0], **example[1])
        int8 = to_int8(qmodel, example_inputs=example)
        assert int8.int8_report.int8 and int8.int8_report.preparation.merged_lora
        with torch.no_grad():
            ref = int8(*example[0], **example[1])
            ref = ref if isinstance(ref, torch.Tensor) else ref.sample
        # both integer paths run the same prepared model
        assert float((got - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()) < 2e-2


def _real_zero_points(qmodel) -> bool:
    return any(not torch.equal(q.zero_point, torch.round(q.zero_point)) for q in qmodel.quantizers().values()
               if isinstance(getattr(q, "zero_point", None), torch.Tensor))


def _no_warning():
    import contextlib

    return contextlib.nullcontext()
