"""Explanation quality: faithfulness (deletion/insertion), localisation against a mask, agreement, stability.

All maps are (H, W) arrays; masks are bool (H, W). `predict` maps uint8 images (N, H, W, 3) to
probabilities (N, K).
"""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np
from scipy.stats import spearmanr

from core.explain.base import EPS, baseline_image, upsample

Predict = Callable[[np.ndarray], np.ndarray]


def _order(attribution: np.ndarray, rng_seed: int = 0) -> np.ndarray:
    """Pixel indices, most supportive first (ties broken by a fixed random permutation)."""
    a = np.asarray(attribution, np.float64).ravel()
    tie = np.random.default_rng(rng_seed).random(a.size) * 1e-12
    return np.argsort(-(a + tie), kind="stable")


def perturbation_curve(predict: Predict, image: np.ndarray, attribution: np.ndarray, target: int,
                       mode: str = "deletion", steps: int = 20, baseline: str = "blur") -> tuple[np.ndarray, np.ndarray]:
    """Target probability as the top-ranked pixels are removed (deletion) or revealed (insertion).

    Returns (fractions (steps+1,), probabilities (steps+1,)). Deletion starts from the image and replaces
    pixels by the baseline; insertion starts from the baseline and restores image pixels.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError("mode must be 'deletion' or 'insertion'")
    h, w = image.shape[:2]
    attribution = upsample(np.asarray(attribution, np.float32), (h, w))
    base = baseline_image(image, baseline)
    order = _order(attribution)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    batch = np.empty((steps + 1, h, w, 3), np.uint8)
    flat_img, flat_base = image.reshape(-1, 3), base.reshape(-1, 3)
    for i, f in enumerate(fractions):
        k = int(round(f * h * w))
        cur = (flat_img if mode == "deletion" else flat_base).copy()
        cur[order[:k]] = (flat_base if mode == "deletion" else flat_img)[order[:k]]
        batch[i] = cur.reshape(h, w, 3)
    probs = np.asarray(predict(batch))[:, target]
    return fractions, probs


def auc(fractions: np.ndarray, values: np.ndarray) -> float:
    """Trapezoidal area under a curve sampled on [0, 1]."""
    return float(np.trapezoid(values, fractions))


def deletion_auc(predict: Predict, image, attribution, target, steps: int = 20, baseline: str = "blur") -> float:
    """Lower is better: a faithful map makes the probability fall fast."""
    return auc(*perturbation_curve(predict, image, attribution, target, "deletion", steps, baseline))


def insertion_auc(predict: Predict, image, attribution, target, steps: int = 20, baseline: str = "blur") -> float:
    """Higher is better: a faithful map makes the probability rise fast."""
    return auc(*perturbation_curve(predict, image, attribution, target, "insertion", steps, baseline))


def top_k_mask(attribution: np.ndarray, k_percent: float = 15.0) -> np.ndarray:
    """Bool mask of the top k% pixels by attribution (exactly round(k% * N) pixels)."""
    a = np.asarray(attribution, np.float64)
    n = int(round(a.size * k_percent / 100.0))
    out = np.zeros(a.size, bool)
    out[_order(a)[:n]] = True
    return out.reshape(a.shape)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def pointing_game(attribution: np.ndarray, mask: np.ndarray, tolerance: int = 0) -> float:
    """1.0 if the attribution's maximum falls inside the mask (dilated by `tolerance` px), else 0.0."""
    mask = _fit_mask(mask, attribution.shape)
    if tolerance > 0:
        k = 2 * tolerance + 1
        mask = cv2.dilate(mask.astype(np.uint8), np.ones((k, k), np.uint8)) > 0
    y, x = np.unravel_index(int(np.argmax(attribution)), attribution.shape)
    return float(mask[y, x])


def energy_in_mask(attribution: np.ndarray, mask: np.ndarray) -> float:
    """Share of the positive attribution mass inside the mask (Score-CAM's energy pointing game), in [0, 1]."""
    mask = _fit_mask(mask, attribution.shape)
    pos = np.maximum(np.asarray(attribution, np.float64), 0)
    total = pos.sum()
    return float(pos[mask].sum() / total) if total > 0 else 0.0


def mask_iou(attribution: np.ndarray, mask: np.ndarray, k_percent: float = 15.0) -> float:
    """IoU between the top-k% region and the mask."""
    return iou(top_k_mask(attribution, k_percent), _fit_mask(mask, attribution.shape))


def agreement(a: np.ndarray, b: np.ndarray, k_percent: float = 15.0, size: int = 64) -> dict:
    """Agreement of two maps: IoU of their top-k% regions and Spearman rank correlation (on size x size)."""
    ra = upsample(np.asarray(a, np.float32), (size, size))
    rb = upsample(np.asarray(b, np.float32), (size, size))
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        rho = 0.0
    else:
        rho = float(spearmanr(ra.ravel(), rb.ravel()).statistic)
    return {"iou_top": iou(top_k_mask(ra, k_percent), top_k_mask(rb, k_percent)), "spearman": rho}


def seed_stability(attributions: Sequence[np.ndarray]) -> dict:
    """Spread over N runs with different seeds, on the *signed* attributions (evidence for and against).

    Each map is scaled by its largest absolute value into [-1, 1]; std_map is the per-pixel std across runs and
    stability = 1 - mean std, in [0, 1] (1 = identical maps; the std of values in [-1, 1] is at most 1). Maps
    that are empty (all zero) carry no evidence: then stability is None and `empty_maps` counts them, so an
    empty explanation is never reported as perfectly stable.
    """
    maps = np.stack([np.nan_to_num(np.asarray(a, np.float64)) for a in attributions])
    scale = np.abs(maps).reshape(len(maps), -1).max(axis=1)
    empty = int((scale <= EPS).sum())
    maps = maps / np.maximum(scale, EPS)[:, None, None]
    std = maps.std(axis=0)
    mean_std = float(std.mean())
    return {"std_map": std.astype(np.float32), "mean_std": mean_std, "empty_maps": empty,
            "stability": None if empty else float(1 - mean_std)}


def _fit_mask(mask: np.ndarray, shape) -> np.ndarray:
    mask = np.asarray(mask, bool)
    if mask.shape != tuple(shape):
        mask = cv2.resize(mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    return mask
