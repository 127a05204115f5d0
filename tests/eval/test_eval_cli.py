import argparse
import json

import numpy as np
import pytest

from diffquant.data import write_idx
from diffquant.errors import DiffquantError
from diffquant.eval import inception
from diffquant.eval.eval_cli import add_evaluate_parser, load_samples
from conftest import FakeExtractor


def parse(argv):
    parser = argparse.ArgumentParser(prog="diffquant")
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["evaluate", *argv])


def save_samples(path, images, **extra):
    np.savez(path, images=images, **extra)
    return str(path)


@pytest.mark.parametrize("shape,want", [((5, 28, 28), (5, 1, 28, 28)), ((5, 1, 28, 28), (5, 1, 28, 28)),
                                        ((5, 28, 28, 1), (5, 1, 28, 28)), ((5, 32, 20), (5, 1, 32, 20)),
                                        ((5, 3, 20, 24), (5, 3, 20, 24)), ((5, 20, 24, 3), (5, 3, 20, 24))])
def test_load_samples_accepts_layouts(tmp_path, shape, want):
    images, labels, protocol = load_samples(save_samples(tmp_path / "s.npz", np.zeros(shape, np.uint8),
                                                         labels=np.arange(5), protocol=json.dumps({"steps": 5})))
    assert images.shape == want and labels.tolist() == [0, 1, 2, 3, 4] and protocol == {"steps": 5}


@pytest.mark.parametrize("array,match", [
    (np.zeros((5, 4, 28, 28), np.uint8), "got \\(5, 4, 28, 28\\)"),
    (np.zeros((1, 28, 28), np.uint8), "N >= 2"),
    (np.zeros((5, 28, 28), np.float32), "uint8"),
])
def test_load_samples_rejects_bad_images(tmp_path, array, match):
    with pytest.raises(DiffquantError, match=match) as e:
        load_samples(save_samples(tmp_path / "s.npz", array))
    assert "\n" not in str(e.value)


def test_protocol_read_from_sampler_settings_file(tmp_path):
    (tmp_path / "samples.json").write_text(json.dumps({"scheduler": "ddim", "steps": 50, "eta": 0.0}))
    _, labels, protocol = load_samples(save_samples(tmp_path / "samples.npz", np.zeros((3, 1, 28, 28), np.uint8)))
    assert protocol == {"scheduler": "ddim", "steps": 50, "eta": 0.0} and labels is None
    (tmp_path / "samples.json").write_text("{not json")
    with pytest.raises(DiffquantError, match="not valid JSON"):
        load_samples(tmp_path / "samples.npz")


def test_load_samples_other_errors(tmp_path):
    with pytest.raises(DiffquantError, match="not found"):
        load_samples(tmp_path / "missing.npz")
    np.savez(tmp_path / "x.npz", pixels=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DiffquantError, match="no image array"):
        load_samples(tmp_path / "x.npz")
    with pytest.raises(DiffquantError, match="labels"):
        load_samples(save_samples(tmp_path / "s.npz", np.zeros((4, 28, 28), np.uint8), labels=np.arange(3)))


def test_evaluate_command_end_to_end(tmp_path, monkeypatch, tmp_cache):
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    write_idx(data / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8))
    write_idx(data / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, size=50, dtype=np.uint8))
    samples = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    s = save_samples(tmp_path / "q.npz", samples, protocol=json.dumps({"sampler": "ddim", "steps": 50}))
    fp = save_samples(tmp_path / "fp.npz", samples)
    created = []

    def fake_inception(weights=None, device="cpu"):
        created.append(FakeExtractor())
        return created[-1]

    monkeypatch.setattr(inception, "InceptionFeatures", fake_inception)
    argv = ["--samples", s, "--fp-samples", fp, "--reference", "mnist", "--ref-n", "40", "--data-dir", str(data),
            "--metrics", "fid,sfid,precision,recall,mse,psnr", "--out", str(tmp_path / "out"), "--no-progress",
            "--fd-method", "eigh"]
    args = parse(argv)
    assert args.handler(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["metrics"]) == {"fid", "sfid", "precision", "recall", "mse", "psnr"}
    assert results["metrics"]["mse"] == 0.0
    assert results["protocol"] == {"sampler": "ddim", "steps": 50}
    assert results["reference"]["dataset"] == "mnist" and results["reference"]["n"] == 40
    assert (tmp_path / "out" / "results.md").is_file()
    assert created[0].calls == 2  # reference + samples
    args = parse(argv)
    args.handler(args)
    assert created[1].calls == 1  # reference statistics came from the cache


def test_evaluate_command_bad_metric(tmp_path):
    s = save_samples(tmp_path / "q.npz", np.zeros((4, 28, 28), np.uint8))
    args = parse(["--samples", s, "--metrics", "mse", "--out", str(tmp_path / "o")])
    with pytest.raises(DiffquantError, match="full-precision"):
        args.handler(args)
