"""Tiny end-to-end trains on the real BreakHis 200X and IDC copies (skip without ../shared)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import train
from core.checkpoints import load_classifier, read_csv
from tests.conftest import BREAKHIS_200X, IDC, needs_shared

TINY = ["--backbone", "simple_cnn", "--weights", "none", "--head-epochs", "1", "--fine-tune-epochs", "0",
        "--head-units", "8", "--batch-size", "16", "--quiet"]


def _patients_by_split(bundle):
    rows = read_csv(bundle / "split.csv")
    return rows, {s: {r["group"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}


@needs_shared
@pytest.mark.slow
def test_breakhis_200x_tiny_train_keeps_patients_apart(tmp_path):
    rc = train.main(["--dataset", "breakhis", "--data-dir", str(BREAKHIS_200X), "--magnification", "200",
                     "--limit", "80", "--input-size", "32", "--stain-standardise", "--name", "bh",
                     "--out-dir", str(tmp_path), *TINY])
    assert rc == 0
    rows, by = _patients_by_split(tmp_path / "bh")
    assert all(by.values()) and not (by["train"] & by["val"] or by["train"] & by["test"] or by["val"] & by["test"])
    assert all(g.startswith("14-") and g[3:].isdigit() for g in set().union(*by.values()))  # slide letters dropped
    meta = json.loads((tmp_path / "bh" / "metadata.json").read_text())
    assert meta["dataset"]["magnification"] == 200 and meta["class_names"] == ["benign", "malignant"]
    assert meta["preprocessing"]["stain_standardise"]
    clf = load_classifier(tmp_path / "bh")
    assert clf.model.get_layer("stain_standardise").target_mean  # in the graph, so every explainer sees it
    assert clf.predict_proba(np.zeros((224, 224, 3), np.uint8)).shape == (1, 2)


@needs_shared
@pytest.mark.slow
def test_idc_tiny_train_keeps_patients_apart_and_positions(tmp_path):
    rc = train.main(["--dataset", "idc", "--data-dir", str(IDC), "--limit", "300", "--input-size", "50",
                     "--name", "idc", "--out-dir", str(tmp_path), *TINY])
    assert rc == 0
    rows, by = _patients_by_split(tmp_path / "idc")
    assert all(by.values()) and not (by["train"] & by["val"] or by["train"] & by["test"] or by["val"] & by["test"])
    assert len(rows) == 300 and all(r["x"].isdigit() and r["y"].isdigit() for r in rows)
    assert all(f"_x{r['x']}_y{r['y']}_class" in r["path"] and r["path"].startswith(r["group"] + "/") for r in rows)
    meta = json.loads((tmp_path / "idc" / "metadata.json").read_text())
    assert meta["class_names"] == ["non_idc", "idc"] and meta["input_size"] == 50
    clf = load_classifier(tmp_path / "idc")  # a larger field is read as a grid of 50 px patches
    assert clf.patches is not None and clf.patches.patch_size == 50
    field = np.random.default_rng(0).integers(0, 255, (100, 150, 3)).astype(np.uint8)
    tiles = clf.predict_proba([field[y:y + 50, x:x + 50] for y in (0, 50) for x in (0, 50, 100)])
    assert np.allclose(clf.predict_proba(field)[0], tiles.mean(0), atol=1e-5)
