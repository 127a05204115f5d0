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


#: labels are drawn at this many pixels of text height
LABEL_FONT_PX = 18
#: tiles are scaled up (nearest neighbour) to at least this many pixels so a person can see them
MIN_TILE_PX = 96


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def save_labelled_grid(path: str | os.PathLike, rows: list[tuple[str, np.ndarray]], padding: int = 2,
                       column_labels: list[str] | None = None, min_tile: int = MIN_TILE_PX,
                       font_px: int = LABEL_FONT_PX) -> Path:
    """One grid row per ``(label, images [N, H, W, C] uint8)``, the label left of its row and
    ``column_labels`` (e.g. class names) above the columns; small images are scaled up by an
    integer factor to at least ``min_tile`` pixels and the text is ``font_px`` high."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("no rows to draw")
    width = max(len(images) for _, images in rows)
    h, w, c = rows[0][1].shape[1:]
    factor = max(1, -(-min_tile // max(h, w)))
    h, w = h * factor, w * factor
    blank = np.zeros((h, w, c), dtype=np.uint8)
    scaled = [[np.repeat(np.repeat(img, factor, axis=0), factor, axis=1) for img in images] for _, images in rows]
    tiles = np.stack([img for imgs in scaled for img in imgs + [blank] * (width - len(imgs))])
    grid = make_grid(tiles, nrow=width, padding=padding, pad_value=255)
    if grid.shape[2] == 1:
        grid = np.repeat(grid, 3, axis=2)
    font = _font(font_px)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = lambda text: measure.textbbox((0, 0), text, font=font)[2]  # noqa: E731
    label_w = 12 + max(text_w(label) for label, _ in rows)
    header_h = 0
    if column_labels:
        # a label wider than its column wraps at "/" or spaces onto a second line
        header_h = 2 * (font_px + 4) + 4
    canvas = Image.new("RGB", (grid.shape[1] + label_w, grid.shape[0] + header_h), (255, 255, 255))
    canvas.paste(Image.fromarray(grid), (label_w, header_h))
    draw = ImageDraw.Draw(canvas)
    for i, (label, _) in enumerate(rows):
        draw.text((6, header_h + padding + i * (h + padding) + max(0, (h - font_px) // 2)), label, fill=(0, 0, 0),
                  font=font)
    for j, label in enumerate((column_labels or [])[:width]):
        x0 = label_w + padding + j * (w + padding)
        lines = [label]
        if text_w(label) > w:
            cut = max(label.rfind("/", 0, len(label) // 2 + 3), label.rfind(" ", 0, len(label) // 2 + 3))
            lines = [label[:cut + 1].strip(), label[cut + 1:].strip()] if cut > 0 else [label]
        for k, line in enumerate(lines):
            draw.text((x0 + max(0, (w - text_w(line)) // 2), 2 + k * (font_px + 4)), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
