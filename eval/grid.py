"""Captioned sample grids (PNG), the picture people look at first."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from rewards.shapes import to_uint8_images as to_uint8_hwc


def to_uint8_videos(videos) -> np.ndarray:
    """Float videos [N, 3, T, H, W] in [0, 1] (tensor or array) -> uint8 (N, T, H, W, 3)."""
    from rewards.base import frames_as_images

    videos = torch.as_tensor(videos)
    if videos.ndim != 5 or videos.shape[1] != 3:
        raise ValueError(f"videos must be [N, 3, T, H, W], got shape {tuple(videos.shape)}")
    images, frames = frames_as_images(videos)
    return to_uint8_hwc(images).reshape(videos.shape[0], frames, *videos.shape[3:], 3)


def to_uint8_images(images) -> list[np.ndarray]:
    """Float [N, 3, H, W] in [0, 1] (tensor or array) or uint8 HWC list -> list of uint8 HWC.
    Float videos [N, 3, T, H, W] become filmstrips (frames left to right), so every grid and
    report shows video samples too."""
    if isinstance(images, np.ndarray) and images.ndim in (4, 5) and images.shape[1] in (1, 3):
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor) and images.ndim == 5:
        from eval.shapes_video import filmstrip

        return [filmstrip(clip) for clip in to_uint8_videos(images)]
    if isinstance(images, torch.Tensor):
        images = to_uint8_hwc(images)
    return [np.asarray(im) for im in images]


def caption_grid(images, captions: Sequence[str] | None = None, ncol: int | None = None, scale: int = 2,
                 caption_width: int = 22) -> Image.Image:
    """One PIL image: samples in a grid, each upscaled `scale`x with its caption underneath."""
    arrays = to_uint8_images(images)
    if not arrays:
        raise ValueError("no images to put in a grid")
    n = len(arrays)
    ncol = ncol or min(8, n)
    nrow = (n + ncol - 1) // ncol
    h, w = arrays[0].shape[:2]
    cell_w, img_h = w * scale, h * scale
    font = ImageFont.load_default()
    wrapped = [textwrap.wrap(c, caption_width)[:3] if c else [] for c in (captions or [""] * n)]
    text_h = 12 * max((len(lines) for lines in wrapped), default=0) + 4
    pad = 4
    grid = Image.new("RGB", (ncol * (cell_w + pad) + pad, nrow * (img_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (array, lines) in enumerate(zip(arrays, wrapped)):
        x = pad + (i % ncol) * (cell_w + pad)
        y = pad + (i // ncol) * (img_h + text_h + pad)
        grid.paste(Image.fromarray(array).resize((cell_w, img_h), Image.Resampling.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + img_h + 2 + 12 * j), line, fill=(20, 20, 20), font=font)
    return grid


def save_caption_grid(images, captions, path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    caption_grid(images, captions, **kwargs).save(path)
    return path
