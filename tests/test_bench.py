"""The benchmark runner: same seeds for every row, table, curves, plots, grid."""
from __future__ import annotations

import json

import pytest
import torch

from diffquant.bench import BenchConfig, model_size_mb, run_bench
from diffquant.errors import ConfigError
from diffquant.pipeline import CalibConfig


@pytest.fixture
def tiny_folder(tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8)
    unet.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_bench_matrix_writes_table_curves_and_plots(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    cfg = BenchConfig(model=str(tiny_folder), recipes=["naive"], settings=["W8A8", "W4A8"], n=4, steps=3,
                      batch_size=4, metrics=[], eps_n=2, calib=CalibConfig(n=4, steps=3, every=1, batch_size=4),
                      out=str(tmp_path / "bench"), noise_floor=False)
    results = run_bench(cfg)
    out = tmp_path / "bench"
    saved = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in saved["rows"]] == ["W32A32", "W8A8", "W4A8"]
    w8, w4 = saved["rows"][1], saved["rows"][2]
    # lower bits, larger error and smaller model; every curve has one point per step
    assert w4["eps_mse"] > w8["eps_mse"] > 0
    assert w4["size_mb"] < w8["size_mb"] < saved["rows"][0]["size_mb"]
    assert all(len(c["eps_mse"]) == 3 for c in results["eps_mse_curves"].values())
    assert saved["protocol"]["steps"] == 3 and "torch" in saved["environment"]
    for name in ("results.md", "comparison.png", "eps_mse_per_step.png", "bench_config.yaml"):
        assert (out / name).is_file(), name
    # the same seeds: the FP samples written for the table equal a fresh draw
    import numpy as np
    from diffquant.diffusion.sampling import sample
    from diffquant.zoo.registry import load_model

    fresh = sample(load_model(str(tiny_folder)), 4, seed=0, steps=3, progress=False)
    assert np.array_equal(np.load(out / "samples" / "fp32" / "samples.npz")["images"], fresh.images)


def test_fid_without_a_known_reference_is_a_clear_error(tmp_path, tiny_folder):
    cfg = BenchConfig(model=str(tiny_folder), metrics=["fid"], n=2, steps=2, out=str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="reference"):
        run_bench(cfg)


def test_model_size_counts_weight_bits(tiny_folder):
    import diffquant as dq
    from diffquant.zoo.registry import load_model

    bundle = load_model(str(tiny_folder))
    q8 = dq.quantize(bundle.unet, dq.QuantConfig(weight_bits=8, quantize_acts=False), bundle.example_inputs())
    q4 = dq.quantize(bundle.unet, dq.QuantConfig(weight_bits=4, quantize_acts=False), bundle.example_inputs())
    weights = sum(layer.weight.numel() for layer in q8.layers().values())
    assert model_size_mb(q8) - model_size_mb(q4) == pytest.approx(weights * 4 / 8 / 2**20)


def test_recipe_specs_parse_overrides_and_files(tmp_path):
    from diffquant.pipeline import parse_recipe_spec

    name, cfg = parse_recipe_spec("qdiffusion:split=false,iters_w=7,calib_policy=last_n")
    assert name == "qdiffusion" and cfg.split is False and cfg.iters_w == 7 and cfg.calib_policy == "last_n"
    (tmp_path / "q.yaml").write_text("iters_a: 3\n")
    name, cfg = parse_recipe_spec(f"qdiffusion@{tmp_path / 'q.yaml'}:iters_w=5")
    assert cfg.iters_a == 3 and cfg.iters_w == 5
    # YAML 1.1 would read "off" as False and "1e-3" as a string; option values keep the typed word
    name, cfg = parse_recipe_spec("dmq:pts=off,time_weight=uniform,les=false,les_lr=1e-3")
    assert cfg.pts == "off" and cfg.les is False and cfg.les_lr == pytest.approx(1e-3)
    for bad in ("qdiffusion:nope=1", "qdiffusion:iters_w", "nosuchrecipe"):
        with pytest.raises(ConfigError):
            parse_recipe_spec(bad)


def test_bench_rows_are_labelled_by_recipe_spec(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    cfg = BenchConfig(model=str(tiny_folder), recipes=["naive", "naive:a_init=ema_minmax"], settings=["W4A8"], n=2,
                      steps=2, batch_size=2, metrics=[], eps_n=1, calib=CalibConfig(n=2, steps=2, every=1, batch_size=2),
                      out=str(tmp_path / "bench"), noise_floor=False)
    rows = run_bench(cfg)["rows"]
    assert [r["recipe"] for r in rows] == ["fp32", "naive", "naive:a_init=ema_minmax"]
    assert rows[1]["eps_mse"] != rows[2]["eps_mse"]  # the override reached the recipe


def test_extra_rows_follow_the_matrix_at_their_own_settings(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    cfg = BenchConfig(model=str(tiny_folder), recipes=["naive"], settings=["W8A8"], n=2, steps=2, batch_size=2,
                      metrics=[], eps_n=1, calib=CalibConfig(n=2, steps=2, every=1, batch_size=2),
                      rows=[["w4a32", "naive:a_init=ema_minmax"]], out=str(tmp_path / "bench"), noise_floor=False)
    rows = run_bench(cfg)["rows"]
    assert [(r["recipe"], r["setting"]) for r in rows] == [
        ("fp32", "W32A32"), ("naive", "W8A8"), ("naive:a_init=ema_minmax", "W4A32")]
    assert rows[2]["size_mb"] < rows[1]["size_mb"]  # the row really ran at 4-bit weights
    assert "naive:a_init=ema_minmax W4A32" in (tmp_path / "bench" / "results.md").read_text()
    bad = BenchConfig(model=str(tiny_folder), rows=[["W4A8"]], out=str(tmp_path / "bad"))
    with pytest.raises(ConfigError):
        run_bench(bad)


def _interrupt_second_calibration(monkeypatch):
    """Make the bench's second ``quantize_bundle`` call raise KeyboardInterrupt; returns the real one."""
    import diffquant.bench as bench_module

    real = bench_module.quantize_bundle
    calls = []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_module, "quantize_bundle", failing_second)
    return real


def test_finished_rows_survive_an_interrupted_run(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    _interrupt_second_calibration(monkeypatch)
    cfg = BenchConfig(model=str(tiny_folder), recipes=["naive"], settings=["W8A8", "W4A8"], n=2, steps=2,
                      batch_size=2, metrics=[], eps_n=1, calib=CalibConfig(n=2, steps=2, every=1, batch_size=2),
                      out=str(tmp_path / "bench"), noise_floor=False)
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg)
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved["complete"] is False and [r["setting"] for r in saved["rows"]] == ["W32A32", "W8A8"]
    assert "partial" in (tmp_path / "bench" / "results.md").read_text()


def _tiny_cfg(tiny_folder, out, settings, **kw):
    base = dict(model=str(tiny_folder), recipes=["naive"], settings=settings, n=2, steps=2, batch_size=2, metrics=[],
                eps_n=1, calib=CalibConfig(n=2, steps=2, every=1, batch_size=2), out=str(out), noise_floor=False)
    return BenchConfig(**{**base, **kw})


def test_resume_adds_missing_rows_and_keeps_the_float_row(tmp_path, tiny_folder, monkeypatch):
    import diffquant.bench as bench_module
    import diffquant.diffusion.sampling as sampling

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    first = run_bench(_tiny_cfg(tiny_folder, tmp_path / "bench", ["W8A8"]))
    real_quantize, real_sample = bench_module.quantize_bundle, sampling.sample
    quantized, sampled = [], []
    monkeypatch.setattr(bench_module, "quantize_bundle", lambda *a, **k: quantized.append(a[2]) or real_quantize(*a, **k))
    monkeypatch.setattr(sampling, "sample", lambda *a, **k: sampled.append(a[1]) or real_sample(*a, **k))
    second = run_bench(_tiny_cfg(tiny_folder, tmp_path / "bench", ["W8A8", "W4A8"], resume=True))
    # only the new row was calibrated and sampled (its n samples plus the ε-curve's eps_n); the
    # float row and the W8A8 row are the first run's, untouched
    assert [(q.weight_bits, q.act_bits) for q in quantized] == [(4, 8)]
    assert sampled == [2, 1]
    assert [r["setting"] for r in second["rows"]] == ["W32A32", "W8A8", "W4A8"]
    assert second["rows"][:2] == first["rows"]
    assert set(second["eps_mse_curves"]) == {"naive W8A8", "naive W4A8"}
    assert len(second["commands"]) == 2 and second["complete"] is True


def test_an_interrupted_bench_resumes_to_the_uninterrupted_result(tmp_path, tiny_folder, monkeypatch):
    import diffquant.bench as bench_module

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    whole = run_bench(_tiny_cfg(tiny_folder, tmp_path / "whole", ["W8A8", "W4A8"]))
    real = _interrupt_second_calibration(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_bench(_tiny_cfg(tiny_folder, tmp_path / "cut", ["W8A8", "W4A8"]))
    monkeypatch.setattr(bench_module, "quantize_bundle", real)
    resumed = run_bench(_tiny_cfg(tiny_folder, tmp_path / "cut", ["W8A8", "W4A8"], resume=True))
    measured = ("recipe", "setting", "eps_mse", "mse", "psnr", "size_mb")
    assert [[r.get(k) for k in measured] for r in resumed["rows"]] == [[r.get(k) for k in measured] for r in whole["rows"]]
    assert resumed["rows"][2]["eps_mse"] > resumed["rows"][1]["eps_mse"] > 0


def test_resume_refuses_a_run_with_another_protocol(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    fresh = run_bench(_tiny_cfg(tiny_folder, tmp_path / "bench", ["W8A8"], resume=True))  # nothing there: a fresh run
    assert [r["setting"] for r in fresh["rows"]] == ["W32A32", "W8A8"]
    kept = (tmp_path / "bench" / "bench_config.yaml").read_text()
    with pytest.raises(ConfigError, match="steps: 2 there, 3 now"):
        run_bench(_tiny_cfg(tiny_folder, tmp_path / "bench", ["W8A8"], steps=3,
                            calib=CalibConfig(n=2, steps=3, every=1, batch_size=2), resume=True))
    assert (tmp_path / "bench" / "bench_config.yaml").read_text() == kept  # the refused run wrote nothing
    (tmp_path / "bench" / "samples" / "fp32" / "samples.npz").unlink()
    with pytest.raises(ConfigError, match="float row"):
        run_bench(_tiny_cfg(tiny_folder, tmp_path / "bench", ["W8A8"], resume=True))


def test_calibration_seeds_give_their_own_rows_and_a_mean_with_its_spread(tmp_path, tiny_folder, monkeypatch):
    """Two calibration seeds: two different calibrations (disjoint trajectories), the row's metrics
    are their mean with the right standard deviation and interval, and the sampling-noise floor row
    is the float model from disjoint seeds."""
    import numpy as np

    import diffquant.bench as bench_module

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    real, offsets = bench_module.quantize_bundle, []
    monkeypatch.setattr(bench_module, "quantize_bundle",
                        lambda *a, **k: offsets.append(k["seed_offset"]) or real(*a, **k))
    results = run_bench(_tiny_cfg(tiny_folder, tmp_path / "bench", ["W4A8"], calib_seeds=2, noise_floor=True, n=4,
                                  batch_size=4))
    assert offsets == [0, 1]
    fp, floor, row = results["rows"]
    assert (fp["recipe"], floor["recipe"]) == ("fp32", bench_module.NOISE_FLOOR_ROW)
    first, second = row["per_seed"]
    assert first["eps_mse"] != second["eps_mse"]  # another calibration set, another model
    values = [first["eps_mse"], second["eps_mse"]]
    assert row["eps_mse"] == pytest.approx(np.mean(values))
    assert row["eps_mse_std"] == pytest.approx(np.std(values, ddof=1))
    lo, hi = row["eps_mse_ci95"]
    assert min(values) <= lo <= row["eps_mse"] <= hi <= max(values)
    assert row["calib_seeds"] == 2
    floor_images = np.load(tmp_path / "bench" / "samples" / "fp32-disjoint-seeds" / "samples.npz")["images"]
    fp_images = np.load(tmp_path / "bench" / "samples" / "fp32" / "samples.npz")["images"]
    assert floor_images.shape == fp_images.shape and not np.array_equal(floor_images, fp_images)
    assert (tmp_path / "bench" / "samples" / "naive-W4A8-seed1" / "samples.npz").is_file()
    md = (tmp_path / "bench" / "results.md").read_text()
    assert "2 calibration seeds per row" in md and "eps_mse_ci95" in md and "per_seed" not in md


def test_seed_zero_is_the_single_seed_run(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    one = run_bench(_tiny_cfg(tiny_folder, tmp_path / "one", ["W4A8"]))["rows"][1]
    two = run_bench(_tiny_cfg(tiny_folder, tmp_path / "two", ["W4A8"], calib_seeds=2))["rows"][1]
    assert two["per_seed"][0]["eps_mse"] == one["eps_mse"] and "per_seed" not in one


def test_leaderboard_sizes_each_recipe_to_the_budget_and_summarizes(tmp_path, tiny_folder, monkeypatch):
    """benchmarks/leaderboard.py: two probe calibrations size the schedule (σ) of each recipe to the
    budget, the sized specs run with K seeds in one bench run, and the summary table and plot are
    written."""
    import importlib.util
    from pathlib import Path

    monkeypatch.setenv("DIFFQUANT_CACHE", str(tmp_path / "cache"))
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "leaderboard.py"
    spec = importlib.util.spec_from_file_location("leaderboard", path)
    board = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(board)
    # the cost line: 1 s fixed + 100 s per unit of σ → a 4 s budget gives σ = 0.03
    monkeypatch.setattr(board, "probe", lambda model, preset, setting, sigma, *a: 1.0 + 100.0 * sigma)
    extra = '{"qdiffusion": "cali_st=2,cali_n=2,act_init_n=2,batch_size=2"}'
    code = board.main(["--model", str(tiny_folder), "--presets", "naive", "qdiffusion", "--settings", "W8A8",
                       "--budget-s", "4", "--calib-seeds", "2", "--calib-n", "2", "--steps", "2", "--n", "2",
                       "--metrics", "--extra", extra, "--out", str(tmp_path / "lb")])
    assert code == 0
    plan = json.loads((tmp_path / "lb" / "plan.json").read_text())
    sized = {r["spec"].split(":")[0]: r for r in plan["rows"]}
    assert sized["naive"]["spec"] == "naive" and sized["qdiffusion"]["sigma"] == pytest.approx(0.03)
    assert sized["qdiffusion"]["spec"].startswith("qdiffusion:iters_w=30,iters_a=15,")
    board_json = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    rows = board_json["tables"][0]["rows"]
    assert [r["recipe"] for r in rows if not r["recipe"].startswith("fp32")] == [r["spec"] for r in plan["rows"]]
    assert all(r["calib_seeds"] == 2 for r in rows if not r["recipe"].startswith("fp32"))
    assert (tmp_path / "lb" / "leaderboard.md").is_file() and (tmp_path / "lb" / "leaderboard.png").is_file()
    assert board.fit_sigma({0.1: 100.0, 0.2: 110.0}, 50.0)[1]["over_budget"]  # fixed cost above the budget
