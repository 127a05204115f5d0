"""Readers for the MNIST / Fashion-MNIST IDX files (gzip), without torchvision.

IDX layout: two zero bytes, a type byte (0x08 = uint8), a byte with the number of
dimensions, then one big-endian uint32 per dimension, then the raw data.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from diffquant.errors import DiffquantError
from diffquant.paths import assets_dir

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
ALL_FILES = tuple(f for pair in SPLIT_FILES.values() for f in pair)
DEBIAN_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(raw: bytes) -> np.ndarray:
    """Parse the (already decompressed) bytes of an IDX file into a numpy array."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DiffquantError("not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise DiffquantError(f"unsupported IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=dtype, offset=header)
    if data.size != int(np.prod(shape)):
        raise DiffquantError(f"IDX file truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape).astype(np.dtype(dtype).newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file; gzip-compressed when the name ends in ``.gz``."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return parse_idx(f.read())


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip IDX file (used by tests and for small fixtures)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def _candidate_dirs(name: str, data_dir: str | os.PathLike | None) -> list[tuple[str, Path | None]]:
    """(description, path) of every place searched, in order; path None if unavailable."""
    places: list[tuple[str, Path | None]] = []
    places.append(("--data-dir", Path(data_dir) if data_dir else None))
    places.append(("Debian package dir", DEBIAN_DIRS.get(name, Path("/usr/share/datasets") / name)))
    assets = assets_dir()
    places.append(("assets dir", assets / "datasets" / name if assets else None))
    return places


def find_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Return the first directory holding any of the IDX files of data set ``name``.

    Searched: (1) ``data_dir``, (2) ``/usr/share/datasets/<name>`` (Debian's fashion-mnist
    package), (3) ``<assets>/datasets/<name>``.
    """
    places = _candidate_dirs(name, data_dir)
    for _, path in places:
        if path is not None and path.is_dir() and any((path / f).is_file() for f in ALL_FILES):
            return path
    described = "; ".join(
        f"{desc} {path if path is not None else '(not given)' if desc == '--data-dir' else '(no assets dir found; set DIFFQUANT_ASSETS)'}"
        for desc, path in places
    )
    raise DiffquantError(f"data set {name!r} not found; searched: {described}")


def load_split(
    name: str = "fashion-mnist", split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load ``split`` ('train' or 't10k'/'test') as (uint8 images [N,28,28], int64 labels [N])."""
    key = "test" if split in ("test", "t10k") else split
    if key not in SPLIT_FILES:
        raise DiffquantError(f"unknown split {split!r}; use 'train' or 'test'")
    root = find_dataset(name, data_dir)
    img_file, lbl_file = (root / f for f in SPLIT_FILES[key])
    for f in (img_file, lbl_file):
        if not f.is_file():
            raise DiffquantError(f"data set {name!r} split {key!r} is incomplete: {f} is missing")
    images = read_idx(img_file)
    labels = read_idx(lbl_file).astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise DiffquantError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return images.astype(np.uint8), labels


def to_model_range(images: np.ndarray):
    """uint8 [N,28,28] -> float32 torch tensor [N,1,28,28] in [-1, 1]."""
    import torch

    return torch.from_numpy(images).float().div_(127.5).sub_(1.0).unsqueeze(1)
