"""Reference sets for FID, sFID and precision/recall beyond the two MNIST data sets.

``--reference`` names one of three things:

- a data set diffquant knows (``fashion-mnist``, ``mnist``): statistics from its IDX files;
- a folder of image files (PNG, JPEG, BMP, WebP; 8-bit grey or RGB, any size, sizes may differ):
  read with PIL (alpha dropped, palette images as RGB), each image resized by the feature
  extractor exactly as samples are (images of one size go through it together); statistics
  cached under the diffquant cache, keyed by the files' names, sizes and mtimes, the subset,
  the extractor and the library versions;
- a statistics file written by ``diffquant evaluate --save-reference-stats STEM``
  (``STEM.safetensors`` + ``STEM.json``; name it as ``STEM``, ``STEM.json`` or
  ``STEM.safetensors``), refused when it was made with another feature extractor.

Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from diffquant.errors import DiffquantError

DATASETS = ("fashion-mnist", "mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
STATS_SUFFIXES = (".json", ".safetensors")
GREY_MODES = ("1", "L", "LA", "La")
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # more than 8 bits: converting would clip
FOLDER_FORMAT = 2  # bump when folder statistics change meaning (invalidates cached entries)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted); at least two."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise DiffquantError(f"reference folder {folder} holds {len(files)} image files "
                             f"({', '.join(IMAGE_SUFFIXES)}); need at least 2")
    return files


def read_image(path: Path) -> np.ndarray:
    """One image file as uint8 [1, H, W] (grey) or [3, H, W] (colour); one-line errors."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in WIDE_MODES:
                raise DiffquantError(f"reference image {path} has {im.mode} pixels (more than 8 bits); "
                                     "save it as 8-bit grey or RGB")
            a = np.asarray(im.convert("L" if im.mode in GREY_MODES else "RGB"), dtype=np.uint8)
    except DiffquantError:
        raise
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise DiffquantError(f"cannot read reference image {path} ({_first_line(exc)})") from None
    if min(a.shape[:2]) < 2:
        raise DiffquantError(f"reference image {path} is {a.shape[1]}x{a.shape[0]} pixels; need at least 2x2")
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def read_image_folder(folder: str | os.PathLike) -> tuple[list[np.ndarray], dict]:
    """Every image under ``folder`` as uint8 [C, H, W] (one C for all), and a description."""
    folder = Path(folder)
    files = image_files(folder)
    images = []
    for path in files:
        a = read_image(path)
        if images and a.shape[0] != images[0].shape[0]:
            kinds = {1: "grey", 3: "colour"}
            raise DiffquantError(f"reference folder {folder} mixes grey and colour images ({files[0].name} is "
                                 f"{kinds[images[0].shape[0]]}, {path.name} {kinds[a.shape[0]]}); use one kind")
        images.append(a)
    sizes = sorted({tuple(int(d) for d in a.shape[1:]) for a in images})
    info = {"folder": str(folder.resolve()), "files": len(files), "mode": "L" if images[0].shape[0] == 1 else "RGB",
            "sizes": [list(s) for s in sizes]}
    return images, info


def load_image_folder(folder: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """uint8 images [N, C, H, W] of a folder whose images all have one size, and a description."""
    images, info = read_image_folder(folder)
    if len(info["sizes"]) > 1:
        raise DiffquantError(f"reference folder {folder} holds images of {len(info['sizes'])} sizes; "
                             "use read_image_folder and features_by_size for mixed sizes")
    return np.ascontiguousarray(np.stack(images)), info


def features_by_size(images: list[np.ndarray], extractor, *, spatial: bool, batch_size: int = 50,
                     device: Any = "cpu", progress: bool = True) -> dict[str, np.ndarray]:
    """Extractor features of images of possibly different sizes, in input order.

    Images of one size are stacked and extracted together, so each is resized once, by the
    extractor, as samples are.
    """
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(images):
        groups.setdefault(a.shape, []).append(i)
    out: dict[str, np.ndarray] = {}
    for idx in groups.values():
        feats = extractor.extract(np.stack([images[i] for i in idx]), batch_size=batch_size, device=device,
                                  progress=progress, spatial=spatial)
        for key, value in feats.items():
            if key not in out:
                out[key] = np.empty((len(images), *value.shape[1:]), value.dtype)
            out[key][idx] = value
    return out


def folder_fingerprint(folder: Path) -> str:
    """Hash of the image files' relative names, sizes and modification times."""
    h = hashlib.sha256()
    for path in image_files(folder):
        st = path.stat()
        h.update(f"{path.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def stats_file_stem(path: Path) -> Path | None:
    """The ``STEM`` of a statistics file named as STEM, STEM.json or STEM.safetensors; None if neither exists."""
    stem = path.with_suffix("") if path.suffix in STATS_SUFFIXES else path
    present = [s for s in STATS_SUFFIXES if stem.with_suffix(s).is_file()]
    if not present or (path.is_dir() and path == stem):
        return None
    if len(present) < len(STATS_SUFFIXES):
        missing = stem.with_suffix(next(s for s in STATS_SUFFIXES if s not in present))
        raise DiffquantError(f"reference statistics {stem}: {missing.name} is missing (a statistics file is "
                             "STEM.json + STEM.safetensors, as --save-reference-stats writes them)")
    return stem


def load_stats_file(stem: Path, extractor=None, spatial: bool = True):
    """Saved :class:`~diffquant.eval.fid.ReferenceStats`, checked against ``extractor`` and ``spatial``."""
    from diffquant.eval.fid import ReferenceStats

    ref = ReferenceStats.load(stem)
    theirs = ref.meta.get("extractor")
    if extractor is not None and theirs != extractor.identity():
        what = "no feature extractor" if theirs is None else f"another feature extractor ({theirs.get('name')})"
        raise DiffquantError(f"reference statistics {stem} were made with {what}, not the one in use "
                             "(weights or resize mode); recompute them with --save-reference-stats")
    if spatial and ref.spatial is None:
        raise DiffquantError(f"reference statistics {stem} hold no spatial statistics: sFID needs them "
                             "(pass --metrics without sfid, or recompute them)")
    ref.meta["stats_file"] = str(stem.resolve())
    return ref


def folder_reference(folder: Path, extractor, *, n: int | None = None, subset_seed: int | None = None,
                     spatial: bool = True, batch_size: int = 50, device: Any = "cpu", progress: bool = True,
                     cache: bool = True):
    """Statistics of the images in ``folder``, from the diffquant cache when they are still valid."""
    from diffquant.eval.fid import ReferenceStats, library_versions, select_subset, stats_from_features
    from diffquant.paths import cache_dir

    if extractor is None:
        raise DiffquantError("statistics of a reference folder need a feature extractor")
    key_inputs = {"format": FOLDER_FORMAT, "files": folder_fingerprint(folder), "n": n, "subset_seed": subset_seed,
                  "extractor": extractor.identity(), "versions": library_versions()}
    key = hashlib.sha256(repr(sorted(key_inputs.items())).encode()).hexdigest()
    stem = cache_dir() / "refstats" / f"folder-{folder.name or 'root'}-{key[:16]}"
    if cache and stem.with_suffix(".json").is_file():
        try:
            cached = ReferenceStats.load(stem)
        except DiffquantError:
            cached = None
        if cached is not None and cached.meta.get("key") == key and (cached.spatial is not None or not spatial):
            return cached
    images, info = read_image_folder(folder)
    idx = select_subset(len(images), n, subset_seed)
    chosen = [images[i] for i in idx]
    feats = features_by_size(chosen, extractor, spatial=spatial, batch_size=batch_size, device=device,
                             progress=progress)
    meta = {"dataset": "folder", **info, "n": int(idx.size),
            "subset": "all" if n is None else ("first-n" if subset_seed is None else f"random-seed-{subset_seed}"),
            "key": key, "versions": key_inputs["versions"]}
    ref = stats_from_features(feats, extractor.identity(), spatial=spatial, meta=meta)
    if cache:
        ref.save(stem)
    return ref


def resolve_reference(spec: str, *, split: str = "test", n: int | None = None, extractor=None,
                      data_dir=None, subset_seed: int | None = None, spatial: bool = True,
                      batch_size: int = 50, device="cpu", progress: bool = True, cache: bool = True):
    """:class:`~diffquant.eval.fid.ReferenceStats` for ``spec`` (see the module docstring)."""
    from diffquant.eval.fid import reference_stats

    if spec in DATASETS:
        return reference_stats(spec, split, n, extractor=extractor, data_dir=data_dir, subset_seed=subset_seed,
                               spatial=spatial, batch_size=batch_size, device=device, progress=progress,
                               cache=cache)
    path = Path(spec).expanduser()
    stem = stats_file_stem(path)
    if stem is not None:
        if n is not None or subset_seed is not None:
            raise DiffquantError(f"--ref-n / --ref-seed do not apply to the statistics file {stem}: they were "
                                 "fixed when it was saved")
        return load_stats_file(stem, extractor, spatial)
    if path.is_dir():
        return folder_reference(path, extractor, n=n, subset_seed=subset_seed, spatial=spatial,
                                batch_size=batch_size, device=device, progress=progress, cache=cache)
    raise DiffquantError(f"--reference {spec!r} is neither {' nor '.join(DATASETS)}, nor a folder of images, "
                         "nor a statistics file (STEM.json + STEM.safetensors)")
