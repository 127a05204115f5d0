"""Reference sets for FID, sFID and precision/recall beyond the two MNIST data sets.

``--reference`` names one of three things:
- a data set diffquant knows (``fashion-mnist``, ``mnist``): statistics from its IDX files;
- a folder of image files (PNG, JPEG, BMP, WebP; RGB or grey, any size): read with PIL, brought
  to the size of the first image where they differ (bilinear, recorded in the statistics),
  statistics cached under the diffquant cache keyed by the files' names, sizes and mtimes and by
  the feature extractor;
- a statistics file written by ``diffquant evaluate --save-reference-stats STEM``
  (``STEM.safetensors`` + ``STEM.json``), refused when it was made with another extractor.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from diffquant.errors import DiffquantError

DATASETS = ("fashion-mnist", "mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise DiffquantError(f"reference folder {folder} holds {len(files)} image files "
                             f"({', '.join(IMAGE_SUFFIXES)}); need at least 2")
    return files


def load_image_folder(folder: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """uint8 images [N, C, H, W] of every image file under ``folder`` and a description."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    files = image_files(folder)
    arrays, modes, resized = [], set(), 0
    size = None
    for path in files:
        try:
            with Image.open(path) as im:
                im = im.convert("L" if im.mode in ("L", "LA", "1", "I;16", "I") else "RGB")
                modes.add(im.mode)
                if len(modes) > 1:
                    raise DiffquantError(f"reference folder {folder} mixes grey and colour images ({path.name}); "
                                         "use one kind")
                if size is None:
                    size = im.size
                elif im.size != size:
                    im = im.resize(size, Image.BILINEAR)
                    resized += 1
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DiffquantError(f"cannot read reference image {path} ({exc})") from None
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    images = np.ascontiguousarray(np.stack(arrays))
    info = {"folder": str(folder.resolve()), "files": len(files), "mode": modes.pop(),
            "size": [int(size[1]), int(size[0])], "resized_to_first": resized}
    return images, info


def folder_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for path in image_files(folder):
        st = path.stat()
        h.update(f"{path.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def resolve_reference(spec: str, *, split: str = "test", n: int | None = None, extractor=None,
                      data_dir=None, subset_seed: int | None = None, spatial: bool = True,
                      batch_size: int = 50, device="cpu", progress: bool = True, cache: bool = True):
    """:class:`~diffquant.eval.fid.ReferenceStats` for ``spec`` (see the module docstring)."""
    from diffquant.eval.fid import ReferenceStats, reference_stats, select_subset, stats_from_images
    from diffquant.paths import cache_dir

    if spec in DATASETS:
        return reference_stats(spec, split, n, extractor=extractor, data_dir=data_dir, subset_seed=subset_seed,
                               spatial=spatial, batch_size=batch_size, device=device, progress=progress,
                               cache=cache)
    path = Path(spec).expanduser()
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    if stem.with_suffix(".json").is_file() and stem.with_suffix(".safetensors").is_file():
        ref = ReferenceStats.load(stem)
        theirs = ref.meta.get("extractor")
        if extractor is not None and theirs is not None and theirs != extractor.identity():
            raise DiffquantError(f"reference statistics {stem} were made with another feature extractor "
                                 "(weights or resize mode); recompute them with --save-reference-stats")
        if spatial and ref.spatial is None:
            raise DiffquantError(f"reference statistics {stem} hold no spatial statistics: sFID needs them "
                                 "(pass --metrics without sfid, or recompute them)")
        return ref
    if path.is_dir():
        key = hashlib.sha256(f"{folder_fingerprint(path)}|{extractor.identity() if extractor else ''}|"
                             f"{n}|{subset_seed}".encode()).hexdigest()[:16]
        cached = cache_dir() / "refstats" / f"folder-{key}"
        if cache and cached.with_suffix(".json").is_file():
            try:
                ref = ReferenceStats.load(cached)
                if ref.spatial is not None or not spatial:
                    return ref
            except DiffquantError:
                pass
        images, info = load_image_folder(path)
        idx = select_subset(images.shape[0], n, subset_seed)
        ref = stats_from_images(images[idx], extractor, spatial=spatial, batch_size=batch_size, device=device,
                                progress=progress, meta={"reference": info, "n": int(idx.size), "key": key})
        if cache:
            ref.save(cached)
        return ref
    raise DiffquantError(f"--reference {spec!r} is neither {' nor '.join(DATASETS)}, nor a folder of images, "
                         "nor a statistics file (STEM.json + STEM.safetensors)")
