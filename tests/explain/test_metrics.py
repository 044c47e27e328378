"""Metrics on hand-built cases with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from core.explain.metrics import (agreement, deletion_auc, energy_in_mask, insertion_auc, mask_iou,
                                  perturbation_curve, pointing_game, seed_stability, top_k_mask)


def quadrant_model(images):
    """p(class 1) = mean brightness of the top-left 4x4 quadrant / 255."""
    p1 = np.asarray(images, np.float64)[:, :4, :4].mean(axis=(1, 2, 3)) / 255.0
    return np.stack([1 - p1, p1], axis=1)


IMG = np.full((8, 8, 3), 255, np.uint8)
GOOD = np.zeros((8, 8))
GOOD[:4, :4] = 1.0  # ranks the quadrant first
BAD = 1.0 - GOOD


def test_perfect_deletion_and_insertion():
    f, p = perturbation_curve(quadrant_model, IMG, GOOD, 1, "deletion", steps=4, baseline="black")
    np.testing.assert_allclose(f, [0, .25, .5, .75, 1])
    np.testing.assert_allclose(p, [1, 0, 0, 0, 0])
    assert deletion_auc(quadrant_model, IMG, GOOD, 1, steps=4, baseline="black") == pytest.approx(0.125)
    assert deletion_auc(quadrant_model, IMG, BAD, 1, steps=4, baseline="black") == pytest.approx(0.875)
    assert insertion_auc(quadrant_model, IMG, GOOD, 1, steps=4, baseline="black") == pytest.approx(0.875)
    assert insertion_auc(quadrant_model, IMG, BAD, 1, steps=4, baseline="black") == pytest.approx(0.125)


def test_mask_fully_hit_and_missed():
    mask = GOOD.astype(bool)
    assert pointing_game(GOOD, mask) == 1.0 and pointing_game(BAD, mask) == 0.0
    assert energy_in_mask(GOOD, mask) == pytest.approx(1.0) and energy_in_mask(BAD, mask) == pytest.approx(0.0)
    assert mask_iou(GOOD, mask, k_percent=25) == pytest.approx(1.0)
    assert mask_iou(BAD, mask, k_percent=25) == pytest.approx(0.0)
    assert energy_in_mask(np.zeros((8, 8)), mask) == 0.0
    # a mask at another resolution is resized to the map
    big = np.kron(mask, np.ones((2, 2))).astype(bool)
    assert pointing_game(GOOD, big) == 1.0
    near = np.zeros((8, 8), bool)
    near[:4, 4] = True  # just right of the quadrant; max of GOOD is at (0, 0)
    assert pointing_game(GOOD, near) == 0.0 and pointing_game(GOOD, near, tolerance=4) == 1.0


def test_top_k_exact_count():
    a = np.random.default_rng(0).random((10, 10))
    m = top_k_mask(a, 15)
    assert m.sum() == 15 and a[m].min() >= a[~m].max()


def test_agreement_identical_and_inverted():
    a = np.random.default_rng(1).random((16, 16))
    same = agreement(a, a, size=16)
    assert same["iou_top"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    inv = agreement(a, -a, size=16)
    assert inv["iou_top"] == 0.0 and inv["spearman"] == pytest.approx(-1.0)


def test_seed_stability():
    a = np.random.default_rng(2).random((8, 8))
    s = seed_stability([a, a, a])
    assert s["mean_std"] == pytest.approx(0.0, abs=1e-6) and s["stability"] == pytest.approx(1.0)
    one, zero = np.zeros((8, 8)), np.zeros((8, 8))
    one[0, 0] = 1
    zero[7, 7] = 1
    s2 = seed_stability([one, zero])
    assert s2["mean_std"] == pytest.approx(2 * 0.5 / 64) and s2["std_map"].shape == (8, 8)
    assert s2["stability"] == pytest.approx(1 - 1 / 64)
    # Signed: the same positive part but different negative evidence is not 'identical'.
    b, c = a - 0.5, a - 0.5
    c[b < 0] *= 3
    assert seed_stability([b, c])["stability"] < 1.0
    # Empty maps (LIME finding nothing) are never reported as perfectly stable.
    blank = seed_stability([np.zeros((8, 8)), np.zeros((8, 8))])
    assert blank["stability"] is None and blank["empty_maps"] == 2
