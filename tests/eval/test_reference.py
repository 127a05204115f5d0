"""References beyond MNIST: a folder of images of any size (grey or RGB) and a saved statistics file,
through ``diffquant evaluate``."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffquant import cli
from diffquant.errors import DiffquantError
from diffquant.eval import inception
from diffquant.eval.reference import load_image_folder, resolve_reference

from conftest import FakeExtractor


def write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return folder


def rgb_set(n=8, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_image_folder_loads_rgb_and_grey_and_refuses_mixed_or_broken(tmp_path):
    rgb = write_images(tmp_path / "rgb", rgb_set())
    images, info = load_image_folder(rgb)
    assert images.shape == (8, 3, 32, 32) and info["mode"] == "RGB"
    np.testing.assert_array_equal(images.transpose(0, 2, 3, 1), rgb_set())
    grey = write_images(tmp_path / "grey", rgb_set(size=20)[..., 0])
    assert load_image_folder(grey)[0].shape == (8, 1, 20, 20)
    Image.fromarray(rgb_set(1)[0]).save(grey / "colour.png")
    with pytest.raises(DiffquantError, match="mixes grey and colour"):
        load_image_folder(grey)
    (rgb / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DiffquantError, match="cannot read reference image"):
        load_image_folder(rgb)
    with pytest.raises(DiffquantError, match="need at least 2"):
        load_image_folder(write_images(tmp_path / "one", rgb_set(1)))


def test_folder_statistics_are_cached_and_a_stats_file_of_another_extractor_is_refused(tmp_path, tmp_cache):
    folder = write_images(tmp_path / "ref", rgb_set())
    extractor = FakeExtractor()
    first = resolve_reference(str(folder), extractor=extractor, spatial=False, progress=False)
    again = resolve_reference(str(folder), extractor=extractor, spatial=False, progress=False)
    assert extractor.calls == 1 and np.array_equal(first.pool.mu, again.pool.mu)
    first.save(tmp_path / "stats")
    loaded = resolve_reference(str(tmp_path / "stats.json"), extractor=extractor, spatial=False)
    np.testing.assert_array_equal(loaded.pool.sigma, first.pool.sigma)
    with pytest.raises(DiffquantError, match="another feature extractor"):
        resolve_reference(str(tmp_path / "stats.json"), extractor=FakeExtractor("fake-v2"), spatial=False)
    with pytest.raises(DiffquantError, match="neither"):
        resolve_reference(str(tmp_path / "nothing-here"), extractor=extractor)


def test_evaluate_any_size_rgb_against_a_folder_and_a_saved_stats_file(tmp_path, tmp_cache, capsys, monkeypatch):
    monkeypatch.setattr(inception, "InceptionFeatures", lambda weights=None, device="cpu": FakeExtractor())
    images = rgb_set(8, 24)
    folder = write_images(tmp_path / "ref", images)
    np.savez(tmp_path / "s.npz", images=images)
    np.savez(tmp_path / "other.npz", images=rgb_set(8, 24, seed=1))
    code, err = run(["evaluate", "--samples", str(tmp_path / "s.npz"), "--reference", str(folder), "--metrics",
                     "fid,precision,recall,mse,psnr", "--fp-samples", str(tmp_path / "other.npz"), "--no-progress",
                     "--save-reference-stats", str(tmp_path / "stats"), "--out", str(tmp_path / "e1")], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "e1" / "results.json").read_text())["metrics"]
    assert abs(metrics["fid"]) < 1e-6  # the same images as the reference
    assert metrics["mse"] > 0 and np.isfinite(metrics["psnr"])
    code, err = run(["evaluate", "--samples", str(tmp_path / "other.npz"), "--reference", str(tmp_path / "stats.json"),
                     "--metrics", "fid", "--no-progress", "--out", str(tmp_path / "e2")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "e2" / "results.json").read_text())["metrics"]["fid"] > 0
    np.savez(tmp_path / "small.npz", images=rgb_set(8, 16))
    code, err = run(["evaluate", "--samples", str(tmp_path / "small.npz"), "--fp-samples", str(tmp_path / "s.npz"),
                     "--metrics", "mse", "--out", str(tmp_path / "e3")], capsys)
    assert code == 2 and "same images" in err and "Traceback" not in err


def test_real_inception_fid_of_a_folder_against_itself_is_zero(tmp_path, tmp_cache, fid_weights_path, capsys):
    images = rgb_set(8, 40)
    folder = write_images(tmp_path / "ref", images)
    np.savez(tmp_path / "s.npz", images=images)
    code, err = run(["evaluate", "--samples", str(tmp_path / "s.npz"), "--reference", str(folder), "--metrics", "fid",
                     "--fid-weights", str(fid_weights_path), "--fd-method", "eigh", "--no-progress",
                     "--out", str(tmp_path / "e")], capsys)
    assert code == 0, err
    assert abs(json.loads((tmp_path / "e" / "results.json").read_text())["metrics"]["fid"]) < 1e-3
