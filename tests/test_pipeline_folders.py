"""The CLI on full diffusers pipeline folders: text-to-image with prompts, DiT with class labels,
through diffusers (VAE decoding included), quantized pipelines saved and sampled."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffquant import cli
from diffquant.calib.pipeline_capture import PipelineCalibration

from tiny_pipelines import tiny_dit_pipeline, tiny_sd_pipeline


def run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    tiny_sd_pipeline(root / "build").save_pretrained(root / "pipe")
    return root / "pipe"


def test_quantize_and_sample_a_text_to_image_pipeline_folder(sd_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red apple\n")
    q = tmp_path / "q"
    code, out, err = run(["quantize", "--model", str(sd_folder), "--recipe", "naive", "--wbits", "4",
                          "--calib-n", "2", "--calib-steps", "2", "--calib-every", "1", "--prompts", str(prompts),
                          "--out", str(q)], capsys)
    assert code == 0, err
    assert (q / "unet" / "diffquant" / "manifest.json").is_file() and "pipe.unet" in out
    # calibration ran on the prompts' text embeddings, both CFG halves
    calib = PipelineCalibration.load(q / "calibration")
    embeds = calib.calib_set.labels.tensors["encoder_hidden_states"]
    assert len(calib) == 2 * 2 * 2 and float(embeds.abs().sum()) > 0
    from diffusers import StableDiffusionPipeline

    float_pipe = StableDiffusionPipeline.from_pretrained(sd_folder, local_files_only=True)
    cond, uncond = float_pipe.encode_prompt(["a cat", "a red apple"], "cpu", 1, True)
    torch.testing.assert_close(embeds[:4], torch.cat([uncond, cond]))  # one call of both prompts, step 0
    code, out, err = run(["sample", "--model", str(q), "--n", "2", "--steps", "2", "--prompts", str(prompts),
                          "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    images = np.load(tmp_path / "s" / "samples.npz")["images"]
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8  # decoded by the VAE, not latents
    settings = json.loads((tmp_path / "s" / "samples.json").read_text())
    assert settings["prompts"] == ["a cat", "a red apple"]
    # the float folder samples differently from the quantized one, from the same seeds
    code, _, err = run(["sample", "--model", str(sd_folder), "--n", "2", "--steps", "2", "--prompts", str(prompts),
                        "--out", str(tmp_path / "f")], capsys)
    assert code == 0, err
    assert not np.array_equal(np.load(tmp_path / "f" / "samples.npz")["images"], images)


def test_dit_pipeline_folder_with_class_labels(tmp_path, capsys):
    tiny_dit_pipeline().save_pretrained(tmp_path / "dit")
    code, out, err = run(["quantize", "--model", str(tmp_path / "dit"), "--calib-n", "2", "--calib-steps", "2",
                          "--calib-every", "1", "--classes", "1,2", "--out", str(tmp_path / "q")], capsys)
    assert code == 0, err
    assert (tmp_path / "q" / "transformer" / "diffquant" / "manifest.json").is_file()
    code, _, err = run(["sample", "--model", str(tmp_path / "q"), "--n", "2", "--steps", "2", "--classes", "3,4",
                        "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    data = np.load(tmp_path / "s" / "samples.npz")
    assert data["images"].shape == (2, 16, 16, 3) and data["labels"].tolist() == [3, 4]


def test_wrong_conditioning_and_unsupported_commands_are_one_line(sd_folder, tmp_path, capsys):
    code, _, err = run(["quantize", "--model", str(sd_folder), "--classes", "1,2", "--out", str(tmp_path / "q")],
                       capsys)
    assert code == 2 and "--prompts" in err and "Traceback" not in err
    code, _, err = run(["main", "--prompts", "p.txt", "--no-fid", "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "full diffusers pipeline" in err  # the default model takes no prompts
    code, _, err = run(["bench", "--model", str(sd_folder), "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "--reference" in err  # FID of a pipeline folder needs a reference set
    code, _, err = run(["quantize", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "q")], capsys)
    assert code == 2 and "never downloads" in err


def test_quantize_takes_recipe_specs(tmp_path, capsys, monkeypatch):
    from diffusers import UNet2DModel

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=4, attention_head_dim=8).save_pretrained(tmp_path / "tiny")
    code, _, err = run(["quantize", "--model", str(tmp_path / "tiny"), "--recipe",
                        "qdiffusion:iters_w=2,iters_a=2,batch_size=2,cali_st=1,cali_n=2,act_init_n=2",
                        "--calib-n", "2", "--calib-steps", "2", "--calib-every", "1", "--out", str(tmp_path / "q")],
                       capsys)
    assert code == 0, err
    assert "iters_w: 2" in (tmp_path / "q" / "recipe.yaml").read_text()
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["recipe"] == "qdiffusion"


def test_bench_on_a_pipeline_folder_compares_recipes_from_the_same_prompts(sd_folder, tmp_path, capsys, monkeypatch):
    from PIL import Image

    from diffquant.eval import inception

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red apple\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i}.png")

    class Pixels:  # a cheap feature extractor: FID on raw pixels (the real Inception is tested in tests/eval)
        def identity(self):
            return {"name": "pixels"}

        def extract(self, images, batch_size=50, device=None, progress=True, spatial=True):
            x = np.asarray(images, dtype=np.float32).reshape(len(images), -1)[:, ::97] / 255.0
            return {"pool": x, "spatial": x[:, :4]}

    monkeypatch.setattr(inception, "InceptionFeatures", lambda weights=None, device="cpu": Pixels())
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    code, out, err = run(["bench", "--model", str(sd_folder), "--recipes", "naive", "qdiffusion:iters_w=2,iters_a=2,"
                          "batch_size=2,act_init_n=2", "--settings", "W8A8", "W4A8", "--n", "4", "--steps", "2",
                          "--calib-n", "2", "--calib-every", "1", "--prompts", str(prompts), "--metrics", "fid",
                          "--reference", str(ref), "--out", str(tmp_path / "b")], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    rows = {(r["recipe"].split(":")[0], r["setting"]): r for r in results["rows"]}
    assert set(rows) == {("fp32", "W32A32"), ("naive", "W8A8"), ("naive", "W4A8"), ("qdiffusion", "W8A8"),
                         ("qdiffusion", "W4A8")}
    assert all(np.isfinite(r["fid"]) for r in rows.values())
    # fidelity to the float images from the same prompts and seeds: W4 is further away than W8
    assert rows[("naive", "W4A8")]["mse"] > rows[("naive", "W8A8")]["mse"] > 0
    assert (tmp_path / "b" / "results.md").read_text().count("| naive |") == 2


def test_main_on_a_pipeline_folder_samples_every_setting_from_the_same_prompts(sd_folder, tmp_path, capsys,
                                                                              monkeypatch):
    from PIL import Image

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na red apple\n")
    code, out, err = run(["main", "--model", str(sd_folder), "--bits", "W8A8", "W4A8", "--n", "2", "--steps", "2",
                          "--calib-n", "2", "--prompts", str(prompts), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    assert "FID skipped" in out and "| fp32 |" in out  # no reference given: fidelity only
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    rows = {r["setting"]: r for r in results["rows"]}
    assert list(rows) == ["W32A32", "W8A8", "W4A8"]
    assert 0 < rows["W8A8"]["mse"] < rows["W4A8"]["mse"]  # same prompts and seeds: W4 is further from float
    grid = Image.open(tmp_path / "m" / "comparison.png")
    # a labelled row per setting; the 16-pixel images are scaled up to 96 pixels to be seen
    assert grid.size[1] == 3 * (96 + 2) + 2 and grid.size[0] > 2 * (96 + 2)
