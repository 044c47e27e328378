"""Patches of large histology images: tissue-aware random crops for training, a regular grid for prediction.

A patch checkpoint sees `patch_size` x `patch_size` crops of the original image, each resized to the
model's `input_size`. At prediction time the whole image is scaled by input_size / patch_size (the
"work image"), covered by a regular grid of input_size tiles (edges included), and the tile
probabilities are averaged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from core.preprocessing import resize

#: A pixel whose darkest channel is above this is near-white background (glass, not tissue).
WHITE_LEVEL = 215


@dataclass(frozen=True)
class PatchConfig:
    """`patch_size`: crop side in original pixels; `stride`: grid step in original pixels (default: patch_size)."""

    patch_size: int
    input_size: int
    stride: Optional[int] = None
    min_tissue: float = 0.5
    scale_jitter: float = 0.0  # training crops: side = patch_size * 2**U(-j, j) (magnification robustness)

    @property
    def scale(self) -> float:
        return self.input_size / self.patch_size

    @property
    def work_stride(self) -> int:
        """Grid step in work-image pixels."""
        return max(1, int(round((self.stride or self.patch_size) * self.scale)))

    @classmethod
    def from_json(cls, d: dict, input_size: int) -> "PatchConfig":
        """Inverse of `to_json` (the `patches` entry of a bundle's metadata.json)."""
        return cls(int(d["patch_size"]), int(input_size), int(d.get("stride") or d["patch_size"]),
                   float(d.get("min_tissue", 0.5)), float(d.get("scale_jitter", 0.0)))

    def to_json(self) -> dict:
        return {"patch_size": self.patch_size, "stride": self.stride or self.patch_size,
                "input_size": self.input_size, "min_tissue": self.min_tissue, "scale_jitter": self.scale_jitter,
                "prediction": "mean of tile probabilities over a regular grid covering the whole image"}


def tissue_fraction(patch: np.ndarray) -> float:
    """Fraction of pixels in a uint8 RGB patch that are not near-white background, in [0, 1]."""
    return float((patch.min(axis=-1) <= WHITE_LEVEL).mean())


def work_image(image: np.ndarray, cfg: PatchConfig) -> np.ndarray:
    """uint8 (H, W, 3) -> the image scaled by input_size / patch_size, each side at least input_size."""
    h, w = image.shape[:2]
    scale = max(cfg.scale, cfg.input_size / min(h, w))
    size = (max(cfg.input_size, int(round(h * scale))), max(cfg.input_size, int(round(w * scale))))
    return resize(image, size)


def grid_positions(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one side: every `stride`, plus a last tile flush with the edge."""
    if length <= tile:
        return [0]
    pos = list(range(0, length - tile + 1, stride))
    if pos[-1] + tile < length:
        pos.append(length - tile)
    return pos


def grid_boxes(shape: tuple[int, int], tile: int, stride: int) -> list[tuple[int, int]]:
    """(y, x) origins of tile x tile boxes covering an (H, W) image."""
    return [(y, x) for y in grid_positions(shape[0], tile, stride) for x in grid_positions(shape[1], tile, stride)]


def tiles(work: np.ndarray, tile: int, stride: int) -> np.ndarray:
    """Work images (N, H, W, C) or one (H, W, C) -> tiles (N * T, tile, tile, C), image-major."""
    batch = work if work.ndim == 4 else work[None]
    boxes = grid_boxes(batch.shape[1:3], tile, stride)
    return np.stack([im[y:y + tile, x:x + tile] for im in batch for y, x in boxes])


def random_patches(image: np.ndarray, n: int, cfg: PatchConfig, rng: np.random.Generator,
                   tries: int = 20) -> np.ndarray:
    """n tissue-aware random crops of patch_size (scaled to input_size) -> uint8 (n, S, S, 3).

    Each crop is the first of up to `tries` random positions with at least `min_tissue` tissue,
    else the most tissue-rich position tried.
    """
    h, w = image.shape[:2]
    out = np.zeros((n, cfg.input_size, cfg.input_size, 3), np.uint8)
    for i in range(n):
        side = cfg.patch_size * 2.0 ** rng.uniform(-cfg.scale_jitter, cfg.scale_jitter) if cfg.scale_jitter else \
            cfg.patch_size
        p = int(max(8, min(round(side), h, w)))
        best, best_frac = None, -1.0
        for _ in range(tries):
            y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            crop = image[y:y + p, x:x + p]
            frac = tissue_fraction(crop)
            if frac > best_frac:
                best, best_frac = crop, frac
            if frac >= cfg.min_tissue:
                break
        out[i] = cv2.resize(best, (cfg.input_size, cfg.input_size),
                            interpolation=cv2.INTER_AREA if p > cfg.input_size else cv2.INTER_LINEAR)
    return out


def blend_window(tile: int) -> np.ndarray:
    """(tile, tile) weights, 1 at the centre falling smoothly towards (never to) 0 at the edges."""
    w = np.hanning(tile + 2)[1:-1]
    return np.outer(w, w).astype(np.float32)


def stitch(maps: np.ndarray, shape: tuple[int, int], tile: int, stride: int,
           weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-tile maps (T, h, w) in grid order -> one (H, W) float32 map.

    Overlaps are averaged, uniformly or with `weights` (tile, tile), e.g. `blend_window` on a half-tile
    grid, which hides the seams between tiles.
    """
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.float64)
    w = np.ones((tile, tile), np.float64) if weights is None else np.asarray(weights, np.float64)
    for m, (y, x) in zip(maps, grid_boxes(shape, tile, stride)):
        m = np.asarray(m, np.float32)
        if m.shape != (tile, tile):
            m = cv2.resize(m, (tile, tile), interpolation=cv2.INTER_LINEAR)
        total[y:y + tile, x:x + tile] += w * m
        count[y:y + tile, x:x + tile] += w
    return (total / np.maximum(count, 1e-12)).astype(np.float32)
