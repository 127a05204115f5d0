"""The command line: help, bad arguments (exit 2, one line), quantize end to end."""
from __future__ import annotations

import json

import pytest
import torch

from diffquant import cli
from diffquant.paths import assets_dir


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("main", "quantize", "sample", "evaluate", "train"):
        assert cmd in text


def test_no_command_prints_help_and_exits_2(capsys):
    code, out, _ = run([], capsys)
    assert code == 2 and "usage" in out


@pytest.mark.parametrize("bits", ["0", "9", "12", "four"])
def test_bad_bit_width_is_a_clear_error(bits, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["quantize", "--model", "mnist-resunet", "--wbits", bits, "--out", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "bit-width" in err and "Traceback" not in err


def test_missing_model_folder_is_one_line_exit_2(tmp_path, capsys):
    code, _, err = run(["quantize", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    assert err.startswith("diffquant: error:") and len(err.strip().splitlines()) == 1


def test_unknown_recipe_is_one_line_exit_2(tmp_path, capsys, tiny_unet_folder):
    code, _, err = run(["quantize", "--model", str(tiny_unet_folder), "--recipe", "magic",
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "unknown recipe" in err


@pytest.fixture
def tiny_unet_folder(tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)
    folder = tmp_path / "tiny-unet"
    unet.save_pretrained(folder)
    return folder


def test_quantize_command_saves_a_loadable_checkpoint(tmp_path, capsys, tiny_unet_folder, monkeypatch):
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q"
    code, stdout, err = run(["quantize", "--model", str(tiny_unet_folder), "--wbits", "4", "--abits", "8",
                             "--split", "--calib-n", "4", "--calib-steps", "4", "--calib-every", "2",
                             "--out", str(out)], capsys)
    assert code == 0, err
    assert "saved to" in stdout and "conv_shortcut" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"] == "naive" and manifest["config"]["weight_bits"] == 4
    assert any(lp["split"] for lp in manifest["plan"]["layers"])
    # the checkpoint restores onto the float model
    from diffquant import load
    from diffquant.zoo.registry import load_model

    bundle = load_model(str(tiny_unet_folder))
    qmodel = load(bundle.unet, out)
    (x, t), kw = bundle.example_inputs(2)
    assert qmodel(x, t, **kw).sample.shape == x.shape


@pytest.mark.slow
@pytest.mark.skipif(assets_dir() is None, reason="needs ../shared/assets")
def test_main_job_runs_end_to_end_on_a_tiny_n(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    code, out, err = run(["main", "--model", "mnist-resunet", "--n", "4", "--steps", "5", "--no-fid",
                          "--out", str(tmp_path / "main")], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "main" / "results.json").read_text())
    settings = [r["setting"] for r in results["rows"]]
    assert settings == ["FP32", "W8A8", "W8A8", "W4A8", "W4A8"]
    assert all(0 <= r["mse_vs_fp [0,1]²"] <= 1 for r in results["rows"][1:])
    assert (tmp_path / "main" / "comparison.png").is_file()
    assert "W4A8" in out and "comparison.png" in out


def test_main_job_runs_the_chosen_recipe_beside_the_baseline_with_a_labelled_grid(tmp_path, capsys,
                                                                                 tiny_unet_folder, monkeypatch):
    """``main`` (recipe auto): the naive baseline and the chosen recipe at each setting, named in
    the output, each with the calibration it is sized for; units named; a readable, labelled grid."""
    from PIL import Image

    import diffquant.pipeline as pipeline

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    spec = "qdiffusion:iters_w=2,iters_a=2,cali_st=2,cali_n=2,act_init_n=2,batch_size=2"
    monkeypatch.setattr(pipeline, "MAIN_CHOICE", {"recipe": spec, "calib_n": 3, "calib_every": 1})
    monkeypatch.setattr(pipeline, "BASELINE", {"recipe": "naive", "calib_n": 2, "calib_every": 1})
    sized = []
    real = pipeline.quantize_bundle
    monkeypatch.setattr(pipeline, "quantize_bundle", lambda b, r, q, c, *a, **k: sized.append((r, c.n)) or real(b, r, q, c, *a, **k))
    code, out, err = run(["main", "--model", str(tiny_unet_folder), "--n", "3", "--steps", "2", "--no-fid",
                          "--out", str(tmp_path / "main")], capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "main" / "results.json").read_text())
    assert [(r["setting"], r["recipe"]) for r in results["rows"]] == [
        ("FP32", "-"), ("W8A8", "naive"), ("W8A8", spec), ("W4A8", "naive"), ("W4A8", spec)]
    assert sized == [("naive", 2), ("qdiffusion", 3)] * 2
    assert results["recipe"] == spec and results["baseline"] == "naive"
    assert f"recipe: {spec}" in out and "baseline: naive" in out and "main job done in" in out
    assert all(0 <= r["mse_vs_fp [0,1]²"] <= 1 and r["psnr_vs_fp dB"] > 0 for r in results["rows"][1:])
    assert any("[0, 1]" in note for note in results["notes"])
    grid = Image.open(tmp_path / "main" / "comparison.png")
    # 5 labelled rows of 3 tiles, each 8-pixel sample scaled up to >= 96 pixels
    assert grid.height >= 5 * 96 and grid.width >= 3 * 96 + 40


def test_grid_column_labels_are_the_class_names():
    from diffquant.bundle import DiffusionBundle, linear_ddpm_config
    from diffquant.pipeline import _column_labels

    bundle = DiffusionBundle("c", torch.nn.Identity(), linear_ddpm_config(), (1, 4, 4), num_classes=3, null_class=3,
                             extra={"classes": ["cat", "dog", "T-shirt/top"]})
    assert _column_labels(bundle, torch.tensor([2, 0, 1, 2]), 3) == ["T-shirt/top", "cat", "dog"]
    assert _column_labels(bundle, None, 3) is None


def test_quantize_with_a_recipe_config_resumes_from_its_work_dir(tmp_path, capsys, tiny_unet_folder, monkeypatch):
    """qdiffusion through the CLI with a YAML recipe config; a rerun reuses the finished units."""
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "qd.yaml"
    cfg.write_text("iters_w: 2\niters_a: 2\nbatch_size: 2\ncali_st: 2\ncali_n: 2\nact_init_n: 2\n")
    argv = ["quantize", "--model", str(tiny_unet_folder), "--recipe", "qdiffusion", "--recipe-config", str(cfg),
            "--calib-n", "2", "--calib-steps", "2", "--calib-every", "1", "--out", str(tmp_path / "q")]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["recipe"] == "qdiffusion"
    assert (tmp_path / "q" / "recipe.yaml").read_text().count("iters_w: 2") == 1
    assert (tmp_path / "q" / "work").is_dir()
    from safetensors.torch import load_file

    first = load_file(tmp_path / "q" / "quant_state.safetensors")
    code, _, err = run(argv, capsys)
    assert code == 0, err
    second = load_file(tmp_path / "q" / "quant_state.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_bad_recipe_config_key_is_a_clear_error(tmp_path, capsys, tiny_unet_folder):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("iterations_w: 2\n")
    code, _, err = run(["quantize", "--model", str(tiny_unet_folder), "--recipe", "qdiffusion",
                        "--recipe-config", str(cfg), "--out", str(tmp_path / "q")], capsys)
    assert code == 2 and "unknown QDiffusionConfig option" in err


@pytest.mark.parametrize("backend", ["fake", "int8"])
def test_sample_from_a_quantized_checkpoint(tmp_path, capsys, tiny_unet_folder, monkeypatch, backend):
    import numpy as np

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    q = tmp_path / "q"
    assert run(["quantize", "--model", str(tiny_unet_folder), "--calib-n", "2", "--calib-steps", "2",
                "--calib-every", "1", "--out", str(q)], capsys)[0] == 0
    common = ["sample", "--model", str(tiny_unet_folder), "--n", "2", "--steps", "3", "--no-progress"]
    code, _, err = run(common + ["--out", str(tmp_path / "fp")], capsys)
    assert code == 0, err
    code, _, err = run(common + ["--quantized", str(q), "--backend", backend, "--out", str(tmp_path / "qs")], capsys)
    assert code == 0, err
    fp = np.load(tmp_path / "fp" / "samples.npz")["images"]
    qs = np.load(tmp_path / "qs" / "samples.npz")["images"]
    assert fp.shape == qs.shape and not np.array_equal(fp, qs)


def test_int8_backend_without_a_checkpoint_is_a_clear_error(tmp_path, capsys, tiny_unet_folder):
    code, _, err = run(["sample", "--model", str(tiny_unet_folder), "--n", "1", "--backend", "int8",
                        "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "--quantized" in err
