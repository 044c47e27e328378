"""Out-of-distribution warning: synthetic known answers, the bundle contract, and the real BUSI checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.ood import OODDetector, fit
from tests.conftest import BREAKHIS, BREAKHIS_200X, BUSI, ROOT, UCSB, needs_shared

BUSI_CKPT = ROOT / "checkpoints" / "busi_densenet121"


def test_detector_on_synthetic_features(tmp_path):
    rng = np.random.default_rng(0)
    train = np.concatenate([rng.normal(0, 1, (200, 16)), rng.normal(3, 1, (200, 16))])
    labels = np.repeat([0, 1], 200)
    val = np.concatenate([rng.normal(0, 1, (100, 16)), rng.normal(3, 1, (100, 16))])
    det = fit(train, labels, val, false_alarm_rate=0.05)
    assert det.flag(val).mean() == pytest.approx(0.05, abs=0.01)  # threshold set on validation
    test_in = np.concatenate([rng.normal(0, 1, (300, 16)), rng.normal(3, 1, (300, 16))])
    assert det.flag(test_in).mean() < 0.12
    assert det.flag(rng.normal(12, 1, (50, 16))).mean() == 1.0
    det.save(tmp_path / "ood.npz")
    back = OODDetector.load(tmp_path / "ood.npz")
    np.testing.assert_allclose(back.score(val), det.score(val))


def test_bundle_has_detector(tiny_bundle, tiny_tree):
    from core.checkpoints import load_classifier, read_csv
    from core.preprocessing import load_image

    clf = load_classifier(tiny_bundle)
    meta = json.loads((tiny_bundle / "metadata.json").read_text())
    assert (tiny_bundle / "ood.npz").is_file() and meta["ood"]["false_alarm_rate_val"] == 0.05
    assert meta["ood"]["copy_radius"] > 0 and 0 <= meta["ood"]["train_above_threshold_rate"] <= 1
    res = clf.ood_check([np.zeros((40, 40, 3), np.uint8)])
    assert set(res[0]) == {"score", "threshold", "out_of_distribution", "training_copy"}
    train = [load_image(tiny_tree / r["path"]) for r in read_csv(tiny_bundle / "split.csv") if r["split"] == "train"]
    checks = clf.ood_check(train)  # every training image, read back from disk, is a copy and never flagged
    assert all(c["training_copy"] and not c["out_of_distribution"] for c in checks)


def test_find_fitting_probes_each_checkpoint_once_and_leaves_out_one_that_fails_to_load():
    from core.errors import CheckpointError
    from core.ood import find_fitting

    ok = {"score": 1.0, "threshold": 10.0, "out_of_distribution": False}
    probes = {"tiles": (ok, True, "histopathology"), "scan": ({**ok, "score": 5.0}, False, "ultrasound"),
              "field": ({**ok, "score": 9.0}, False, "histopathology"), "none": (None, False, "histopathology")}
    asked = []

    def probe(name):
        asked.append(name)
        if name == "broken":
            raise CheckpointError("broken: model.keras is missing")
        return probes[name]

    assert find_fitting(["broken", *probes], probe) == ["scan"]  # the nearest whole-image model's modality only
    assert sorted(asked) == sorted(["broken", *probes])
    del probes["scan"]
    assert find_fitting(probes, probe) == ["field", "tiles"]  # whole-image before patch models


@needs_shared
@pytest.mark.skipif(not (BUSI_CKPT / "ood.npz").is_file(), reason="committed BUSI checkpoint not present")
@pytest.mark.slow
def test_busi_checkpoint_flags_foreign_images():
    import skimage.data

    from core.checkpoints import load_classifier
    from core.data import load_breakhis, load_ucsb, read_split
    from core.preprocessing import load_image

    clf = load_classifier(BUSI_CKPT)
    test = read_split(BUSI_CKPT / "split.csv", BUSI, clf.class_names)["test"]
    busi = [r["out_of_distribution"] for r in clf.ood_check([load_image(s.path) for s in test.samples])]
    histo = [load_image(s.path) for s in load_breakhis(BREAKHIS).samples]
    histo += [load_image(s.path) for s in load_ucsb(UCSB).samples[::6]]
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (300, 400, 3), dtype=np.uint8) for _ in range(5)]
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    flagged = {k: float(np.mean([r["out_of_distribution"] for r in clf.ood_check(v)]))
               for k, v in (("histopathology", histo), ("noise", noise), ("photos", photos))}
    print(f"BUSI test passed {1 - np.mean(busi):.3f}; flagged: {flagged}")
    assert 1 - np.mean(busi) >= 0.85
    assert flagged["histopathology"] >= 0.9 and flagged["noise"] == 1.0 and flagged["photos"] >= 0.75


def test_refit_rewrites_detector_and_metadata_only(tiny_bundle, tiny_tree, tmp_path, capsys):
    """`python -m core.ood CKPT` refits ood.npz from the split; the model and other files stay byte-identical."""
    import shutil

    from core.checkpoints import load_classifier
    from core.ood import main

    b = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, b)
    (b / "ood.npz").unlink()
    meta = json.loads((b / "metadata.json").read_text())
    del meta["ood"]
    (b / "metadata.json").write_text(json.dumps(meta))
    unchanged = {f: (b / f).read_bytes() for f in ("model.keras", "split.csv", "predictions.csv", "history.csv")}
    assert main([str(b), "--data-dir", str(tiny_tree), "--false-alarm-rate", "0.1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {f: (b / f).read_bytes() for f in unchanged} == unchanged
    after = json.loads((b / "metadata.json").read_text())
    assert after["ood"] == info and info["false_alarm_rate_val"] == pytest.approx(0.1)
    assert OODDetector.load(b / "ood.npz").threshold == pytest.approx(info["threshold"])
    assert load_classifier(b).ood is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_checkpoints_that_fit_orders_whole_image_models_first_then_nearest():
    from core.ood import checkpoints_that_fit

    checks = {"active": {"score": 90.0, "threshold": 10.0, "out_of_distribution": True},
              "far": {"score": 9.0, "threshold": 10.0, "out_of_distribution": False},
              "near": {"score": 20.0, "threshold": 100.0, "out_of_distribution": False},
              "patches": {"score": 1.0, "threshold": 100.0, "out_of_distribution": False},
              "no_detector": None}
    assert checkpoints_that_fit(checks) == ["patches", "near", "far"]
    assert checkpoints_that_fit(checks, patch_models={"patches"}) == ["near", "far", "patches"]
    assert checkpoints_that_fit({"a": checks["active"], "b": None}) == []
    kinds = {"near": "ultrasound", "far": "histopathology", "patches": "histopathology"}
    assert checkpoints_that_fit(checks, {"patches"}, kinds) == ["near"]  # only the best fit's modality
    kinds["near"] = "histopathology"
    assert checkpoints_that_fit(checks, {"patches"}, kinds) == ["near", "far", "patches"]
    copy = {"score": 150.0, "threshold": 100.0, "out_of_distribution": False, "training_copy": True}
    assert checkpoints_that_fit({**checks, "trained_on_it": copy}, {"patches"}) == ["trained_on_it", "near", "far",
                                                                                    "patches"]


@needs_shared
@pytest.mark.skipif(not (BUSI_CKPT / "ood.npz").is_file(), reason="committed checkpoints not present")
@pytest.mark.slow
def test_committed_checkpoints_point_an_image_to_its_own_modality():
    """Ultrasound scans fit only the ultrasound checkpoint; BreakHis 200X fields fit the BreakHis one first."""
    from core.checkpoints import list_bundles, load_classifier
    from core.data import load_breakhis, load_busi
    from core.gallery import MODALITY
    from core.ood import checkpoints_that_fit
    from core.preprocessing import load_image

    clfs = {p.name: load_classifier(p) for p in list_bundles(ROOT / "checkpoints", kind="classifier")}
    assert {"busi_densenet121", "breakhis_densenet121"} <= set(clfs)
    patch = {n for n, c in clfs.items() if c.patches is not None}
    kinds = {n: MODALITY.get(c.metadata["dataset"]["kind"], "") for n, c in clfs.items()}

    def first_fits(samples):
        images = [load_image(s.path) for s in samples[::max(1, len(samples) // 6)][:6]]
        checks = {n: c.ood_check(images) for n, c in clfs.items()}
        return [checkpoints_that_fit({n: (r[i] if r else None) for n, r in checks.items()}, patch, kinds)
                for i in range(len(images))]

    busi = first_fits(load_busi(BUSI).samples)
    print("BUSI", busi)
    assert all(f in ([], ["busi_densenet121"]) for f in busi), busi  # no H&E checkpoint takes a scan
    assert sum(f == ["busi_densenet121"] for f in busi) >= 5, busi
    bh = first_fits(load_breakhis(BREAKHIS_200X, magnification=200).samples)
    print("BreakHis", bh)
    assert all("busi_densenet121" not in f for f in bh), bh
    assert sum(bool(f) and f[0] == "breakhis_densenet121" for f in bh) >= 5, bh


def test_a_copy_of_a_training_image_is_never_flagged_and_old_detectors_still_load(tmp_path):
    """Training images that score above the validation threshold (here 10 outliers) are accepted as copies, a new
    image beside one of them is not, validation's false-alarm rate is unchanged; a detector saved without training
    points loads and flags by the threshold alone."""
    rng = np.random.default_rng(1)
    inliers = np.concatenate([rng.normal(0, 1, (200, 16)), rng.normal(3, 1, (200, 16))])
    outliers = rng.normal(0, 1, (10, 16)) + 9.0 * np.eye(16)[rng.integers(0, 16, 10)]
    train = np.concatenate([inliers, outliers])
    labels = np.concatenate([np.repeat([0, 1], 200), np.zeros(10, int)])
    val = np.concatenate([rng.normal(0, 1, (100, 16)), rng.normal(3, 1, (100, 16))])
    det = fit(train, labels, val, false_alarm_rate=0.05)
    assert det.copy_radius == pytest.approx(0.5 * det.copy_distance(val).min())
    assert (det.score(outliers) > det.threshold).all()  # the threshold alone would flag them
    assert not det.flag(outliers).any() and det.training_copy(outliers).all()
    jitter = outliers + rng.normal(0, 1e-3, outliers.shape)  # re-encoded copies
    assert not det.flag(jitter).any()
    beside = outliers + 3.0 * rng.normal(0, 1, outliers.shape)  # new images near, not copies
    assert (det.copy_distance(beside) > det.copy_radius).all() and det.flag(beside).mean() >= 0.8
    assert det.flag(val).mean() == pytest.approx(0.05, abs=0.01) and not det.training_copy(val).any()
    det.save(tmp_path / "ood.npz")
    back = OODDetector.load(tmp_path / "ood.npz")
    assert back.copy_radius == det.copy_radius and np.array_equal(back.flag(outliers), det.flag(outliers))
    np.savez(tmp_path / "old.npz", mean=det.mean, components=det.components, class_means=det.class_means,
             precision=det.precision, threshold=det.threshold, false_alarm_rate=det.false_alarm_rate)
    old = OODDetector.load(tmp_path / "old.npz")
    assert old.train_points is None and old.flag(outliers).all() and not old.training_copy(outliers).any()
