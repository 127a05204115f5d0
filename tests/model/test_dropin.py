"""The quantized denoiser drops into real diffusers pipelines (Stable-Diffusion-style, DiT, DDIM):
assigned, passed to ``from_pretrained``, run end to end, saved and reloaded bit-identically, and
per-timestep rows selected by the model itself whoever calls it."""
from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline

import diffquant
from diffquant import QuantConfig
from diffquant.methods import DMQConfig, EDADMConfig, EfficientDMConfig, MPQDMConfig, QDiffusionConfig
from diffquant.quant.timestep import remove_timestep_hooks

from tiny_pipelines import tiny_ddim_pipeline, tiny_dit_pipeline, tiny_sd_pipeline

STEPS = 3


def sd_setup(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    capture = dict(prompts=["a cat", "a red apple"], num_inference_steps=STEPS, height=16, width=16,
                   output_type="latent")
    run = dict(prompt=["a dog on a beach"], num_inference_steps=STEPS, height=16, width=16, output_type="np")
    return pipe, "unet", capture, run


def dit_setup(tmp_path):
    return (tiny_dit_pipeline(), "transformer", dict(calls=[{"class_labels": [1, 2]}], num_inference_steps=STEPS,
                                                     output_type="np"),
            dict(class_labels=[3, 4], num_inference_steps=STEPS, output_type="np"))


def ddim_setup(tmp_path):
    return (tiny_ddim_pipeline(), "unet", dict(calls=[{"batch_size": 2}], num_inference_steps=STEPS, output_type="np"),
            dict(batch_size=2, num_inference_steps=STEPS, output_type="np"))


LOAD_KWARGS = {"sd": dict(safety_checker=None, requires_safety_checker=False), "dit": {}, "ddim": {}}
SETUPS = {"sd": sd_setup, "dit": dit_setup, "ddim": ddim_setup}
RECIPES = {
    "naive": None,
    "qdiffusion": QDiffusionConfig(iters_w=2, iters_a=2, batch_size=2, cali_st=1, cali_n=2, act_init_n=2),
    "dmq": DMQConfig(les_iters=2, iters_w=2, batch_size=2),
    "edadm": EDADMConfig(iters=2, batch_size=2, act_init_n=4),
    "mpqdm": MPQDMConfig(epochs=2, batch_size=2, lora_rank=2, stage1_batch=4),
    "efficientdm": EfficientDMConfig(epochs=2, batch_size=2, lora_rank=2, stage1_batch=4),
}


def images(pipe, run):
    return pipe(**run, generator=torch.Generator().manual_seed(5)).images


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("kind", list(SETUPS))
def test_quantized_denoiser_runs_inside_the_pipeline(kind, recipe, tmp_path):
    pipe, attr, capture, run = SETUPS[kind](tmp_path)
    float_model = getattr(pipe, attr)
    reference = images(pipe, run)
    calib = diffquant.capture_pipeline(pipe, progress=False, **capture)
    qmodel = diffquant.apply_recipe(float_model, calib, recipe, QuantConfig(weight_bits=4, act_bits=8),
                                    recipe_config=RECIPES[recipe])
    # the denoiser's own attributes pass through; the quantizer settings live under another name
    assert qmodel.config == float_model.config and qmodel.dtype == float_model.dtype
    assert qmodel.device == float_model.device and qmodel.quant_config.weight_bits == 4
    assert isinstance(qmodel.denoiser, type(float_model))
    assert qmodel.config is qmodel.denoiser.config  # one config: a pipeline that rewrites it rewrites the denoiser's
    setattr(pipe, attr, qmodel)
    quantized = images(pipe, run)
    # diffusers' own save and load keep the quantization: the component is recorded as diffquant's
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index[attr] == ["diffquant", "QuantModel"]
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "saved", **LOAD_KWARGS[kind])
    assert type(reloaded) is type(pipe) and isinstance(getattr(reloaded, attr), diffquant.QuantModel)
    assert getattr(reloaded, attr).recipe == qmodel.recipe
    assert (images(reloaded, run) == quantized).all()
    setattr(pipe, attr, qmodel.denoiser)  # the bare denoiser object works just the same
    assert (images(pipe, run) == quantized).all()
    assert quantized.shape == reference.shape and (quantized != reference).any()
    # W4A8 of a tiny random model stays near the float images
    assert float(abs(quantized - reference).mean()) < 0.25
    from diffquant.nn.layers import QuantLayer

    assert not any(isinstance(m, QuantLayer) for m in float_model.modules())  # the float model stays float


def test_from_pretrained_accepts_the_quantized_denoiser(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe, attr, capture, run = sd_setup(tmp_path)
    pipe.save_pretrained(tmp_path / "float")
    qmodel = diffquant.apply_recipe(pipe.unet, diffquant.capture_pipeline(pipe, progress=False, **capture), "naive",
                                    QuantConfig(weight_bits=4))
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "float", unet=qmodel,
                                                       safety_checker=None, requires_safety_checker=False)
    assert reloaded.unet is qmodel
    bare = StableDiffusionPipeline.from_pretrained(tmp_path / "float", unet=qmodel.denoiser,
                                                   safety_checker=None, requires_safety_checker=False)
    assert bare.unet is qmodel.denoiser
    assert (images(reloaded, run) == images(bare, run)).all()
    pipe.unet = qmodel
    assert (images(reloaded, run) == images(pipe, run)).all()


def test_saving_the_bare_quantized_denoiser_warns_in_one_line(tmp_path):
    pipe, attr, capture, run = ddim_setup(tmp_path)
    qmodel = diffquant.apply_recipe(pipe.unet, diffquant.capture_pipeline(pipe, progress=False, **capture), "naive")
    pipe.unet = qmodel.denoiser
    with pytest.warns(UserWarning, match=r"pipe.unet = qmodel") as caught:
        pipe.save_pretrained(tmp_path / "bare")
    assert all("\n" not in str(w.message) for w in caught)
    # through the wrapper (save, pipeline save, the library's own reads) nothing is said
    pipe.unet = qmodel
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="diffquant: the state dict")
        pipe.save_pretrained(tmp_path / "wrapped")
        diffquant.save(qmodel, tmp_path / "ckpt")
        diffquant.save_pipeline(pipe, tmp_path / "plain")


def test_per_timestep_rows_are_chosen_by_the_model_under_any_caller(tmp_path):
    pipe, attr, capture, run = ddim_setup(tmp_path)
    calib = diffquant.capture_pipeline(pipe, progress=False, **capture)
    qmodel = diffquant.apply_recipe(pipe.unet, calib, "dmq", QuantConfig(weight_bits=4, act_bits=8),
                                    recipe_config=RECIPES["dmq"])
    assert qmodel.timestep_index.num_steps == STEPS  # one activation row per calibrated step
    pipe.unet = qmodel
    through_wrapper = images(pipe, run)
    pipe.unet = qmodel.denoiser
    assert (images(pipe, run) == through_wrapper).all()
    # the rows really differ: without the model's own hook a stale row is read
    remove_timestep_hooks(qmodel.denoiser)
    qmodel.timestep_index.index = 0
    assert (images(pipe, run) != through_wrapper).any()


def test_save_pipeline_keeps_the_quantization_and_reloads_bit_identically(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe, attr, capture, run = sd_setup(tmp_path)
    calib = diffquant.capture_pipeline(pipe, progress=False, **capture)
    pipe.unet = diffquant.apply_recipe(pipe.unet, calib, "qdiffusion", QuantConfig(weight_bits=4),
                                       recipe_config=RECIPES["qdiffusion"])
    before = images(pipe, run)
    diffquant.save_pipeline(pipe, tmp_path / "saved")
    assert isinstance(pipe.unet, diffquant.QuantModel)  # the caller's pipeline is left as it was
    assert (tmp_path / "saved" / "unet" / "diffquant" / "manifest.json").is_file()
    reloaded = diffquant.load_pipeline(StableDiffusionPipeline, tmp_path / "saved", safety_checker=None,
                                       requires_safety_checker=False)
    assert isinstance(reloaded.unet, diffquant.QuantModel) and reloaded.unet.recipe == "qdiffusion"
    assert (images(reloaded, run) == before).all()
    # the folder is still a plain diffusers pipeline (float) for anyone without diffquant
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "saved", safety_checker=None,
                                                    requires_safety_checker=False)
    assert type(plain.unet).__name__ == "UNet2DConditionModel"


def test_save_pipeline_refuses_a_bare_quantized_denoiser(tmp_path):
    pipe, attr, capture, run = ddim_setup(tmp_path)
    qmodel = diffquant.apply_recipe(pipe.unet, diffquant.capture_pipeline(pipe, progress=False, **capture), "naive")
    pipe.unet = qmodel.denoiser
    with pytest.raises(diffquant.DiffquantError, match="pipe.unet = qmodel"):
        diffquant.save_pipeline(pipe, tmp_path / "x")


def test_mpqdm_fine_tunes_along_the_recorded_trajectories(tmp_path):
    """MPQ-DM from a pipeline capture: QALoRA + TRD follow the recorded float trajectories (the
    same rows of the same trajectories at every step) and the loss history is recorded."""
    from diffquant.finetune.qalora import RecordedTrajectories

    pipe, attr, capture, run = sd_setup(tmp_path)
    calib = diffquant.capture_pipeline(pipe, progress=False, **capture)
    cs = calib.calib_set
    # 2 prompts × 2 CFG halves = 4 trajectories, each present at every step
    assert sorted(set(cs.sample_ids.tolist())) == [0, 1, 2, 3]
    assert all(sorted(cs.sample_ids[cs.steps == k].tolist()) == [0, 1, 2, 3] for k in range(STEPS))
    source = RecordedTrajectories(cs, diffquant.conditioned_call, RECIPES["mpqdm"].finetune_options(STEPS, 1.0),
                                  torch.device("cpu"))
    picked = [cs[torch.arange(len(cs))][0].shape for _ in [0]]
    assert source.timesteps == sorted(set(cs.ts.tolist()), reverse=True) and picked
    qmodel = diffquant.apply_recipe(pipe.unet, calib, "mpqdm", QuantConfig(weight_bits=3, act_bits=8),
                                    recipe_config=RECIPES["mpqdm"])
    history = qmodel.mpq_records["history"]
    assert len(history) == 2 and all(h["eps_loss"] > 0 and h["trd_loss"] > 0 for h in history)
    assert qmodel.timestep_index.num_steps == STEPS


def test_the_official_presets_run_from_a_pipeline_capture(tmp_path):
    from diffquant.methods import RECIPES as ALL

    pipe, attr, capture, run = ddim_setup(tmp_path)
    calib = diffquant.capture_pipeline(pipe, progress=False, **capture)
    fast = {"qdiffusion_official": dict(iters_w=2, iters_a=2, batch_size=2, act_init_n=2),
            "edadm_official": dict(iters=2, batch_size=2, act_init_n=4),
            "dmq_official": dict(les_iters=2, iters_w=2, batch_size=2),
            "mpqdm_official": dict(epochs=1, batch_size=2, lora_rank=2, stage1_batch=4)}
    float_unet = pipe.unet
    reference = images(pipe, run)
    for name, options in fast.items():
        qmodel = diffquant.apply_recipe(float_unet, calib, name, QuantConfig(weight_bits=4),
                                        recipe_config=ALL[name][0](**options))
        pipe.unet = qmodel
        out = images(pipe, run)
        assert qmodel.recipe == name and out.shape == reference.shape and (out != reference).any()


def test_quantmodel_save_pretrained_keeps_float_weights_plain_and_reloads_bit_identically(tmp_path):
    from diffusers import UNet2DModel

    pipe, attr, capture, run = ddim_setup(tmp_path)
    qmodel = diffquant.apply_recipe(pipe.unet, diffquant.capture_pipeline(pipe, progress=False, **capture), "dmq",
                                    QuantConfig(weight_bits=4), recipe_config=RECIPES["dmq"])
    qmodel.save_pretrained(tmp_path / "unet")
    plain = UNet2DModel.from_pretrained(tmp_path / "unet")  # a float model, no stray quantizer tensors
    assert set(plain.state_dict()) == set(pipe.unet.state_dict())
    loaded = diffquant.QuantModel.from_pretrained(tmp_path / "unet")
    (x, t), kw = diffquant.capture_pipeline(pipe, progress=False, **capture).example_inputs(2)
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, qmodel(x, t).sample)
