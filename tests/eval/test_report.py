import json

import numpy as np
import pytest
import torch

from diffquant.errors import DiffquantError
from diffquant.eval.fid import stats_from_images
from diffquant.eval.report import ALL_METRICS, environment_record, evaluate_images, write_results
from conftest import FakeExtractor


class FirstPixelClassifier(torch.nn.Module):
    def forward(self, x):
        return torch.stack([-x[:, 0, 0, 0], x[:, 0, 0, 0]], dim=1)


@pytest.fixture
def setup():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    fake = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    ext = FakeExtractor()
    reference = stats_from_images(real, ext, progress=False, meta={"dataset": "toy", "split": "test"})
    return real, fake, ext, reference


def test_evaluate_all_metrics(setup):
    real, fake, ext, reference = setup
    labels = (fake[:, 0, 0] > 127).astype(np.int64)
    fp = fake.copy()
    fp[:, :, :14] = 0
    protocol = {"sampler": "ddim", "steps": 50, "eta": 0.0, "seed": 1}
    r = evaluate_images(fake, labels, reference=reference, extractor=ext, classifier=FirstPixelClassifier(),
                        fp_images=fp, metrics=ALL_METRICS, protocol=protocol, progress=False, fd_method="eigh")
    assert list(r["metrics"]) == list(ALL_METRICS)
    assert ext.calls == 2  # one pass for the reference, one for fid+sfid+precision+recall together
    assert r["metrics"]["accuracy"] == 1.0
    assert r["metrics"]["fid"] > 0 and r["metrics"]["sfid"] > 0
    assert 0 <= r["metrics"]["precision"] <= 1 and 0 <= r["metrics"]["recall"] <= 1
    expected_mse = np.mean((fake.astype(float) - fp.astype(float)) ** 2)
    assert r["metrics"]["mse"] == pytest.approx(expected_mse)
    assert r["protocol"] == protocol
    assert r["n_samples"] == 30 and r["reference"]["n"] == 40 and r["reference"]["dataset"] == "toy"
    assert r["extractor"] == ext.identity()
    assert r["settings"]["fd_method"] == "eigh" and r["settings"]["precision_recall_k"] == 3
    assert set(environment_record()) <= set(r["environment"])


def test_fid_of_reference_against_itself_is_zero(setup):
    real, _, ext, reference = setup
    r = evaluate_images(real, reference=reference, extractor=ext, metrics=("fid", "sfid", "precision", "recall"),
                        progress=False)
    assert abs(r["metrics"]["fid"]) < 1e-6 and abs(r["metrics"]["sfid"]) < 1e-6
    assert r["metrics"]["precision"] == 1.0 and r["metrics"]["recall"] == 1.0


def test_default_metrics_follow_inputs(setup):
    real, fake, ext, reference = setup
    r = evaluate_images(fake, reference=reference, extractor=ext, metrics=None, progress=False, fd_method="eigh")
    assert list(r["metrics"]) == ["fid", "sfid", "precision", "recall"]
    r = evaluate_images(fake, fp_images=fake, metrics=None, progress=False)
    assert r["metrics"] == {"mse": 0.0, "psnr": float("inf")}


def test_missing_inputs_and_mismatches_raise(setup):
    real, fake, ext, reference = setup
    with pytest.raises(DiffquantError, match="classifier"):
        evaluate_images(fake, reference=reference, extractor=ext, metrics=("accuracy",))
    with pytest.raises(DiffquantError, match="full-precision"):
        evaluate_images(fake, metrics=("psnr",))
    with pytest.raises(DiffquantError, match="reference"):
        evaluate_images(fake, metrics=("fid",))
    with pytest.raises(DiffquantError, match="unknown metric"):
        evaluate_images(fake, reference=reference, metrics=("is",))
    with pytest.raises(DiffquantError, match="different feature extractor"):
        evaluate_images(fake, reference=reference, extractor=FakeExtractor("other"), metrics=("fid",))
    with pytest.raises(DiffquantError, match="shape"):
        evaluate_images(np.zeros((4, 2, 28, 28), np.uint8), reference=reference, extractor=ext)


def test_write_results(setup, tmp_path):
    _, fake, ext, reference = setup
    r = evaluate_images(fake, reference=reference, extractor=ext, fp_images=fake, metrics=("fid", "mse", "psnr"),
                        protocol={"steps": 50}, progress=False)
    json_path, md_path = write_results(r, tmp_path / "out")
    back = json.loads(json_path.read_text())  # strict JSON: inf written as a string
    assert back["metrics"]["psnr"] == "inf"
    assert back["metrics"]["fid"] == pytest.approx(r["metrics"]["fid"])
    assert back["protocol"] == {"steps": 50}
    md = md_path.read_text()
    assert "| fid |" in md and "| psnr | inf |" in md and "| steps | 50 |" in md
    assert "toy / test / n=40" in md


def test_every_result_records_the_cpus_instruction_set(monkeypatch):
    """The same calibration gives other bits on another ISA: the record names the CPU's ISA
    features and the switches that cap them."""
    from pathlib import Path

    from diffquant.eval.report import cpu_record

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    record = environment_record()
    assert record["isa_switches"] == "ONEDNN_MAX_CPU_ISA=AVX2" and record["torch_threads"].isdigit()
    info = Path("/proc/cpuinfo")
    if info.is_file() and " avx2 " in info.read_text():
        assert "avx2" in cpu_record()["isa"].split()
