"""Overlays of explanations on images (uint8 RGB in, uint8 RGB out)."""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from core.preprocessing import ensure_rgb_uint8

COLORMAPS = {"turbo": cv2.COLORMAP_TURBO, "jet": cv2.COLORMAP_JET, "inferno": cv2.COLORMAP_INFERNO,
             "viridis": cv2.COLORMAP_VIRIDIS}


def colorize(heatmap: np.ndarray, colormap: str = "turbo") -> np.ndarray:
    """[0, 1] map (H, W) -> uint8 RGB (H, W, 3) with an OpenCV colour map (0 = blue end, 1 = red end)."""
    h = np.clip(np.nan_to_num(heatmap), 0, 1)
    bgr = cv2.applyColorMap((h * 255).round().astype(np.uint8), COLORMAPS[colormap])
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, colormap: str = "turbo",
            only_positive_area: bool = False) -> np.ndarray:
    """Blend a [0, 1] heatmap over the image with opacity `alpha` in [0, 1]."""
    img = ensure_rgb_uint8(image)
    color = colorize(heatmap, colormap).astype(np.float32)
    a = float(np.clip(alpha, 0, 1))
    weight = a * (np.clip(heatmap, 0, 1)[..., None] if only_positive_area else 1.0)
    out = img.astype(np.float32) * (1 - weight) + color * weight
    return np.clip(out, 0, 255).round().astype(np.uint8)


def signed_overlay(image: np.ndarray, attribution: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """Green = supports the target, red = against it; intensity ∝ |attribution| / max |attribution|."""
    img = ensure_rgb_uint8(image).astype(np.float32)
    a = np.nan_to_num(np.asarray(attribution, np.float32))
    m = float(np.abs(a).max(initial=0.0))
    if m <= 0:
        return img.astype(np.uint8)
    a = a / m
    color = np.zeros_like(img)
    color[..., 1] = np.where(a > 0, 255, 0)
    color[..., 0] = np.where(a < 0, 255, 0)
    w = (alpha * np.abs(a))[..., None]
    return np.clip(img * (1 - w) + color * w, 0, 255).round().astype(np.uint8)


def boundaries(image: np.ndarray, segments: np.ndarray, color=(255, 255, 0),
               weights: Optional[dict] = None, top: int = 0) -> np.ndarray:
    """Superpixel outlines over the image; with `weights` and `top` > 0, only the top positive segments."""
    from skimage.segmentation import find_boundaries

    img = ensure_rgb_uint8(image).copy()
    seg = np.asarray(segments)
    if weights and top > 0:
        keep = [k for k, v in sorted(weights.items(), key=lambda kv: -kv[1]) if v > 0][:top]
        seg = np.where(np.isin(seg, keep), seg + 1, 0)
    edges = find_boundaries(seg, mode="inner")
    img[edges] = color
    return img


def mask_outline(image: np.ndarray, mask: np.ndarray, color=(0, 255, 255), thickness: int = 2) -> np.ndarray:
    """Draw the outline of a bool mask (H, W) on the image."""
    img = ensure_rgb_uint8(image).copy()
    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, tuple(int(c) for c in color), thickness)
    return img
