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


def test_near_duplicate_audit_leaves_out_test_images_repeated_in_train(tiny_bundle, tiny_tree, tmp_path, capsys):
    """A test image whose repeat scan sits in the training split is excluded; the rest are scored as before."""
    import json
    import shutil

    from PIL import Image

    from core.checkpoints import read_csv
    from core.evaluation import main, near_duplicate_audit, predictions_from_bundle

    data = tmp_path / "data"
    shutil.copytree(tiny_tree, data)
    bundle = tmp_path / "ck" / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    rows = read_csv(bundle / "split.csv")
    test_row = next(r for r in rows if r["split"] == "test")
    train_row = next(r for r in rows if r["split"] == "train")
    repeat = np.array(Image.open(data / test_row["path"]).convert("RGB"))
    repeat[:2, :6] = 255  # the same scan with a marker, filed as a training image
    Image.fromarray(repeat).save(data / train_row["path"])

    audit = near_duplicate_audit(bundle, "test", data_dir=str(data))
    assert audit["excluded"] == [test_row["path"]] and audit["n_excluded"] == 1
    y, p, pred = predictions_from_bundle(bundle, "test")
    keep = np.array([r["path"] != test_row["path"] for r in pred])
    expected = classification_metrics(y[keep], p[keep], ("benign", "malignant"), seed=0)
    assert audit["metrics"]["n"] == audit["n_split"] - 1 == len(y) - 1
    assert audit["metrics"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert sum(audit["excluded_by_class"].values()) == 1

    model_bytes = (bundle / "model.keras").read_bytes()
    assert main([str(bundle), "--without-near-duplicates", "--data-dir", str(data), "--record"]) == 0
    assert f"1 of {len(y)} test images left out" in capsys.readouterr().out
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["near_duplicate_audit"]["excluded"] == [test_row["path"]]
    assert (bundle / "model.keras").read_bytes() == model_bytes
    # Without the dataset: a message, not a traceback.
    assert main([str(bundle), "--without-near-duplicates", "--data-dir", str(tmp_path / "none")]) == 2
    assert "pass --data-dir" in capsys.readouterr().err


def test_patient_level_metrics_by_hand():
    """Mean probability per patient (Spanhol et al. 2016) and the patient recognition rate, by hand."""
    from core.evaluation import patient_level_metrics

    y = [0, 0, 0, 1, 1, 1, 1]
    p1 = np.array([0.6, 0.3, 0.2, 0.9, 0.4, 0.8, 0.45])  # P(malignant)
    probs = np.stack([1 - p1, p1], 1)
    groups = ["a", "a", "b", "c", "c", "d", "d"]
    out = patient_level_metrics(y, probs, groups, ("benign", "malignant"), n_boot=0)
    # patient means: a 0.45 -> benign (right), b 0.2 right, c 0.65 right, d 0.625 right
    assert out["n"] == 4 and out["accuracy"] == 1.0 and out["roc_auc_macro"] == 1.0
    # recognition rate: a 1/2, b 1/1, c 1/2, d 1/2 -> mean 0.625
    assert out["patient_recognition_rate"] == pytest.approx(0.625)
    rows = {r["patient"]: r for r in out["patients"]}
    assert rows["a"]["probabilities"]["malignant"] == pytest.approx(0.45) and rows["c"]["n_images"] == 2
    # A patient with images of both classes (IDC slides): no patient-level result.
    assert patient_level_metrics([0, 1], probs[:2], ["a", "a"], ("benign", "malignant"), n_boot=0) is None


def test_subgroup_metrics_by_hand():
    """Per-subtype images and patients right, by hand; images without a subtype are left out."""
    from core.evaluation import subgroup_metrics

    y = [0, 0, 0, 1, 1, 1, 1, 1]
    p1 = np.array([0.2, 0.7, 0.1, 0.9, 0.4, 0.3, 0.8, 0.6])  # P(malignant)
    probs = np.stack([1 - p1, p1], 1)
    sub = ["F", "F", "TA", "DC", "MC", "MC", "MC", None]
    pats = ["a", "a", "b", "c", "d", "d", "e", "f"]
    rows = {r["subgroup"]: r for r in subgroup_metrics(y, probs, sub, ("benign", "malignant"), pats)}
    assert list(rows) == ["F", "TA", "DC", "MC"]  # by class, then name; the image without one left out
    # F: images 0.2 right, 0.7 wrong; patient a mean 0.45 -> benign, right
    assert (rows["F"]["images"], rows["F"]["images_correct"], rows["F"]["patients_correct"]) == (2, 1, 1)
    assert rows["F"]["mean_p_true"] == pytest.approx((0.8 + 0.3) / 2) and rows["F"]["class"] == "benign"
    # MC: 0.4 and 0.3 wrong, 0.8 right; patient d mean 0.35 wrong, e right
    assert rows["MC"]["recall"] == pytest.approx(1 / 3)
    assert (rows["MC"]["patients"], rows["MC"]["patients_correct"]) == (2, 1)
    assert "patients" not in subgroup_metrics(y, probs, sub, ("benign", "malignant"))[0]
    assert subgroup_metrics([0, 1], probs[:2], ["x", "x"], ("benign", "malignant"))[0]["class"] == "mixed"


def _ranked_auc(y, p, k):
    """`_ranked_auc_rows` of one case set, None where undefined (as `_auc`)."""
    from core.evaluation import _ranked_auc_rows

    v = float(_ranked_auc_rows(np.asarray(y)[None], np.asarray(p)[None], k)[0])
    return None if np.isnan(v) else v


def test_ranked_auc_is_sklearns_roc_auc_with_ties_and_missing_classes():
    """The bootstrap's rank-sum AUC gives sklearn's value (binary and macro one-vs-rest, tied scores) and None
    where sklearn's would be undefined (one class present; a class of three missing)."""
    from core.evaluation import _auc

    rng = np.random.default_rng(3)
    for trial in range(60):
        k, n = (2, 3)[trial % 2], int(rng.integers(3, 40))
        y = rng.integers(0, k, n)
        p = rng.dirichlet(np.ones(k), n)
        if trial % 3 == 0:  # many tied scores
            p = np.round(p, 1)
            p = p / p.sum(axis=1, keepdims=True)
        want = _auc(y, p, k)
        assert (want is None) == (_ranked_auc(y, p, k) is None)
        if want is not None:
            assert _ranked_auc(y, p, k) == pytest.approx(want, abs=1e-12)
    assert _ranked_auc(np.array([1, 1, 1]), rng.dirichlet(np.ones(2), 3), 2) is None
    assert _ranked_auc(np.array([0, 1, 1, 0]), rng.dirichlet(np.ones(3), 4), 3) is None
    assert _ranked_auc(np.array([0, 1, 0, 1]), np.array([[.9, .1], [.4, .6], [.6, .4], [.6, .4]]), 2) == 0.875


@pytest.mark.parametrize("k,n", [(2, 9), (3, 40), (2, 300)])
def test_bootstrap_draws_the_same_resamples_as_one_call_per_resample(k, n):
    """classification_metrics bootstraps on stacked resamples: the same intervals as sklearn's AUC and the
    accuracy computed one resample at a time, with resamples where AUC is undefined left out alike (n=9: some
    draw a single class)."""
    from core.evaluation import _auc, _ranked_auc_rows, bootstrap_ci

    rng = np.random.default_rng(k * n)
    y = rng.integers(0, k, n)
    p = np.round(rng.dirichlet(np.ones(k), n), 2)  # with ties
    p = p / p.sum(axis=1, keepdims=True)

    def one_at_a_time(stat):
        draws = np.random.default_rng(5)
        vals = [stat(y[i], p[i]) for i in (draws.integers(0, n, n) for _ in range(400))]
        vals = [v for v in vals if v is not None]
        return [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]

    loop = one_at_a_time(lambda t, q: _auc(t, q, k))
    assert bootstrap_ci(y, p, lambda t, q: _ranked_auc_rows(t, q, k), 400, seed=5) == pytest.approx(loop, abs=1e-12)
    acc = bootstrap_ci(y, p, lambda t, q: (q.argmax(-1) == t).mean(-1), 400, seed=5)
    assert acc == pytest.approx(one_at_a_time(lambda t, q: float((q.argmax(1) == t).mean())), abs=1e-12)
    rows = _ranked_auc_rows(np.array([[1, 1, 1], [0, 1, 1]]), np.array([[[.9, .1]] * 3, [[.9, .1], [.2, .8], [.95, .05]]]), 2)
    assert np.isnan(rows[0]) and rows[1] == 0.5  # one class: undefined; 1 of 2 positives above the negative
    # no cases: no interval (not [nan, nan] in metadata.json)
    assert bootstrap_ci(np.zeros(0, int), np.zeros((0, 2)), lambda t, q: np.ones(len(t)), 100) is None


def test_mean_ci_drops_missing_values_and_bootstraps_the_mean():
    """One mean-with-interval for Dice / IoU (segmenter cards) and explanation scores (explanations.json): None and
    NaN dropped, the interval the percentiles of the means of n_boot resamples, none from a single value."""
    from core.evaluation import mean_ci

    vals = [0.9, None, 0.5, float("nan"), 0.7, 0.2, 0.8]
    v = np.array([0.9, 0.5, 0.7, 0.2, 0.8])
    draws = np.random.default_rng(3)
    means = [v[draws.integers(0, 5, 5)].mean() for _ in range(300)]
    got = mean_ci(vals, n_boot=300, seed=3)
    assert got["n"] == 5 and got["mean"] == pytest.approx(0.62) and got["median"] == pytest.approx(0.7)
    assert got["ci95"] == pytest.approx([np.quantile(means, 0.025), np.quantile(means, 0.975)], abs=1e-12)
    assert mean_ci([0.4, None]) == {"n": 1, "mean": 0.4, "median": 0.4, "ci95": None}
    assert mean_ci([None, float("nan")]) == {"n": 0, "mean": None, "median": None, "ci95": None}
    assert mean_ci(v, n_boot=0)["ci95"] is None


def test_misread_as_names_the_other_class_subtypes_weakest_first():
    from core.evaluation import misread_as

    rows = [{"subgroup": "F", "class": "benign", "recall": 0.7}, {"subgroup": "TA", "class": "benign", "recall": 0.9},
            {"subgroup": "MC", "class": "malignant", "recall": 0.7}, {"subgroup": "PC", "class": "malignant",
                                                                        "recall": 0.6}]
    names = ("benign", "malignant")
    assert [r["subgroup"] for r in misread_as(rows, "benign", names)] == ["PC", "MC"]
    assert [r["subgroup"] for r in misread_as(rows, "malignant", names)] == ["F"]
    assert misread_as(rows, "benign", ("benign", "malignant", "normal")) == []  # a miss could be either class


def test_subtype_caution_names_the_misses_and_what_the_operating_point_left_below():
    from core.evaluation import subtype_caution

    def row(sub, cls, n, right):
        return {"subgroup": sub, "class": cls, "images": n, "images_correct": right, "recall": right / n}

    cv = [row("fibroadenoma", "benign", 10, 9), row("mucinous_carcinoma", "malignant", 20, 15),
          row("papillary_carcinoma", "malignant", 10, 6)]
    at_op = [row("mucinous_carcinoma", "malignant", 18, 16), row("papillary_carcinoma", "malignant", 9, 8)]
    asked = []

    def rows(path, split, at_operating_point):
        asked.append((split, at_operating_point))
        return cv if split == "cv" else at_op

    names = ("benign", "malignant")
    op = {"operating_point": {"positive_class": "malignant", "threshold": 0.2, "chosen_on": "calibration split"}}
    said = subtype_caution("b", np.array([0.9, 0.1]), names, op, rows)
    assert said["text"] == (
        "Read a benign call with care: in cross-validation this model called 4 of 10 papillary carcinoma and 5 of "
        "20 mucinous carcinoma images benign (the model card's table by tumour subtype). The operating point, which "
        "this image does not cross, still left 1 of 9 papillary carcinoma and 2 of 18 mucinous carcinoma images "
        "below it in the calibration split.")
    assert [r["images_wrong"] for r in said["missed_in_cv"]] == [4, 5]
    assert [r["images_wrong"] for r in said["left_below_operating_point"]] == [1, 2]
    assert asked == [("cv", False), ("calibration", True)]
    crossed = subtype_caution("b", np.array([0.75, 0.25]), names, op, rows)  # benign call, but flagged malignant
    assert crossed["left_below_operating_point"] is None and crossed["text"].endswith("tumour subtype).")
    assert subtype_caution("b", np.array([0.2, 0.8]), names, op, rows) is None  # fibroadenoma 0.9: not weak
    assert subtype_caution("b", np.array([0.9, 0.1]), names, op, lambda *a: None) is None  # no subtypes recorded


def test_called_at_threshold_and_subgroups_at_an_operating_point():
    from core.evaluation import called_at_threshold, subgroup_metrics

    probs = np.array([[0.9, 0.1, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    # class 1 when P(1) >= 0.2, else the more probable of classes 0 and 2
    assert called_at_threshold(probs, 1, 0.2).tolist() == [0, 1, 1, 1]
    assert called_at_threshold(probs, 1, 0.7).tolist() == [0, 0, 2, 2]
    rows = subgroup_metrics([1, 1, 1, 1], probs, ["a", "a", "b", "b"], ("x", "y", "z"),
                            called=called_at_threshold(probs, 1, 0.2))
    assert [(r["subgroup"], r["images_correct"]) for r in rows] == [("a", 1), ("b", 2)]  # argmax: a 0, b 1


def test_compare_records_a_baseline_on_the_same_test_images(tiny_bundle, tiny_tree, tmp_path, capsys):
    """--compare OTHER --record stores another checkpoint's metrics and test probabilities, aligned by image."""
    import json
    import shutil

    import train
    from core.checkpoints import load_classifier, read_csv
    from core.evaluation import main

    shutil.copytree(tiny_bundle, tmp_path / "tiny")
    assert train.main(["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "simple_cnn",
                       "--input-size", "24", "--head-epochs", "1", "--fine-tune-epochs", "0", "--head-units", "4",
                       "--batch-size", "8", "--name", "other", "--out-dir", str(tmp_path), "--quiet"]) == 0
    assert main([str(tmp_path / "tiny"), "--compare", str(tmp_path / "other"), "--record"]) == 0
    assert "other: balanced accuracy" in capsys.readouterr().out
    comp = json.loads((tmp_path / "tiny" / "metadata.json").read_text())["comparison"]
    mine = [r["path"] for r in read_csv(tmp_path / "tiny" / "predictions.csv") if r["split"] == "test"]
    theirs = {r["path"]: float(r["p_malignant"]) for r in read_csv(tmp_path / "other" / "predictions.csv")
              if r["split"] == "test"}
    assert comp["name"] == "other" and comp["input_size"] == 24
    assert [p[1] for p in comp["test_probabilities"]] == pytest.approx([theirs[p] for p in mine], abs=1e-6)
    assert comp["metrics"]["test"]["n"] == len(mine)
    load_classifier(tmp_path / "tiny")  # model untouched, still verifies
    # A bundle from another split is refused with a message.
    other_split = tmp_path / "other2"
    shutil.copytree(tmp_path / "other", other_split)
    rows = (other_split / "predictions.csv").read_text().splitlines()
    (other_split / "predictions.csv").write_text("\n".join(r for r in rows if not r.startswith("test,")) + "\n")
    assert main([str(tmp_path / "tiny"), "--compare", str(other_split)]) == 2
    assert "not evaluated on the same test images" in capsys.readouterr().err


def test_operating_point_by_hand():
    """Threshold chosen on validation for sensitivity >= 0.75; test sensitivity / specificity at it."""
    from core.evaluation import operating_point, operating_point_source

    names = ("benign", "malignant", "normal")

    def probs(pm):
        pm = np.asarray(pm, float)
        return np.stack([(1 - pm) / 2, pm, (1 - pm) / 2], 1)

    yv = [1, 1, 1, 1, 0, 2, 0]
    pv = probs([0.9, 0.6, 0.4, 0.1, 0.5, 0.3, 0.05])
    yt = [1, 1, 0, 2, 0]
    pt = probs([0.7, 0.35, 0.45, 0.2, 0.39])
    op = operating_point(yv, pv, yt, pt, 1, names, target_sensitivity=0.75)
    # validation malignant probabilities 0.9, 0.6, 0.4, 0.1: 3 of 4 reach 0.4 -> threshold 0.4
    assert op["threshold"] == pytest.approx(0.4) and op["val"]["sensitivity"] == 0.75
    assert (op["val"]["tn"], op["val"]["fp"]) == (2, 1)  # the benign 0.5 is called malignant
    assert op["chosen_on"] == "validation split" and "sensitivity on the validation split is at least" in op["rule"]
    assert operating_point_source(op) == operating_point_source({}) == "validation split"  # older records: no key
    t = op["test"]
    assert (t["tp"], t["fn"], t["tn"], t["fp"]) == (1, 1, 2, 1) and t["specificity"] == pytest.approx(2 / 3)
    lo, hi = t["sensitivity_ci95"]
    assert lo < 0.5 < hi
    with pytest.raises(ValueError):
        operating_point([0, 2], pv[:2], yt, pt, 1, names)
