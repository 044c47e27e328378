"""Patch training and grid-averaged whole-image prediction (core.patches, Classifier, explainers, train.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import train
from core.checkpoints import Classifier, apply_temperature, load_classifier, read_csv
from core.patches import (PatchConfig, blend_window, grid_boxes, grid_positions, random_patches, stitch, tiles, tissue_fraction,
                          work_image)
from tests.conftest import BREAKHIS, UCSB, needs_shared, write_large_tree


def test_grid_covers_the_image_edges_included():
    assert grid_positions(100, 32, 32) == [0, 32, 64, 68]
    assert grid_positions(20, 32, 32) == [0]
    boxes = grid_boxes((70, 100), 32, 32)
    covered = np.zeros((70, 100), bool)
    for y, x in boxes:
        covered[y:y + 32, x:x + 32] = True
    assert covered.all() and len(boxes) == 3 * 4


def test_tiles_and_stitch_are_inverse():
    rng = np.random.default_rng(0)
    img = rng.random((1, 70, 100, 1)).astype(np.float32)
    t = tiles(img, 32, 32)
    assert t.shape == (12, 32, 32, 1)
    np.testing.assert_allclose(stitch(t[..., 0], (70, 100), 32, 32), img[0, ..., 0], atol=1e-6)
    const = stitch(np.full((12, 8, 8), 3.0), (70, 100), 32, 32)  # maps at feature resolution are upsampled
    np.testing.assert_allclose(const, 3.0)


def test_blended_stitching_has_no_seams():
    shape, tile, stride = (64, 96), 32, 16
    n = len(grid_boxes(shape, tile, stride))
    np.testing.assert_allclose(stitch(np.full((n, tile, tile), 2.0), shape, tile, stride, blend_window(tile)), 2.0,
                               rtol=1e-5)
    maps = np.stack([np.full((tile, tile), float(i % 2)) for i in range(n)])  # alternating flat tiles
    hard = stitch(maps, shape, tile, stride)
    soft = stitch(maps, shape, tile, stride, blend_window(tile))
    step = lambda m: max(np.abs(np.diff(m, axis=0)).max(), np.abs(np.diff(m, axis=1)).max())  # noqa: E731
    assert step(hard) >= 0.5 and step(soft) < 0.25


def test_work_image_scale_and_minimum_side():
    cfg = PatchConfig(patch_size=64, input_size=32)
    assert work_image(np.zeros((256, 200, 3), np.uint8), cfg).shape == (128, 100, 3)
    assert work_image(np.zeros((40, 200, 3), np.uint8), cfg).shape[0] == 32  # never smaller than a tile


def test_random_patches_avoid_background():
    img = np.full((200, 200, 3), 245, np.uint8)  # white glass
    img[:, :60] = (150, 60, 160)  # a strip of tissue: 30% of the image
    cfg = PatchConfig(patch_size=50, input_size=16)
    p = random_patches(img, 12, cfg, np.random.default_rng(1))
    assert p.shape == (12, 16, 16, 3)
    assert min(tissue_fraction(x) for x in p) >= 0.5
    assert tissue_fraction(img) < 0.5


@pytest.fixture(scope="module")
def patch_classifier():
    import keras

    from core.models import ModelConfig, build_model

    keras.utils.set_random_seed(7)
    model, _ = build_model(ModelConfig(backbone="simple_cnn", num_classes=2, input_size=32, head_units=(8,),
                                       dropout=0.0, l2=0.0))
    return Classifier(model=model, class_names=("benign", "malignant"), input_size=32, metadata={},
                      temperature=1.5, patches=PatchConfig(patch_size=64, input_size=32))


def test_predict_proba_is_the_calibrated_mean_of_grid_tiles(patch_classifier):
    clf = patch_classifier
    img = np.random.default_rng(2).integers(0, 255, (150, 210, 3)).astype(np.uint8)
    work = clf.work_image(img)
    assert work.shape[:2] == (75, 105)
    t = tiles(work, 32, 32)
    assert len(t) == 3 * 4
    expected = apply_temperature(clf.model(t.astype(np.float32), training=False).numpy().mean(0, keepdims=True), 1.5)
    np.testing.assert_allclose(clf.predict_proba(img), expected, atol=1e-5)
    np.testing.assert_allclose(clf.predict_work(work[None]), expected, atol=1e-5)
    other = np.random.default_rng(3).integers(0, 255, (90, 90, 3)).astype(np.uint8)
    both = clf.predict_proba([img, other])  # images of different sizes in one call
    assert both.shape == (2, 2)
    np.testing.assert_allclose(both[1], clf.predict_proba(other)[0], atol=1e-5)
    assert clf.features([img, other]).shape[0] == 2


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "lime", "shap", "occlusion", "integrated_gradients"])
def test_explainers_cover_the_whole_image_of_a_patch_model(patch_classifier, method):
    from core.explain import explain

    params = {"lime": {"num_samples": 40, "n_segments": 20}, "shap": {"max_evals": 60},
              "occlusion": {"window": 16, "stride": 16}, "integrated_gradients": {"steps": 4}}.get(method, {})
    img = np.random.default_rng(4).integers(0, 255, (150, 210, 3)).astype(np.uint8)
    img[20:60, 120:200] = 30
    e = explain(patch_classifier, img, method, **params)
    assert e.attribution.shape == (150, 210) and np.isfinite(e.attribution).all()
    np.testing.assert_allclose(e.probabilities, patch_classifier.predict_proba(img)[0], atol=1e-5)
    # The map is not confined to one tile: the left and right halves both carry attribution
    a = np.abs(e.attribution)
    assert a[:, :105].max() > 0 and a[:, 105:].max() > 0
    if method.startswith("gradcam"):
        assert e.extras["n_tiles"] == 4 * 6  # a half-tile grid over the 75 x 105 work image


def test_tiled_occlusion_equals_occluding_the_whole_image(patch_classifier, monkeypatch):
    """The patch-model shortcut (recompute only the touched tiles) gives the naive answer, with fewer passes."""
    from core.explain import explain
    from core.explain.occlusion import OcclusionExplainer

    img = np.random.default_rng(6).integers(0, 255, (150, 210, 3)).astype(np.uint8)
    passes = {"n": 0}
    orig = patch_classifier.forward

    def counting(batch):
        passes["n"] += len(batch)
        return orig(batch)

    monkeypatch.setattr(patch_classifier, "forward", counting)
    fast = explain(patch_classifier, img, "occlusion", window=16, stride=12)
    n_fast = passes["n"]
    passes["n"] = 0
    monkeypatch.setattr(OcclusionExplainer, "tiled", lambda self: False)
    naive = explain(patch_classifier, img, "occlusion", window=16, stride=12)
    np.testing.assert_allclose(fast.attribution, naive.attribution, atol=1e-5)
    assert n_fast < passes["n"] / 2
    np.testing.assert_allclose(fast.perturbed_range, naive.perturbed_range, atol=1e-5)  # same images, same range


@pytest.mark.slow
def test_patch_training_end_to_end(tmp_path):
    data = write_large_tree(tmp_path / "data")
    out = tmp_path / "ck"
    argv = ["--dataset", "folder", "--data-dir", str(data), "--backbone", "simple_cnn", "--weights", "none",
            "--input-size", "24", "--patches", "3", "--patch-size", "48", "--head-epochs", "1",
            "--fine-tune-epochs", "1", "--batch-size", "8", "--cv-folds", "2", "--out-dir", str(out),
            "--name", "p", "--quiet"]
    assert train.main(argv) == 0
    meta = json.loads((out / "p" / "metadata.json").read_text())
    assert meta["patches"]["patch_size"] == 48 and meta["patches"]["train_patches_per_image_per_epoch"] == 3
    cv = meta["cross_validation"]
    assert len(cv["folds"]) == 2 and sum(f["n_test"] for f in cv["folds"]) == 12
    assert cv["accuracy_min"] <= cv["accuracy_mean"] <= cv["accuracy_max"]
    for f in cv["folds"]:  # no group in two parts of a fold
        assert f["n_train"] + f["n_val"] + f["n_test"] == 12
    clf = load_classifier(out / "p")
    assert clf.patches is not None and clf.patches.patch_size == 48
    rows = [r for r in read_csv(out / "p" / "predictions.csv") if r["split"] == "test"]
    from core.preprocessing import load_image

    p = clf.predict_proba([load_image(data / r["path"]) for r in rows])
    np.testing.assert_allclose(p[:, 1], [float(r["p_malignant"]) for r in rows], atol=1e-4)


@needs_shared
@pytest.mark.slow
def test_ucsb_patch_training_with_external_breakhis_check(tmp_path):
    """Real UCSB images, 1 epoch, tiny CNN: the group split holds, BreakHis predictions are recorded."""
    out = tmp_path / "ck"
    argv = ["--dataset", "ucsb", "--data-dir", str(UCSB.parent), "--backbone", "simple_cnn", "--weights", "none",
            "--input-size", "32", "--patches", "2", "--patch-size", "256", "--head-epochs", "1",
            "--fine-tune-epochs", "0", "--external", f"breakhis={BREAKHIS.parent}", "--out-dir", str(out),
            "--name", "u", "--quiet"]
    assert train.main(argv) == 0
    split = read_csv(out / "u" / "split.csv")
    groups = {s: {r["group"] for r in split if r["split"] == s} for s in ("train", "val", "test")}
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"] or groups["val"] & groups["test"])
    ext = json.loads((out / "u" / "metadata.json").read_text())["external_checks"][0]
    assert ext["n_images"] == 12 and "EXTERNAL" in ext["label"]
    assert ext["n_correct"] == sum(r["correct"] for r in ext["images"])
    preds = read_csv(out / "u" / "predictions.csv")
    assert sum(r["split"] == "external:breakhis" for r in preds) == 12
