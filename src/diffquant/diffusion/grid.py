"""Image grids for quick visual checks of samples."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 images [N, H, W, C] into one [rows·(H+p)+p, nrow·(W+p)+p, C] uint8 array.

    ``nrow`` is the number of images per row (default: ceil(sqrt(N))).
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images shaped [N, H, W, C], got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("cannot make a grid of zero images")
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c),
                   pad_value, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_grid(path: str | os.PathLike, images: np.ndarray, nrow: int | None = None,
              padding: int = 2, pad_value: int = 0) -> Path:
    """Write :func:`make_grid` of ``images`` as a PNG (greyscale when C = 1)."""
    from PIL import Image

    grid = make_grid(images, nrow=nrow, padding=padding, pad_value=pad_value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).save(path)
    return path


def save_labelled_grid(path: str | os.PathLike, rows: list[tuple[str, np.ndarray]], padding: int = 2) -> Path:
    """One grid row per ``(label, images [N, H, W, C] uint8)``, the label written left of its row."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("no rows to draw")
    width = max(len(images) for _, images in rows)
    h, w, c = rows[0][1].shape[1:]
    label_w = 8 + 7 * max(len(label) for label, _ in rows)
    blank = np.zeros((h, w, c), dtype=np.uint8)
    tiles = np.stack([img for _, images in rows for img in list(images) + [blank] * (width - len(images))])
    grid = make_grid(tiles, nrow=width, padding=padding)
    if grid.shape[2] == 1:
        grid = np.repeat(grid, 3, axis=2)
    canvas = Image.new("RGB", (grid.shape[1] + label_w, grid.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (label, _) in enumerate(rows):
        draw.text((4, padding + i * (h + padding) + max(0, h // 2 - 6)), label, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
