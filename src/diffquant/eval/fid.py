"""Fréchet distance, feature statistics, and cached reference statistics of real images.

Reference statistics are cached under ``cache_dir()/refstats/`` as safetensors (arrays) plus JSON
(provenance). The file name carries a hash of everything that moves the numbers (data set, split,
subset, the exact image bytes, resize mode, extractor weights, library versions), so a change of
any of them computes new statistics instead of reusing stale ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.linalg
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from diffquant._version import __version__
from diffquant.errors import DiffquantError
from diffquant.paths import cache_dir
from diffquant.jsonio import write_json

REFSTATS_FORMAT = 1
FD_EPS = 1e-6
IMAG_TOLERANCE = 1e-3


class FeatureExtractor(Protocol):
    """What reference statistics need from an extractor (``InceptionFeatures`` is one)."""

    def extract(self, images_uint8: Any, batch_size: int = ..., device: Any = ..., progress: bool = ...,
                spatial: bool = ...) -> dict[str, np.ndarray]: ...

    def identity(self) -> dict: ...


FD_METHODS = ("sqrtm", "eigh")


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    """Tr((S1 S2)^½) with scipy.linalg.sqrtm, as the reference FID tools compute it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on singular products; handled below
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.all(np.isfinite(covmean)):
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if imag > IMAG_TOLERANCE:
            raise DiffquantError(f"Fréchet distance: sqrtm has a large imaginary component ({imag:.3g})")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((S1 S2)^½) = Σ √λ(S1^½ S2 S1^½): two symmetric eigendecompositions, ~10x faster than sqrtm.

    S1 S2 is similar to the symmetric PSD matrix S1^½ S2 S1^½, so their eigenvalues agree;
    round-off negatives are clipped to zero.
    """
    w, v = scipy.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    lam = scipy.linalg.eigvalsh(root @ s2 @ root)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FD_EPS, method: str = "sqrtm") -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) between two Gaussians.

    ``method="sqrtm"`` (default, the reference tools' way): when the square root of S1 S2 is not
    finite (singular product, typical when N < dimension) eps·I is added to both covariances; a
    small imaginary part from round-off is dropped, a large one raises. ``method="eigh"`` gives the
    same trace through symmetric eigenvalues; at 2048-d it takes seconds instead of tens of seconds.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise DiffquantError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    else:
        raise DiffquantError(f"unknown Fréchet distance method {method!r}; use one of {FD_METHODS}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


@dataclass
class FeatureStats:
    """Mean and covariance of one feature space; ``features`` kept for precision/recall."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None

    @classmethod
    def from_features(cls, features: np.ndarray, keep_features: bool = False) -> "FeatureStats":
        f = np.asarray(features)
        if f.ndim != 2 or f.shape[0] < 2:
            raise DiffquantError(f"need features [N>=2, D] for statistics; got {f.shape}")
        f64 = f.astype(np.float64)
        return cls(mu=f64.mean(axis=0), sigma=np.cov(f64, rowvar=False), n=int(f.shape[0]),
                   features=f.astype(np.float32) if keep_features else None)

    def frechet_distance(self, other: "FeatureStats", eps: float = FD_EPS, method: str = "sqrtm") -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps, method)


@dataclass
class ReferenceStats:
    """Statistics of a real image set in every feature space the metrics use, with provenance."""

    pool: FeatureStats
    spatial: FeatureStats | None = None
    meta: dict = field(default_factory=dict)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"pool_mu": self.pool.mu, "pool_sigma": self.pool.sigma}
        if self.pool.features is not None:
            arrays["pool_features"] = self.pool.features
        if self.spatial is not None:
            arrays["spatial_mu"] = self.spatial.mu
            arrays["spatial_sigma"] = self.spatial.sigma
        return {k: np.ascontiguousarray(v) for k, v in arrays.items()}

    def save(self, path_stem: str | os.PathLike) -> None:
        """Write ``<stem>.safetensors`` and ``<stem>.json`` (JSON last: it marks a complete entry)."""
        stem = Path(path_stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.to_arrays(), str(stem.with_suffix(".safetensors")))
        meta = dict(self.meta, n=self.pool.n)
        write_json(stem.with_suffix(".json"), meta, sort_keys=True)

    @classmethod
    def load(cls, path_stem: str | os.PathLike) -> "ReferenceStats":
        stem = Path(path_stem)
        try:
            meta = json.loads(stem.with_suffix(".json").read_text())
            a = load_file(str(stem.with_suffix(".safetensors")))
            n = int(meta["n"])
            pool = FeatureStats(a["pool_mu"], a["pool_sigma"], n, a.get("pool_features"))
            spatial = FeatureStats(a["spatial_mu"], a["spatial_sigma"], n) if "spatial_mu" in a else None
        except KeyError as e:
            raise DiffquantError(f"reference statistics {stem} lack {e.args[0]!r}; not written by diffquant?") from None
        except (OSError, ValueError, TypeError, AttributeError, SafetensorError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DiffquantError(f"cannot read reference statistics {stem}: {first}") from None
        for name, stats in (("pool", pool), ("spatial", spatial)):
            if stats is not None and (stats.mu.ndim != 1 or stats.sigma.shape != (stats.mu.size,) * 2):
                raise DiffquantError(f"reference statistics {stem}: {name} mean {stats.mu.shape} and covariance "
                                     f"{stats.sigma.shape} do not fit together")
        return cls(pool=pool, spatial=spatial, meta=meta)


def library_versions() -> dict[str, str]:
    """Versions whose change can move features (resize kernels, BLAS paths)."""
    return {"diffquant": __version__, "torch": torch.__version__, "numpy": np.__version__}


def _hash_json(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def select_subset(num_images: int, n: int | None, subset_seed: int | None) -> np.ndarray:
    """Indices of the reference subset: the first ``n`` images, or a seeded random ``n`` of them."""
    n = num_images if n is None else n
    if not 2 <= n <= num_images:
        raise DiffquantError(f"reference size n={n} must be between 2 and the split size {num_images}")
    if subset_seed is None:
        return np.arange(n)
    return np.sort(np.random.default_rng(subset_seed).permutation(num_images)[:n])


def reference_stats(
    dataset_name: str,
    split: str = "test",
    n: int | None = None,
    *,
    extractor: FeatureExtractor | None = None,
    fid_weights: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    subset_seed: int | None = None,
    spatial: bool = True,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    progress: bool = True,
    cache: bool = True,
    cache_root: str | os.PathLike | None = None,
) -> ReferenceStats:
    """Statistics of ``n`` real images of ``dataset_name``/``split``, from the disk cache when valid.

    Pool features are kept (for precision/recall); spatial statistics are computed when
    ``spatial`` (sFID). A cached entry without spatial statistics is recomputed if they are asked.
    """
    from diffquant.data import load_split  # the data layer; imported here to keep eval import-light

    if extractor is None:
        from diffquant.eval.inception import InceptionFeatures

        extractor = InceptionFeatures(fid_weights, device=device)
    images, _ = load_split(dataset_name, split, data_dir)
    idx = select_subset(images.shape[0], n, subset_seed)
    subset = np.ascontiguousarray(images[idx])
    key_inputs = {
        "format": REFSTATS_FORMAT,
        "dataset": dataset_name,
        "split": "test" if split in ("test", "t10k") else split,
        "n": int(idx.size),
        "subset": "first-n" if subset_seed is None else f"random-seed-{subset_seed}",
        "images_sha256": hashlib.sha256(subset.tobytes()).hexdigest(),
        "extractor": extractor.identity(),
        "versions": library_versions(),
    }
    key = _hash_json(key_inputs)
    root = Path(cache_root) if cache_root else cache_dir() / "refstats"
    stem = root / f"{dataset_name}-{key_inputs['split']}-n{idx.size}-{key[:16]}"
    if cache and stem.with_suffix(".json").is_file():
        try:
            cached = ReferenceStats.load(stem)
        except (DiffquantError, KeyError):
            cached = None
        if cached is not None and cached.meta.get("key") == key and (cached.spatial is not None or not spatial):
            return cached
    feats = extractor.extract(subset, batch_size=batch_size, device=device, progress=progress, spatial=spatial)
    ref = ReferenceStats(
        pool=FeatureStats.from_features(feats["pool"], keep_features=True),
        spatial=FeatureStats.from_features(feats["spatial"]) if spatial else None,
        meta=dict(key_inputs, key=key),
    )
    if cache:
        ref.save(stem)
    return ref


def stats_from_features(feats: dict[str, np.ndarray], extractor_identity: dict, *, spatial: bool = True,
                        meta: dict | None = None) -> ReferenceStats:
    """Reference statistics from extracted features (pool features kept for precision/recall)."""
    return ReferenceStats(
        pool=FeatureStats.from_features(feats["pool"], keep_features=True),
        spatial=FeatureStats.from_features(feats["spatial"]) if spatial else None,
        meta=dict(meta or {}, extractor=extractor_identity),
    )


def stats_from_images(images_uint8: Any, extractor: FeatureExtractor, *, spatial: bool = True,
                      batch_size: int = 50, device: str | torch.device = "cpu", progress: bool = True,
                      meta: dict | None = None) -> ReferenceStats:
    """Statistics of any uint8 image set of one size, not cached (folders: :mod:`diffquant.eval.reference`)."""
    feats = extractor.extract(images_uint8, batch_size=batch_size, device=device, progress=progress, spatial=spatial)
    return stats_from_features(feats, extractor.identity(), spatial=spatial, meta=meta)
