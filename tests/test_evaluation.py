"""Metric values checked against hand-computed ones."""
from __future__ import annotations

import numpy as np
import pytest

from core.checkpoints import apply_temperature
from core.evaluation import (classification_metrics, curves, expected_calibration_error, fit_temperature,
                             per_class_table, reliability_curve)

Y = np.array([0, 0, 0, 1, 1, 2])
P = np.array([[0.8, 0.1, 0.1],   # 0 -> 0
              [0.6, 0.3, 0.1],   # 0 -> 0
              [0.2, 0.7, 0.1],   # 0 -> 1
              [0.1, 0.8, 0.1],   # 1 -> 1
              [0.5, 0.4, 0.1],   # 1 -> 0
              [0.1, 0.1, 0.8]])  # 2 -> 2
NAMES = ("benign", "malignant", "normal")


def test_per_class_counts_by_hand():
    rows = per_class_table(Y, P.argmax(1), NAMES)
    b, m, n = rows
    assert (b["tp"], b["fn"], b["fp"], b["tn"]) == (2, 1, 1, 2)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 1, 3)
    assert (n["tp"], n["fn"], n["fp"], n["tn"]) == (1, 0, 0, 5)
    assert b["precision"] == pytest.approx(2 / 3) and b["recall"] == pytest.approx(2 / 3)
    assert b["specificity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(0.5) and n["f1"] == pytest.approx(1.0)


def test_headline_metrics_by_hand():
    m = classification_metrics(Y, P, NAMES, n_boot=200)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    # kappa: po = 4/6; pe = (3*3 + 2*2 + 1*1) / 36 = 14/36
    assert m["cohen_kappa"] == pytest.approx((4 / 6 - 14 / 36) / (1 - 14 / 36))
    assert m["macro_avg"]["recall"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["recall_malignant"] == pytest.approx(0.5)
    lo, hi = m["accuracy_ci95"]
    assert 0 <= lo <= m["accuracy"] <= hi <= 1
    assert 0 < m["roc_auc_macro"] <= 1 and m["pr_auc_macro"] > 0


def test_binary_auc_by_hand():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.9])  # pairs (pos > neg): (0.4>0.1), (0.9>0.1), (0.9>0.6) -> 3/4
    m = classification_metrics(y, np.stack([1 - p1, p1], 1), ("benign", "malignant"), n_boot=50)
    assert m["roc_auc_macro"] == pytest.approx(0.75)


def test_ece_by_hand():
    y = np.array([0, 1, 0, 0])
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    # bin (0.8, 0.9]: conf 0.9, acc 0.5 -> 0.4 * 2/4; bin (0.5, 0.6]: conf 0.6, acc 1.0 -> 0.4 * 2/4
    assert expected_calibration_error(y, p) == pytest.approx(0.4)
    rc = reliability_curve(y, p)
    assert rc["count"] == [2, 2] and rc["accuracy"] == [1.0, 0.5]
    perfect = np.eye(2)[y]
    assert expected_calibration_error(y, perfect) == pytest.approx(0.0)


def test_temperature_scaling_reduces_overconfidence():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    correct = rng.random(400) < 0.7  # a 70%-accurate model that always says 0.99
    pred = np.where(correct, y, 1 - y)
    p = np.where(pred[:, None] == np.arange(2), 0.99, 0.01)
    t = fit_temperature(y, p)
    assert t > 1.5
    assert expected_calibration_error(y, apply_temperature(p, t)) < expected_calibration_error(y, p) / 3
    np.testing.assert_allclose(apply_temperature(p, 1.0), p.astype(np.float32))


def test_curves_per_class():
    c = curves(Y, P, NAMES)
    assert set(c) == set(NAMES)
    assert c["normal"]["auc"] == pytest.approx(1.0)
