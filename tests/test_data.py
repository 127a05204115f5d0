"""IDX reading and data set discovery."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from diffquant import data
from diffquant.errors import DiffquantError
from diffquant.paths import assets_dir


def test_idx_roundtrip_uint8(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    data.write_idx(path, arr)
    back = data.read_idx(path)
    assert back.dtype == np.uint8 and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, arr)


def test_idx_header_is_big_endian(tmp_path):
    # 1-D labels with 300 entries: the count needs two bytes, so endianness matters
    raw = bytes([0, 0, 8, 1]) + (300).to_bytes(4, "big") + bytes(range(256)) + bytes(44)
    path = tmp_path / "labels.gz"
    with gzip.open(path, "wb") as f:
        f.write(raw)
    out = data.read_idx(path)
    assert out.shape == (300,) and out[255] == 255 and out[299] == 0


def test_idx_rejects_bad_files():
    with pytest.raises(DiffquantError, match="magic"):
        data.parse_idx(b"\x01\x02\x08\x01")
    with pytest.raises(DiffquantError, match="truncated"):
        data.parse_idx(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(3))


def _fake_dataset(root, n=5):
    root.mkdir(parents=True)
    imgs = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    for split in ("train", "test"):
        img_name, lbl_name = data.SPLIT_FILES[split]
        data.write_idx(root / img_name, imgs)
        data.write_idx(root / lbl_name, labels)
    return imgs, labels


def test_load_split_from_data_dir(tmp_path):
    imgs, labels = _fake_dataset(tmp_path / "fm")
    x, y = data.load_split("fashion-mnist", "test", data_dir=tmp_path / "fm")
    assert x.dtype == np.uint8 and y.dtype == np.int64
    np.testing.assert_array_equal(x, imgs)
    np.testing.assert_array_equal(y, labels)
    t = data.to_model_range(x)
    assert t.shape == (5, 1, 28, 28) and float(t.min()) >= -1 and float(t.max()) <= 1


def test_missing_split_file_is_clear(tmp_path):
    _fake_dataset(tmp_path / "fm")
    (tmp_path / "fm" / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DiffquantError, match="train-images-idx3-ubyte.gz is missing"):
        data.load_split("fashion-mnist", "train", data_dir=tmp_path / "fm")


def test_missing_dataset_names_all_places(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFQUANT_ASSETS", str(tmp_path / "assets"))
    (tmp_path / "assets").mkdir()
    with pytest.raises(DiffquantError) as info:
        data.find_dataset("no-such-set", data_dir=tmp_path / "given")
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "given") in msg
    assert "/usr/share/datasets/no-such-set" in msg
    assert str((tmp_path / "assets").resolve() / "datasets" / "no-such-set") in msg


def _real_dir():
    root = assets_dir()
    path = root / "datasets" / "fashion-mnist" if root else None
    if path is None or not (path / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST assets not available")
    return path


def test_real_fashion_mnist_test_split():
    path = _real_dir()
    x, y = data.load_split("fashion-mnist", "test", data_dir=path)
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10000,) and set(np.unique(y)) == set(range(10))
    assert np.bincount(y).tolist() == [1000] * 10
    assert data.find_dataset("fashion-mnist", path) == path
