"""capture_pipeline(): every argument the denoiser receives, recorded from a real diffusers pipeline."""
from __future__ import annotations

import pytest
import torch

import diffquant
from diffquant.calib.pipeline_capture import PipelineCalibration, read_prompts
from diffquant.errors import DiffquantError

from tiny_pipelines import tiny_ddim_pipeline, tiny_dit_pipeline, tiny_sd_pipeline

STEPS = 3


def test_text_to_image_capture_records_the_prompts_embeddings_and_both_cfg_halves(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    prompts = ["a cat", "a red apple on a table"]
    calib = diffquant.capture_pipeline(pipe, prompts=prompts, num_inference_steps=STEPS, height=16, width=16,
                                       guidance_scale=7.5, output_type="latent", progress=False)
    cs = calib.calib_set
    assert len(cs) == len(prompts) * STEPS * 2  # one row per prompt, step and CFG half
    pipe.scheduler.set_timesteps(STEPS)
    assert cs.ts[:2].tolist() == [int(pipe.scheduler.timesteps[0])] * 2
    assert cs.steps.tolist()[:6] == [0, 0, 1, 1, 2, 2]
    embeds = cs.labels.tensors["encoder_hidden_states"]
    for i, prompt in enumerate(prompts):
        cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
        first = i * STEPS * 2  # rows of this prompt's first step: [uncond, cond] (diffusers order)
        torch.testing.assert_close(embeds[first], uncond[0])
        torch.testing.assert_close(embeds[first + 1], cond[0])
        assert float(embeds[first + 1].abs().sum()) > 0  # real text embeddings, not zeros
    assert not torch.equal(embeds[0 + 1], embeds[STEPS * 2 + 1])  # the two prompts differ


def test_dit_capture_keeps_class_labels_with_the_null_class(tmp_path):
    pipe = tiny_dit_pipeline()
    calib = diffquant.capture_pipeline(pipe, calls=[{"class_labels": [1, 2]}], num_inference_steps=STEPS,
                                       output_type="np", progress=False)
    labels = calib.calib_set.labels.tensors["class_labels"]
    assert labels[:4].tolist() == [1, 2, 1000, 1000]  # conditional half, then the null class
    assert calib.denoiser == "transformer"


def test_every_keeps_every_kth_step_and_save_load_round_trips(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    calib = diffquant.capture_pipeline(pipe, prompts=["a cat"], num_inference_steps=4, height=16, width=16,
                                       every=2, output_type="latent", progress=False, out=tmp_path / "calib")
    assert sorted(set(calib.calib_set.steps.tolist())) == [0, 2]
    loaded = PipelineCalibration.load(tmp_path / "calib")
    for a, b in zip((calib.calib_set.xs, calib.calib_set.ts, calib.calib_set.steps),
                    (loaded.calib_set.xs, loaded.calib_set.ts, loaded.calib_set.steps)):
        assert torch.equal(a, b)
    assert loaded.calib_set.labels.fingerprint() == calib.calib_set.labels.fingerprint()
    assert set(loaded.calib_set.labels.kwargs()) == set(calib.calib_set.labels.kwargs())
    (args, kwargs) = loaded.example_inputs(2)
    assert args[0].shape[0] == 2 and kwargs["encoder_hidden_states"].shape[0] == 2


def test_prompts_from_a_file_the_default_set_and_bad_prompts(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("# my prompts\na cat\n\na dog\n")
    assert read_prompts(file) == ["a cat", "a dog"]
    assert len(read_prompts(None)) >= 32
    with pytest.raises(DiffquantError, match="not found"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(DiffquantError, match="non-empty"):
        read_prompts([])


def test_a_pipeline_without_prompts_needs_calls(tmp_path):
    with pytest.raises(DiffquantError, match="takes no prompt"):
        diffquant.capture_pipeline(tiny_ddim_pipeline(), num_inference_steps=2, progress=False)
    with pytest.raises(DiffquantError, match="no denoiser"):
        diffquant.capture_pipeline(object(), calls=[{}], progress=False)


def test_non_finite_recorded_conditioning_is_refused(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    norms = [m for m in pipe.text_encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    with torch.no_grad():
        norms[-1].bias.fill_(float("nan"))  # the text embeddings become NaN
    with pytest.raises(DiffquantError, match="encoder_hidden_states.*non-finite"):
        diffquant.capture_pipeline(pipe, prompts=["a cat"], num_inference_steps=2, height=16, width=16,
                                   output_type="latent", progress=False)
