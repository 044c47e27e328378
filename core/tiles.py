"""Where in the tissue: per-tile probability maps of large H&E fields, and slide mosaics of IDC patches.

A patch model (trained on crops, `Classifier.patches`) or a patch-set model (IDC: one 50 px patch per
image, `core.data.loaders.PATCH_SIDES`, loaded with a 50 px grid) reads a large field tile by tile; `tile_probability_map`
returns each tile's calibrated probabilities and paints them back onto the field. `slide_mosaic` lays a
patient's patches out at their recorded slide positions, with the ground truth beside the model's map,
the picture pathology teachers use for invasive ductal carcinoma.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import cv2
import numpy as np

from core.patches import grid_boxes


@dataclass(frozen=True)
class TileMap:
    """Per-tile probabilities of one image.

    probs: float32 (T, K) calibrated, one row per tile; boxes: (y, x) origins in image pixels;
    tile: tile side in image pixels; shape: the image's (H, W); class_names: the K classes.
    """

    probs: np.ndarray
    boxes: tuple[tuple[int, int], ...]
    tile: int
    shape: tuple[int, int]
    class_names: tuple[str, ...]

    def pixel_map(self, target: int) -> np.ndarray:
        """float32 (H, W) in [0, 1]: P(target) of the tiles covering each pixel (overlaps averaged);
        NaN where no tile lies (never, for a grid over the whole image)."""
        total = np.zeros(self.shape, np.float64)
        count = np.zeros(self.shape, np.float64)
        for p, (y, x) in zip(self.probs[:, target], self.boxes):
            total[y:y + self.tile, x:x + self.tile] += p
            count[y:y + self.tile, x:x + self.tile] += 1
        with np.errstate(invalid="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)

    def share_above(self, target: int, threshold: float = 0.5) -> float:
        """Fraction of the classified tiles whose P(target) exceeds `threshold`, in [0, 1]."""
        p = self.probs[:, target]
        p = p[~np.isnan(p)]
        return float((p > threshold).mean()) if len(p) else 0.0


def tile_side(clf) -> Optional[int]:
    """Tile side in original pixels for a model that reads fields tile by tile (patch models, and IDC-style
    patch-set models, which `load_classifier` gives a patch grid of their patch side), else None."""
    patches = getattr(clf, "patches", None)
    return int(patches.patch_size) if patches is not None else None


def tile_probability_map(clf, image: np.ndarray, stride: Optional[int] = None, min_tissue: float = 0.0,
                         progress: Optional[Callable[[float], None]] = None) -> Optional[TileMap]:
    """Classify every tile of a uint8 (H, W, 3) field on a regular grid (`stride` original pixels, default
    the tile side) -> TileMap, or None when the model does not read tiles or the image is one tile or less.

    Tiles with less tissue than `min_tissue` (near-white glass) are not classified: probability NaN.
    """
    from core.patches import tissue_fraction

    side = tile_side(clf)
    h, w = image.shape[:2]
    if side is None or (h <= side and w <= side):
        return None
    boxes = tuple(grid_boxes((h, w), side, stride or side))
    crops = [image[y:y + side, x:x + side] for y, x in boxes]
    keep = np.array([min_tissue <= 0 or tissue_fraction(c) >= min_tissue for c in crops])
    probs = np.full((len(crops), clf.num_classes), np.nan, np.float32)
    todo = np.flatnonzero(keep)
    for i in range(0, len(todo), 256):  # each crop is one tile of the model's grid
        part = todo[i:i + 256]
        probs[part] = clf.predict_proba([crops[j] for j in part])
        if progress:
            progress(min(1.0, (i + len(part)) / max(len(todo), 1)))
    return TileMap(probs, boxes, side, (h, w), tuple(clf.class_names))


@dataclass(frozen=True)
class Mosaic:
    """A patient's patches laid out at their slide positions.

    image: uint8 (H, W, 3), white where the set has no patch; truth: int8 (H, W), -1 where no patch,
    else the patch's label; boxes: (y, x) of each patch in `image`; labels: (N,) true labels;
    scale: mosaic pixels per slide pixel; paths: the patch files in `boxes` order.
    """

    image: np.ndarray
    truth: np.ndarray
    boxes: tuple[tuple[int, int], ...]
    side: int
    labels: np.ndarray
    scale: float
    paths: tuple[str, ...]

    def paint(self, values: Sequence[float]) -> np.ndarray:
        """float32 (H, W): each patch's value painted over its box, NaN elsewhere."""
        out = np.full(self.truth.shape, np.nan, np.float32)
        for v, (y, x) in zip(values, self.boxes):
            out[y:y + self.side, x:x + self.side] = v
        return out


def slide_mosaic(samples: Sequence, read: Callable, patch_side: int = 50, scale: float = 1.0,
                 margin: int = 1) -> Mosaic:
    """Lay patches with `position` (x, y in slide pixels) out as one region of their slide.

    samples: core.data.Sample rows of one patient; read(sample) -> uint8 (h, w, 3) patch. The region spans
    the patches' bounding box; `scale` < 1 shrinks it (each patch then covers round(patch_side * scale) px).
    """
    samples = [s for s in samples if s.position is not None]
    if not samples:
        raise ValueError("slide_mosaic needs samples with a slide position (IDC patches)")
    xs = np.array([s.position[0] for s in samples])
    ys = np.array([s.position[1] for s in samples])
    x0, y0 = xs.min(), ys.min()
    side = max(2, int(round(patch_side * scale)))
    width = int(round((xs.max() - x0) * scale)) + side + 2 * margin
    height = int(round((ys.max() - y0) * scale)) + side + 2 * margin
    image = np.full((height, width, 3), 255, np.uint8)
    truth = np.full((height, width), -1, np.int8)
    boxes = []
    for s, x, y in zip(samples, xs, ys):
        py, px = int(round((y - y0) * scale)) + margin, int(round((x - x0) * scale)) + margin
        patch = read(s)[:patch_side, :patch_side]
        image[py:py + side, px:px + side] = cv2.resize(patch, (side, side), interpolation=cv2.INTER_AREA)
        truth[py:py + side, px:px + side] = s.label
        boxes.append((py, px))
    return Mosaic(image, truth, tuple(boxes), side, np.array([s.label for s in samples]), scale,
                  tuple(s.path for s in samples))


def colour_map(values: np.ndarray, background: int = 245) -> np.ndarray:
    """float (H, W) in [0, 1] with NaN for 'nothing here' -> uint8 RGB (H, W, 3): blue (0) to red (1)."""
    v = np.nan_to_num(np.clip(values, 0, 1), nan=0.0)
    rgb = cv2.applyColorMap((v * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1].copy()
    rgb[np.isnan(values)] = background
    return rgb
