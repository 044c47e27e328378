"""Lesion segmentation at inference: post-processing, the lesion's size and shape, and the Segmenter contract."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from core.checkpoints import CheckpointError, list_bundles, load_classifier, load_segmenter
from core.segmentation import describe_lesion, largest_region, lesion_measurements, orientation, postprocess


def test_postprocess_threshold_and_largest_region():
    p = np.zeros((20, 20), np.float32)
    p[2:5, 2:5] = 0.9  # 9 px
    p[10:16, 10:16] = 0.6  # 36 px
    assert postprocess(p, 0.5).sum() == 45
    assert postprocess(p, 0.7).sum() == 9
    only = postprocess(p, 0.5, largest_region_only=True)
    assert only.sum() == 36 and only[12, 12] and not only[3, 3]
    assert not largest_region(np.zeros((4, 4), bool)).any()


def test_lesion_measurements_orientation_and_margin():
    wide = np.zeros((100, 200), np.uint8)
    cv2.ellipse(wide, (100, 50), (60, 20), 0, 0, 360, 1, -1)
    m = lesion_measurements(wide.astype(bool), mm_per_pixel=0.1)
    assert m["orientation"] == "wider than tall" and m["width_px"] == 121 and m["depth_px"] == 41
    assert m["area_px"] == int(wide.sum()) and m["area_fraction"] == pytest.approx(wide.mean())
    assert m["width_mm"] == pytest.approx(12.1) and m["margin_irregularity"] < 0.05
    tall = np.ascontiguousarray(wide.T)
    assert lesion_measurements(tall.astype(bool))["orientation"] == "taller than wide"
    round_ = np.zeros((200, 200), np.uint8)  # 295 x 298 px was called taller than wide: extents 1% apart
    cv2.ellipse(round_, (100, 100), (60, 62), 0, 0, 360, 1, -1)
    assert lesion_measurements(round_.astype(bool))["orientation"] == "about as wide as tall"
    assert [orientation(100, d) for d in (90, 91, 110, 111)] == ["wider than tall", "about as wide as tall",
                                                               "about as wide as tall", "taller than wide"]
    star = np.zeros((200, 200), np.uint8)  # spiculated: a star has a much larger convex hull than area
    pts = [(100 + (80 if k % 2 == 0 else 25) * np.cos(k * np.pi / 8), 100 + (80 if k % 2 == 0 else 25)
            * np.sin(k * np.pi / 8)) for k in range(16)]
    cv2.fillPoly(star, [np.array(pts, np.int32)], 1)
    assert lesion_measurements(star.astype(bool))["margin_irregularity"] > 0.3
    assert lesion_measurements(np.zeros((5, 5), bool)) is None
    assert describe_lesion(None) == "No lesion predicted in this image."
    assert "wider than tall" in describe_lesion(m) and "12.1 x 4.1 mm" in describe_lesion(m)


def test_segmenter_bundle_predicts_a_mask_of_the_input_shape(tiny_segmenter):
    seg = load_segmenter(tiny_segmenter)
    img = np.random.default_rng(0).integers(0, 255, (45, 70, 3)).astype(np.uint8)
    p = seg.predict_proba_map(img)
    assert p.shape == (45, 70) and p.dtype == np.float32 and 0.0 <= p.min() and p.max() <= 1.0
    mask = seg.predict_mask(img)
    assert mask.shape == (45, 70) and mask.dtype == bool
    assert np.array_equal(mask, postprocess(p, seg.threshold, seg.largest_region_only))
    grey = img[..., 0]  # ultrasound scans are often saved grey: the same map as their RGB form
    np.testing.assert_allclose(seg.predict_proba_map(grey), seg.predict_proba_map(np.dstack([grey] * 3)), atol=1e-6)
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        seg.predict_proba_map(img[..., :2])


def test_segmenter_and_classifier_bundles_are_kept_apart(tiny_segmenter, tiny_bundle):
    assert list_bundles(tiny_segmenter.parent, kind="segmenter") == [tiny_segmenter]
    assert list_bundles(tiny_segmenter.parent, kind="classifier") == []
    with pytest.raises(CheckpointError, match="classifier, not a lesion segmenter"):
        load_segmenter(tiny_bundle)
    with pytest.raises(CheckpointError):
        load_classifier(tiny_segmenter)  # two-class metadata vs a one-channel map: refused, not misused


def test_missed_lesions_counts_near_total_misses_of_one_split(tmp_path):
    from core.segmentation import MISSED_DICE, missed_lesions, read_missed_lesions

    rows = [{"split": "test", "dice": "0.05", "true_area": "0.1", "pred_area": "0.2"},  # missed: outlined elsewhere
            {"split": "test", "dice": "0.0", "true_area": "0.1", "pred_area": "0.0"},  # missed: nothing outlined
            {"split": "test", "dice": str(MISSED_DICE), "true_area": "0.1", "pred_area": "0.1"},  # found, barely
            {"split": "test", "dice": "0.9", "true_area": "0.1", "pred_area": "0.1"},
            {"split": "test", "dice": "", "true_area": "0.0", "pred_area": "0.0"},  # normal scan: no lesion to miss
            {"split": "val", "dice": "0.0", "true_area": "0.1", "pred_area": "0.3"}]
    m = missed_lesions(rows, "test")
    assert (m.lesions, m.missed, m.outlined_elsewhere) == (4, 2, 1)
    assert m.sentence() == ("It missed 2 of 4 test lesions almost entirely (Dice < 0.1), 1 of them by outlining "
                            "something else.")
    v = missed_lesions(rows, "val")
    assert (v.lesions, v.missed, v.outlined_elsewhere) == (1, 1, 1) and "of 1 validation lesions" in v.sentence()
    assert missed_lesions(rows[2:4], "test").sentence() == "It found all 2 test lesions (Dice ≥ 0.1 on each)."
    assert missed_lesions(rows, "train") is None

    (tmp_path / "predictions.csv").write_text("split,fold,path,class,group,dice,iou,true_area,pred_area\n"
                                              "test,,a.png,benign,a.png,0.02,0.01,0.1,0.05\n"
                                              "test,,b.png,benign,b.png,0.80,0.70,0.1,0.1\n")
    r = read_missed_lesions(tmp_path)
    assert (r.lesions, r.missed, r.outlined_elsewhere) == (2, 1, 1)
    assert read_missed_lesions(tmp_path / "nowhere") is None


def test_outline_on_negative_counts_what_outlines_meant_on_scans_called_normal(tmp_path):
    from core.segmentation import MISSED_DICE, lesion_caveat, outline_on_negative, read_outline_on_negative

    clf_rows = [{"path": p, "predicted": c} for p, c in
                [("n1", "normal"), ("n2", "normal"), ("n3", "normal"), ("m1", "normal"), ("b1", "normal"),
                 ("b2", "normal"), ("m2", "malignant"), ("b3", "benign")]]
    seg_rows = [{"path": "n1", "class": "normal", "dice": "", "true_area": "0", "pred_area": "0.02"},  # false outline
                {"path": "n2", "class": "normal", "dice": "", "true_area": "0", "pred_area": "0.01"},  # false outline
                {"path": "n3", "class": "normal", "dice": "", "true_area": "0", "pred_area": "0"},  # no outline
                {"path": "m1", "class": "malignant", "dice": "0.7", "true_area": "0.1", "pred_area": "0.1"},  # a cancer
                {"path": "b1", "class": "benign", "dice": str(MISSED_DICE), "true_area": "0.1", "pred_area": "0.1"},
                {"path": "b2", "class": "benign", "dice": "0.01", "true_area": "0.1", "pred_area": "0.1"},  # elsewhere
                {"path": "m2", "class": "malignant", "dice": "0.9", "true_area": "0.1", "pred_area": "0.1"},  # not normal
                {"path": "b3", "class": "benign", "dice": "0.0", "true_area": "0.1", "pred_area": "0.1"}]
    o = outline_on_negative(clf_rows, seg_rows, source="validation")
    assert (o.outlined, o.on_lesion, o.on_positive, o.no_lesion) == (5, 2, 1, 2)
    assert o.summary() == ("On both checkpoints' validation images, 5 scans the classifier called normal got an outline: "
                           "it marked a real lesion in 2 (1 malignant), and in 3 it marked no lesion (2 of these scans "
                           "had none).")
    assert o.sentence().startswith("The classifier calls this scan normal, yet the segmenter outlines a region. On both")
    assert outline_on_negative(clf_rows[6:], seg_rows) is None  # nothing called normal
    b = outline_on_negative(clf_rows, seg_rows, negative="benign")  # b3: outlined, but not on its lesion
    assert (b.outlined, b.on_lesion, b.no_lesion) == (1, 0, 0)

    # from two bundles: cross-validation when both hold it on the same folds, else their validation rows
    cdir, sdir = tmp_path / "clf", tmp_path / "seg"
    cdir.mkdir(), sdir.mkdir()
    write = lambda path, header, rows: path.write_text(  # noqa: E731
        ",".join(header) + "\n" + "".join(",".join(str(r.get(h, "")) for h in header) + "\n" for r in rows))
    seg_header = ["split", "fold", "path", "class", "dice", "true_area", "pred_area"]
    write(cdir / "predictions.csv", ["split", "path", "predicted"], [{"split": "val", **r} for r in clf_rows[:2]]
          + [{"split": "test", **r} for r in clf_rows[2:]])
    write(sdir / "predictions.csv", seg_header, [{"split": "val", **r} for r in seg_rows[:2]]
          + [{"split": "test", **r} for r in seg_rows[2:]])
    v = read_outline_on_negative(cdir, sdir)
    assert (v.source, v.outlined, v.on_lesion, v.no_lesion) == ("validation", 2, 0, 2)
    folds = {r["path"]: 1 + i % 2 for i, r in enumerate(clf_rows)}
    write(cdir / "cv_predictions.csv", ["fold", "path", "predicted"], [{"fold": folds[r["path"]], **r} for r in clf_rows])
    write(sdir / "cv_predictions.csv", seg_header, [{"split": "cv", "fold": folds[r["path"]], **r} for r in seg_rows])
    cv = read_outline_on_negative(cdir, sdir)
    assert (cv.source, cv.outlined, cv.on_lesion, cv.on_positive) == ("2-fold cross-validation", 5, 2, 1)
    assert cv.summary().startswith("In the 2-fold cross-validation on both model cards, 5 scans")
    write(sdir / "cv_predictions.csv", seg_header, [{"split": "cv", "fold": 3 - folds[r["path"]], **r} for r in seg_rows])
    assert read_outline_on_negative(cdir, sdir).source == "validation"  # other folds: not one out-of-fold pass
    assert read_outline_on_negative(cdir, tmp_path / "nowhere") is None

    # the caveat: the outline's meaning only on a scan called normal that got one; the misses always
    from core.segmentation import MissedLesions
    missed = MissedLesions("test", 4, 1, 1)
    outline = np.ones((4, 4), bool)
    assert lesion_caveat(missed, o, "normal", outline) == o.sentence() + " " + missed.sentence("The segmenter")
    assert lesion_caveat(missed, o, "benign", outline) == missed.sentence("The segmenter")
    assert lesion_caveat(None, o, "normal", ~outline) is None
    assert lesion_caveat(None, None, "normal", outline) is None


def test_shape_by_class_summarises_the_outlines_class_by_class():
    from core.segmentation import shape_by_class

    def row(cls, wd, irr, circ=0.8, regions=1, true_area="0.1"):
        return {"class": cls, "true_area": true_area, "pred_regions": str(regions),
                "pred_width_to_depth": "" if regions == 0 else str(wd),
                "pred_margin_irregularity": "" if regions == 0 else str(irr),
                "pred_circularity": "" if regions == 0 else str(circ)}

    rows = [row("benign", 2.0, 0.01), row("benign", 1.5, 0.02), row("benign", 0.8, 0.20),  # one taller than wide
            row("benign", 0, 0, regions=0),  # a benign lesion the segmenter missed: counted, not described
            row("malignant", 0.7, 0.30, 0.5), row("malignant", 1.2, 0.25, 0.6),
            row("normal", 0, 0, regions=0, true_area="0")]  # no lesion: not in the summary
    s = shape_by_class(rows, ["benign", "malignant", "normal"])
    assert (s["n_lesions"], s["n_outlined"]) == (6, 5)
    b, m = s["classes"]
    assert [c["class"] for c in s["classes"]] == ["benign", "malignant"]  # normal has no lesion
    assert (b["lesions"], b["outlined"], m["lesions"], m["outlined"]) == (4, 3, 2, 2)
    assert b["median width to depth"] == 1.5 and m["median width to depth"] == pytest.approx(0.95)
    assert b["taller_than_wide"] == pytest.approx(1 / 3) and m["taller_than_wide"] == 0.5  # 0.8 and 0.7 < 1 / 1.1
    assert b["irregular"] == pytest.approx(1 / 3) and m["irregular"] == 1.0
    # ROC AUC = share of (malignant, benign) pairs where the malignant outline's value is higher: irregularity
    # 0.30, 0.25 against 0.01, 0.02, 0.20 in 6 of 6 pairs; width to depth 0.7, 1.2 against 2.0, 1.5, 0.8 in 1 of 6.
    assert s["separation"]["margin irregularity"] == 1.0
    assert s["separation"]["width to depth"] == pytest.approx(1 / 6)
    assert s["separation"]["circularity"] == 0.0
    assert shape_by_class([{k: v for k, v in r.items() if not k.startswith("pred_")} for r in rows],
                          ["benign", "malignant"]) is None  # rows without the shape columns
    only_benign = shape_by_class(rows[:3], ["benign", "malignant"])
    assert only_benign["separation"]["margin irregularity"] is None
