"""References beyond MNIST through ``diffquant evaluate``: folders of grey or RGB images of any size,
saved statistics files, fidelity of any image size, and one-line refusals of bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from diffquant import cli
from diffquant.errors import DiffquantError
from diffquant.eval import inception
from diffquant.eval.reference import features_by_size, load_image_folder, read_image_folder, resolve_reference

from conftest import FakeExtractor


class SizeFreeExtractor(FakeExtractor):
    """Fake features that do not depend on the image size: per-channel moments of the pixels."""

    def extract(self, images_uint8, batch_size=50, device=None, progress=True, spatial=True):
        self.calls += 1
        x = np.asarray(images_uint8, dtype=np.float32) / 255.0
        x = np.repeat(x, 3, axis=1) if x.shape[1] == 1 else x
        flat = x.reshape(x.shape[0], 3, -1)
        pool = np.concatenate([flat.mean(-1), flat.std(-1), flat.min(-1), flat.max(-1), flat[..., :4].reshape(
            x.shape[0], -1)], axis=1)
        return {"pool": pool, **({"spatial": pool[:, :6].copy()} if spatial else {})}


def write_pngs(folder, images):
    """Save [N,H,W] or [N,H,W,3] uint8 images as PNG files 000.png, 001.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return folder


def rgb_set(n=8, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def grey_set(n=8, size=20, seed=0):
    return np.random.default_rng(seed + 100).integers(0, 256, size=(n, size, size), dtype=np.uint8)


def run(argv, capsys):
    """``diffquant.cli.main(argv)`` -> (exit code, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def results(out_dir):
    return json.loads((out_dir / "results.json").read_text())


@pytest.fixture
def fake_inception(monkeypatch):
    """``InceptionFeatures`` replaced by a cheap size-independent fake; the created ones are listed."""
    created = []

    def make(weights=None, device="cpu"):
        created.append(SizeFreeExtractor())
        return created[-1]

    monkeypatch.setattr(inception, "InceptionFeatures", make)
    return created


def test_image_folders_load_rgb_and_grey_of_any_size(tmp_path):
    images, info = load_image_folder(write_pngs(tmp_path / "rgb", rgb_set()))
    assert images.shape == (8, 3, 32, 32) and info["mode"] == "RGB" and info["files"] == 8
    np.testing.assert_array_equal(images.transpose(0, 2, 3, 1), rgb_set())
    images, info = load_image_folder(write_pngs(tmp_path / "grey", grey_set()))
    assert images.shape == (8, 1, 20, 20) and info["mode"] == "L"
    np.testing.assert_array_equal(images[:, 0], grey_set())
    mixed = write_pngs(tmp_path / "mixed", rgb_set(3, 32))
    Image.fromarray(rgb_set(1, 24, seed=5)[0]).save(mixed / "small.png")
    Image.fromarray(rgb_set(1, 24, seed=6)[0]).convert("RGBA").save(mixed / "alpha.png")  # alpha is dropped
    listed, info = read_image_folder(mixed)
    assert [a.shape for a in listed] == [(3, 32, 32)] * 3 + [(3, 24, 24), (3, 24, 24)]
    assert info["sizes"] == [[24, 24], [32, 32]]
    with pytest.raises(DiffquantError, match="2 sizes"):
        load_image_folder(mixed)


def test_features_of_mixed_sizes_come_back_in_file_order_one_pass_per_size():
    images = [a.transpose(2, 0, 1) for a in (*rgb_set(2, 32), *rgb_set(3, 24, seed=1), *rgb_set(1, 32, seed=2))]
    extractor = SizeFreeExtractor()
    feats = features_by_size(images, extractor, spatial=True, progress=False)
    assert extractor.calls == 2 and feats["pool"].shape[0] == 6
    one_by_one = np.concatenate([SizeFreeExtractor().extract(a[None])["pool"] for a in images])
    np.testing.assert_allclose(feats["pool"], one_by_one)


def test_folder_statistics_are_cached_until_a_file_or_the_extractor_changes(tmp_path, tmp_cache):
    folder = write_pngs(tmp_path / "ref", rgb_set())
    extractor = SizeFreeExtractor()
    first = resolve_reference(str(folder), extractor=extractor, spatial=False, progress=False)
    again = resolve_reference(str(folder), extractor=extractor, spatial=False, progress=False)
    assert extractor.calls == 1 and np.array_equal(first.pool.mu, again.pool.mu)
    assert first.meta["dataset"] == "folder" and first.meta["n"] == 8
    resolve_reference(str(folder), extractor=extractor, spatial=True, progress=False)
    assert extractor.calls == 2  # the cached entry had no spatial statistics
    Image.fromarray(rgb_set(1, seed=9)[0]).save(folder / "003.png")
    st = (folder / "003.png").stat()
    os.utime(folder / "003.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = resolve_reference(str(folder), extractor=extractor, spatial=False, progress=False)
    assert extractor.calls == 3 and not np.array_equal(changed.pool.mu, first.pool.mu)
    other = SizeFreeExtractor("fake-v2")
    resolve_reference(str(folder), extractor=other, spatial=False, progress=False)
    assert other.calls == 1


def test_fidelity_of_rgb_and_grey_sets_of_any_size(tmp_path, capsys, monkeypatch):
    def no_inception(*a, **k):
        raise AssertionError("mse/psnr must not load the Inception network")

    monkeypatch.setattr(inception, "InceptionFeatures", no_inception)
    for name, a, b in (("rgb32", rgb_set(8, 32), rgb_set(8, 32, seed=1)), ("grey20", grey_set(), grey_set(seed=1))):
        np.savez(tmp_path / f"{name}-a.npz", images=a)
        np.savez(tmp_path / f"{name}-b.npz", images=b)
        argv = ["evaluate", "--metrics", "mse,psnr", "--no-progress", "--samples", str(tmp_path / f"{name}-a.npz")]
        code, err = run([*argv, "--fp-samples", str(tmp_path / f"{name}-a.npz"), "--out", str(tmp_path / "same")],
                        capsys)
        assert code == 0, err
        same = results(tmp_path / "same")
        assert same["metrics"] == {"mse": 0.0, "psnr": "inf"}
        assert same["image_shape"] == ([1, 20, 20] if name == "grey20" else [3, 32, 32])
        code, err = run([*argv, "--fp-samples", str(tmp_path / f"{name}-b.npz"), "--out", str(tmp_path / "diff")],
                        capsys)
        assert code == 0, err
        diff = results(tmp_path / "diff")["metrics"]
        expected_mse = float(np.mean((a.astype(np.float64) - b) ** 2))
        assert diff["mse"] == pytest.approx(expected_mse)
        assert diff["psnr"] == pytest.approx(10 * np.log10(255.0**2 / expected_mse))
        assert 0 < diff["psnr"] < 20  # independent uniform noise: about 7.7 dB


def test_evaluate_against_a_mixed_size_folder_and_statistics_saved_without_samples(tmp_path, tmp_cache, capsys,
                                                                                  fake_inception):
    folder = write_pngs(tmp_path / "ref", rgb_set(6, 32))
    for i, a in enumerate(rgb_set(4, 24, seed=3)):
        Image.fromarray(a).save(folder / f"small{i}.png")
    code, err = run(["evaluate", "--reference", str(folder), "--no-progress",
                     "--save-reference-stats", str(tmp_path / "stats" / "ref.json")], capsys)
    assert code == 0, err
    assert (tmp_path / "stats" / "ref.json").is_file() and (tmp_path / "stats" / "ref.safetensors").is_file()
    assert json.loads((tmp_path / "stats" / "ref.json").read_text())["sizes"] == [[24, 24], [32, 32]]
    np.savez(tmp_path / "s.npz", images=rgb_set(8, 40, seed=4))
    for reference in (str(folder), str(tmp_path / "stats" / "ref"), str(tmp_path / "stats" / "ref.safetensors")):
        out = tmp_path / "out" / str(len(fake_inception))
        code, err = run(["evaluate", "--samples", str(tmp_path / "s.npz"), "--reference", reference, "--metrics",
                         "fid,sfid,precision,recall", "--no-progress", "--out", str(out)], capsys)
        assert code == 0, err
        r = results(out)
        assert r["metrics"]["fid"] > 0 and r["reference"]["dataset"] == "folder" and r["reference"]["n"] == 10
        assert "folder" in (out / "results.md").read_text()
    assert [e.calls for e in fake_inception] == [2, 1, 1, 1]  # two sizes once; later runs: samples only


def _case_files(tmp_path):
    """Files for the bad-input cases: samples, a good folder, saved fake-v2 statistics."""
    np.savez(tmp_path / "s.npz", images=rgb_set(8, 32))
    np.savez(tmp_path / "small.npz", images=rgb_set(8, 16))
    np.savez(tmp_path / "grey32.npz", images=grey_set(8, 32))
    np.savez(tmp_path / "rgba.npz", images=np.zeros((8, 32, 32, 4), np.uint8))
    good = write_pngs(tmp_path / "good", rgb_set(4, 32))
    ref = resolve_reference(str(good), extractor=SizeFreeExtractor("fake-v2"), spatial=True, progress=False,
                            cache=False)
    ref.save(tmp_path / "v2")
    ref.save(tmp_path / "half")
    (tmp_path / "half.safetensors").unlink()
    ref.save(tmp_path / "corrupt")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    (tmp_path / "empty").mkdir()
    write_pngs(tmp_path / "broken", rgb_set(3)).joinpath("001.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    write_pngs(tmp_path / "mixed", rgb_set(3))
    Image.fromarray(grey_set(1, 32)[0]).save(tmp_path / "mixed" / "grey.png")
    write_pngs(tmp_path / "deep", rgb_set(3))
    Image.fromarray((np.arange(1024, dtype=np.uint16) * 60).reshape(32, 32)).save(tmp_path / "deep" / "wide.png")


BAD_INPUTS = {
    "empty folder": (["--reference", "{t}/empty"], "holds 0 image files"),
    "unreadable image": (["--reference", "{t}/broken"], "cannot read reference image"),
    "mixed channels": (["--reference", "{t}/mixed"], "mixes grey and colour"),
    "16-bit image": (["--reference", "{t}/deep"], "more than 8 bits"),
    "stats of another extractor": (["--reference", "{t}/v2.json"], "another feature extractor"),
    "stats half written": (["--reference", "{t}/half.json"], "half.safetensors is missing"),
    "stats corrupt": (["--reference", "{t}/corrupt"], "cannot read reference statistics"),
    "stats with --ref-n": (["--reference", "{t}/v2", "--ref-n", "3"], "do not apply"),
    "no such reference": (["--reference", "{t}/nowhere"], "neither"),
    "fp of another size": (["--metrics", "mse", "--fp-samples", "{t}/small.npz"], "same images"),
    "fp grey vs rgb": (["--metrics", "psnr", "--fp-samples", "{t}/grey32.npz"], "same images"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case, tmp_path, tmp_cache, capsys, fake_inception):
    _case_files(tmp_path)
    extra, message = BAD_INPUTS[case]
    argv = ["evaluate", "--samples", str(tmp_path / "s.npz"), "--metrics", "fid", "--no-progress",
            "--out", str(tmp_path / "out")]
    argv += [a.format(t=tmp_path) for a in extra]
    if "--metrics" in extra:
        del argv[3:5]
    code, err = run(argv, capsys)
    assert code == 2 and message in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "--samples", "{t}/rgba.npz", "--metrics", "fid", "--out", "{t}/o"], "[N,H,W,1|3]"),
    (["evaluate", "--reference", "{t}/good"], "needs --samples"),
    (["evaluate", "--samples", "{t}/s.npz", "--metrics", "mse"], "needs --out"),
])
def test_bad_command_lines_exit_2_with_one_line(argv, message, tmp_path, capsys, fake_inception):
    _case_files(tmp_path)
    code, err = run([a.format(t=tmp_path) for a in argv], capsys)
    assert code == 2 and message in err, err
    assert err.strip().count("\n") == 0


def test_real_inception_fid_of_rgb_32_and_grey_20_sets_against_themselves(tmp_path, tmp_cache, capsys,
                                                                          fid_weights_path):
    """RGB 32x32 against statistics saved once from its folder, grey 20x20 against its folder: FID ~ 0.

    Two Fréchet distances at 2048-d only (seconds each on a shared CPU); different sets are
    scored by the fake-extractor tests above.
    """
    common = ["--fid-weights", str(fid_weights_path), "--fd-method", "eigh", "--no-progress"]
    rgb, grey = write_pngs(tmp_path / "rgb", rgb_set(8, 32)), write_pngs(tmp_path / "grey", grey_set(8, 20))
    np.savez(tmp_path / "rgb.npz", images=rgb_set(8, 32))
    np.savez(tmp_path / "grey.npz", images=grey_set(8, 20))

    code, err = run(["evaluate", "--reference", str(rgb), "--save-reference-stats", str(tmp_path / "rgb-stats"),
                     "--metrics", "fid", *common], capsys)
    assert code == 0, err
    code, err = run(["evaluate", "--samples", str(tmp_path / "rgb.npz"), "--reference", str(tmp_path / "rgb-stats.json"),
                     "--metrics", "fid,precision,recall", "--out", str(tmp_path / "rgb-self"), *common], capsys)
    assert code == 0, err
    same = results(tmp_path / "rgb-self")
    assert abs(same["metrics"]["fid"]) < 1e-3
    assert same["metrics"]["precision"] == 1.0 and same["metrics"]["recall"] == 1.0
    assert same["extractor"]["resize"].startswith("torch-bilinear") and same["image_shape"] == [3, 32, 32]
    assert same["reference"]["stats_file"] == str((tmp_path / "rgb-stats").resolve())

    code, err = run(["evaluate", "--samples", str(tmp_path / "grey.npz"), "--reference", str(grey),
                     "--metrics", "fid", "--out", str(tmp_path / "grey-self"), *common], capsys)
    assert code == 0, err
    grey_result = results(tmp_path / "grey-self")
    assert abs(grey_result["metrics"]["fid"]) < 1e-3 and grey_result["image_shape"] == [1, 20, 20]
    assert grey_result["reference"]["mode"] == "L" and grey_result["reference"]["sizes"] == [[20, 20]]
