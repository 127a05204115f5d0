"""Where diffquant looks for external assets (pretrained models, data sets, the FID Inception).

Nothing is ever downloaded: assets come from a directory given by the user, the environment
variable ``DIFFQUANT_ASSETS``, or a ``shared/assets`` folder next to the checkout.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_DIR = PACKAGE_DIR / "zoo" / "assets"


def assets_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """Return the first existing assets directory, or None when there is none.

    Order: ``explicit`` argument, ``$DIFFQUANT_ASSETS``, ``../shared/assets`` relative to the
    current directory, then relative to the source checkout this package lives in.
    """
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    env = os.environ.get("DIFFQUANT_ASSETS")
    if env:
        candidates.append(Path(env))
    candidates.append(Path.cwd().parent / "shared" / "assets")
    candidates.append(Path.cwd() / "shared" / "assets")
    # src/diffquant -> repo root -> its parent
    repo_root = PACKAGE_DIR.parent.parent
    candidates.append(repo_root.parent / "shared" / "assets")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return None


def cache_dir() -> Path:
    """A writable cache for reference statistics and calibration data (``$DIFFQUANT_CACHE``)."""
    env = os.environ.get("DIFFQUANT_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "diffquant"
    path.mkdir(parents=True, exist_ok=True)
    return path
