"""End-to-end training on tiny generated data: bundle contents, cached fast path, refresh, CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import core.training.classify as T
import core.training.common as C
import train
from core.checkpoints import load_classifier, read_csv
from core.evaluation import main as evaluation_main
from tests.conftest import DENSENET_WEIGHTS


def test_tiny_bundle_contents(tiny_bundle):
    names = {p.name for p in tiny_bundle.iterdir()}
    assert {"model.keras", "metadata.json", "history.csv", "predictions.csv", "split.csv"} <= names
    meta = json.loads((tiny_bundle / "metadata.json").read_text())
    for key in ("command", "git_commit", "dataset", "split", "class_names", "input_size", "backbone", "weights",
                "preprocessing", "training", "metrics", "model_sha256", "calibration"):
        assert key in meta, key
    assert meta["command"].startswith("python train.py --dataset folder")
    assert meta["training"]["epochs"] == 2
    split = read_csv(tiny_bundle / "split.csv")
    counts = {s: sum(r["split"] == s for r in split) for s in ("train", "val", "test")}
    assert counts == meta["split"]["counts"] and sum(counts.values()) == 28
    preds = read_csv(tiny_bundle / "predictions.csv")
    assert len(preds) == counts["val"] + counts["test"]
    for r in preds:
        p = [float(r["p_benign"]), float(r["p_malignant"])]
        assert abs(sum(p) - 1) < 1e-4 and r["predicted"] == ("benign", "malignant")[int(np.argmax(p))]
    hist = read_csv(tiny_bundle / "history.csv")
    assert [int(h["epoch"]) for h in hist] == [1, 2] and "val_loss" in hist[0]
    m = meta["metrics"]["test"]
    assert m["n"] == counts["test"] and 0 <= m["accuracy"] <= 1


def test_saved_predictions_match_reloaded_classifier(tiny_bundle):
    """predictions.csv was produced by the same preprocessing the public loader applies."""
    from core.preprocessing import load_image

    clf = load_classifier(tiny_bundle, backend="keras")  # float32, as in training (bf16 agreement: test_backends)
    meta = clf.metadata
    rows = [r for r in read_csv(tiny_bundle / "predictions.csv") if r["split"] == "test"][:5]
    imgs = [load_image(f"{meta['dataset']['root']}/{r['path']}") for r in rows]
    p = clf.predict_proba(imgs)
    expected = np.array([[float(r["p_benign"]), float(r["p_malignant"])] for r in rows])
    np.testing.assert_allclose(p, expected, atol=1e-4)


def test_evaluation_cli(tiny_bundle, capsys):
    assert evaluation_main([str(tiny_bundle)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion matrix" in out and "benign" in out
    assert evaluation_main([str(tiny_bundle / "missing")]) == 2


@pytest.mark.skipif(not DENSENET_WEIGHTS.is_file(), reason="shared DenseNet121 weights not available")
@pytest.mark.parametrize("cache,precision,extra", [(True, "bfloat16", ["--mixup", "0.4"]),
                                                   (False, "float32", ["--trunk-layer", "pool2_relu"])])
@pytest.mark.slow
def test_two_phase_training_cached_and_plain(tiny_tree, tmp_path, monkeypatch, capsys, cache, precision, extra):
    """Head, then fine-tuning, on cached trunk activations (the whole DenseNet121, with mixup), or on images by a
    plain fit (the trunk cut at pool2_relu): here because the cache would not fit in memory (1 kB free), which
    would be OOM-killed without a word: train without it and say so."""
    if not cache:
        monkeypatch.setattr(T, "available_memory", lambda: 1024)
    args = ["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "densenet121",
            "--weights", str(DENSENET_WEIGHTS), "--input-size", "32", "--head-epochs", "1",
            "--fine-tune-epochs", "1", "--fine-tune-layers", "10", "--augment-copies", "1",
            "--batch-size", "8", "--out-dir", str(tmp_path), "--name", "d", "--quiet",
            "--precision", precision, "--flip", "horizontal", "--rotation", "0.03", *extra]
    assert train.main(args) == 0
    meta = json.loads((tmp_path / "d" / "metadata.json").read_text())
    assert " ".join(extra) in meta["command"]
    assert meta["config"]["mixup"] == (0.4 if cache else 0.0)
    assert meta["config"]["trunk_layer"] == (None if cache else "pool2_relu")
    assert [p["phase"] for p in meta["training"]["phases"]] == ["head", "fine_tune"]
    assert (meta["training"]["cut_layer"] is not None) == cache
    skipped = meta["training"]["cache_skipped"]
    assert (skipped is None) == cache and (cache or skipped["bytes_needed"] > skipped["bytes_budget"])
    assert ("training without the cache" in capsys.readouterr().out) != cache
    assert meta["weights"]["source"] == "file" and len(meta["weights"]["sha256"]) == 64
    assert meta["config"]["flip"] == "horizontal" and meta["config"]["precision"] == precision
    assert meta["training"]["precision"] == (precision if C.cpu_has_bf16() else "float32")
    clf = load_classifier(tmp_path / "d", backend="keras")
    assert all(w.dtype == "float32" for w in clf.model.weights)  # bfloat16 only inside the training graph
    p = clf.predict_proba(np.zeros((2, 40, 40, 3), np.uint8))
    assert p.dtype == np.float32 and np.allclose(p.sum(1), 1, atol=1e-5)


def test_mixed_precision_sets_and_restores_the_onednn_rewrite():
    import tensorflow as tf

    key = "auto_mixed_precision_onednn_bfloat16"
    assert not tf.config.optimizer.get_experimental_options().get(key, False)
    with C.mixed_precision("bfloat16"):
        assert tf.config.optimizer.get_experimental_options()[key] is True
    assert not tf.config.optimizer.get_experimental_options().get(key, False)
    with C.mixed_precision("float32"):
        assert not tf.config.optimizer.get_experimental_options().get(key, False)


def test_precision_falls_back_where_the_cpu_has_no_bfloat16(monkeypatch, caplog):
    monkeypatch.setattr(C, "cpu_has_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="breastxai.train"):
        assert C.resolve_precision("bfloat16") == "float32"
    assert "no native bfloat16" in caplog.text
    assert C.resolve_precision("float32") == "float32"
    monkeypatch.setattr(C, "cpu_has_bf16", lambda: True)
    assert C.resolve_precision("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="precision"):
        C.resolve_precision("float16")


@pytest.mark.parametrize("flip,may_turn_upside_down", [("horizontal", False), ("horizontal_and_vertical", True)])
def test_augmenter_flip_choice(flip, may_turn_upside_down):
    """Ultrasound keeps skin at the top with flip='horizontal'; the default also flips vertically."""
    img = np.zeros((64, 32, 32, 3), np.float32)
    img[:, :16] = 200.0  # bright top half
    out = np.asarray(T.make_augmenter(0, flip=flip, rotation=0.0)(img, training=True))
    top, bottom = out[:, :16].mean(axis=(1, 2, 3)), out[:, 16:].mean(axis=(1, 2, 3))
    assert (top > bottom).all() != may_turn_upside_down


@pytest.mark.slow
def test_refresh_retrains_from_recorded_command(tiny_bundle, tmp_path):
    shutil.copytree(tiny_bundle, tmp_path / "tiny")
    before = json.loads((tmp_path / "tiny" / "metadata.json").read_text())
    assert train.refresh_all(tmp_path) == 0
    after = json.loads((tmp_path / "tiny" / "metadata.json").read_text())
    assert after["argv"][-4:] == ["--out-dir", str(tmp_path), "--name", "tiny"]
    assert after["created"] >= before["created"] and after["model_sha256"] != ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


@pytest.mark.slow
def test_cv_only_adds_cross_validation_to_an_existing_bundle(tiny_bundle, tiny_tree, tmp_path, capsys):
    """--cv-only records group-wise CV in metadata.json and leaves the model, split and predictions alone."""
    shutil.copytree(tiny_bundle, tmp_path / "tiny")
    b = tmp_path / "tiny"
    unchanged = {f: (b / f).read_bytes() for f in ("model.keras", "split.csv", "predictions.csv", "history.csv")}
    before = json.loads((b / "metadata.json").read_text())
    argv = [*before["argv"][:before["argv"].index("--name")], "--batch-size", "4", "--cv-folds", "2", "--cv-only",
            "--name", "tiny", "--out-dir", str(tmp_path), "--quiet"]
    assert train.main(argv) == 0
    after = json.loads((b / "metadata.json").read_text())
    assert {f: (b / f).read_bytes() for f in unchanged} == unchanged
    assert after["metrics"] == before["metrics"] and after["model_sha256"] == before["model_sha256"]
    cv = after["cross_validation"]
    assert len(cv["folds"]) == 2 and sum(f["n_test"] for f in cv["folds"]) == before["dataset"]["n_images"]
    assert sum(cv["pooled_support"].values()) == before["dataset"]["n_images"]
    assert set(cv["pooled_recall"]) == set(before["class_names"])
    assert all(0.0 <= r <= 1.0 for r in cv["pooled_recall"].values())
    assert "--cv-only" in cv["command"]
    assert cv["differs_from_checkpoint"] == {"batch_size": {"checkpoint": 8, "cross_validation": 4}}
    older = {k: v for k, v in before["config"].items() if k not in ("precision", "flip")}  # options it predates
    cfg = T.TrainConfig(**{**before["config"], "split": tuple(before["config"]["split"]),
                           "head_units": tuple(before["config"]["head_units"]), "precision": "bfloat16"})
    assert T.config_differences(older, cfg) == {"precision": {"checkpoint": "float32", "cross_validation": "bfloat16"}}
    load_classifier(b)  # still verifies (sha256 of the unchanged model)
    # No bundle there, or no folds: a message, not a traceback, and nothing written.
    assert train.main([*argv[:-5], "--name", "missing", "--out-dir", str(tmp_path), "--quiet"]) == 2
    assert train.main([*argv[:argv.index("--cv-folds")], "--cv-only", "--name", "tiny", "--out-dir",
                       str(tmp_path), "--quiet"]) == 2
    out = capsys.readouterr().out
    assert "No checkpoint at" in out and "needs --cv-folds" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_bad_dataset_gives_message_not_traceback(tmp_path, capsys):
    assert train.main(["--dataset", "folder", "--data-dir", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "not found" in capsys.readouterr().out


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    for opt in ("--backbone", "--weights", "--fine-tune-layers", "--clahe", "--magnification", "--no-cache",
                "--patience", "--split-file"):
        assert opt in out


@pytest.mark.slow
def test_cross_validation_resumes_finished_folds(tiny_tree, tmp_path, monkeypatch):
    """Each finished fold is saved; a rerun of the same settings reuses it instead of training again, and
    the pooled result (balanced accuracy, patient level, per-image predictions) is the same."""
    from core.data import load_folder

    m = load_folder(tiny_tree)
    m = m.subset(range(len(m)))
    cfg = T.TrainConfig(dataset="folder", data_dir=str(tiny_tree), backbone="simple_cnn", input_size=24,
                        head_epochs=1, fine_tune_epochs=0, head_units=(8,), dropout=0.0, batch_size=8,
                        cv_folds=2, verbose=0)
    first = T.cross_validate(cfg, m, work_dir=tmp_path / "cv")
    assert sorted(p.name for p in (tmp_path / "cv").glob("fold_*.npz")) == ["fold_1.npz", "fold_2.npz"]
    assert len(first["predictions"]) == len(m) and {r["fold"] for r in first["predictions"]} == {1, 2}
    assert 0.0 <= first["pooled_balanced_accuracy"] <= 1.0
    assert first["patient_level"]["n_patients"] == len(set(m.groups))  # one image per group here
    monkeypatch.setattr(T, "train_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = T.cross_validate(cfg, m, work_dir=tmp_path / "cv")
    assert again["predictions"] == first["predictions"] and again["folds"] == first["folds"]
    # Other settings do not reuse the saved folds.
    with pytest.raises(AssertionError, match="retrained"):
        T.cross_validate(T.TrainConfig(**{**T.asdict(cfg), "batch_size": 4}), m, work_dir=tmp_path / "cv")


@pytest.mark.slow
def test_cv_scope_train_val_keeps_test_patients_out(tiny_bundle, tmp_path):
    """--cv-scope train+val cross-validates only the split's training and validation images."""
    shutil.copytree(tiny_bundle, tmp_path / "tiny")
    before = json.loads((tmp_path / "tiny" / "metadata.json").read_text())
    argv = [*before["argv"][:before["argv"].index("--name")], "--cv-folds", "2", "--cv-scope", "train+val",
            "--cv-only", "--name", "tiny", "--out-dir", str(tmp_path), "--quiet"]
    assert train.main(argv) == 0
    cv = json.loads((tmp_path / "tiny" / "metadata.json").read_text())["cross_validation"]
    split = read_csv(tmp_path / "tiny" / "split.csv")
    test_paths = {r["path"] for r in split if r["split"] == "test"}
    cv_paths = {r["path"] for r in read_csv(tmp_path / "tiny" / "cv_predictions.csv")}
    assert cv["scope"] == "train+val" and len(cv_paths) == len(split) - len(test_paths)
    assert not cv_paths & test_paths and sum(f["n_test"] for f in cv["folds"]) == len(cv_paths)


@pytest.mark.skipif(not DENSENET_WEIGHTS.is_file(), reason="shared DenseNet121 weights not available")
@pytest.mark.slow
def test_logistic_head_on_a_cut_trunk_reproduces_scikit_learn(tiny_tree, tmp_path):
    """--trunk-layer cuts DenseNet121 early; --logistic-c fits the linear head with scikit-learn, and the saved
    Keras model computes the same probabilities as the fitted regression; --calibration inner-cv keeps test out."""
    from sklearn.linear_model import LogisticRegression

    args = ["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "densenet121",
            "--weights", str(DENSENET_WEIGHTS), "--input-size", "32", "--trunk-layer", "pool2_relu",
            "--head-units", "0", "--logistic-c", "0.05", "--fine-tune-epochs", "0", "--no-augment",
            "--calibration", "inner-cv", "--cv-folds", "2", "--out-dir", str(tmp_path), "--name", "lr", "--quiet"]
    assert train.main(args) == 0
    meta = json.loads((tmp_path / "lr" / "metadata.json").read_text())
    assert meta["head"]["C"] == 0.05 and meta["head"]["trunk_layer"] == "pool2_relu"
    assert meta["gradcam_layer"] == "pool2_relu" and meta["training"]["cut_layer"] == "head_pool"
    assert meta["training"]["phases"][0]["solver"].startswith("scikit-learn")
    assert "out-of-fold" in meta["calibration"]["method"] and meta["calibration"]["n"] == (
        meta["split"]["counts"]["train"] + meta["split"]["counts"]["val"])
    clf = load_classifier(tmp_path / "lr", backend="keras")
    assert not any(l.name.startswith(("pool3", "conv3_", "conv4_", "conv5_")) for l in clf.model.layers)
    # Refit the regression on the recorded training images and compare with the saved model's raw output.
    split = read_csv(tmp_path / "lr" / "split.csv")
    from core.preprocessing import load_image, model_input

    def xs(name):
        rows = [r for r in split if r["split"] == name]
        return (np.stack([model_input(load_image(str(tiny_tree / r["path"])), 32) for r in rows]).astype(np.float32),
                np.array([int(r["label"]) for r in rows]))

    (x_tr, y_tr), (x_te, _) = xs("train"), xs("test")
    f_tr, f_te = clf.features(x_tr), clf.features(x_te)
    mu, sd = f_tr.mean(0), np.sqrt(f_tr.var(0) + clf.model.get_layer("head_bn").epsilon)
    ref = LogisticRegression(C=0.05, max_iter=5000, class_weight="balanced").fit((f_tr - mu) / sd, y_tr)
    assert np.allclose(clf.raw_proba(x_te), ref.predict_proba((f_te - mu) / sd), atol=2e-3)
    # The out-of-fold predictions are kept, and an operating point can be chosen on them instead of validation.
    assert len(read_csv(tmp_path / "lr" / "calibration_predictions.csv")) == meta["calibration"]["n"]
    assert evaluation_main([str(tmp_path / "lr"), "--operating-point", "malignant", "--choose-on", "calibration",
                            "--record"]) == 0
    op = json.loads((tmp_path / "lr" / "metadata.json").read_text())["operating_point"]
    assert op["chosen_on"].startswith("out-of-fold") and op["val"]["sensitivity"] >= 0.95
    assert op["val"]["tp"] + op["val"]["fn"] == sum(int(r["label"]) for r in split if r["split"] != "test")


@pytest.mark.skipif(not DENSENET_WEIGHTS.is_file(), reason="shared DenseNet121 weights not available")
@pytest.mark.slow
def test_multi_scale_logistic_head_end_to_end(tiny_tree, tmp_path):
    """--scales: the trunk also runs on a smaller copy; the cache holds both scales' pooled features, the linear
    head fits on them, the bundle records the scales, and Grad-CAM averages both scales' maps."""
    from core.explain import explain
    from core.preprocessing import load_image

    args = ["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "densenet121",
            "--weights", str(DENSENET_WEIGHTS), "--input-size", "48", "--scales", "32", "--trunk-layer", "pool2_relu",
            "--head-units", "0", "--logistic-c", "0.05", "--fine-tune-epochs", "0", "--no-augment",
            "--out-dir", str(tmp_path), "--name", "ms", "--quiet"]
    assert train.main(args) == 0
    meta = json.loads((tmp_path / "ms" / "metadata.json").read_text())
    assert meta["head"]["scales"] == [48, 32] and meta["training"]["cut_layer"] == "head_concat"
    clf = load_classifier(tmp_path / "ms", backend="keras")
    assert clf.model.get_layer("head_bn").get_weights()[2].shape == (2 * 256,)  # pool2_relu: 256 channels x 2
    img = load_image(str(next(p for p in sorted(tiny_tree.rglob("*")) if p.is_file())))
    e = explain(clf, img, "gradcam")
    assert e.extras["scales"] == 2 and e.attribution.shape == img.shape[:2]
    assert clf.features(img[None]).shape == (1, 512)


def test_logistic_head_refuses_options_it_cannot_honour(tiny_tree, tmp_path, capsys):
    args = ["--dataset", "folder", "--data-dir", str(tiny_tree), "--weights", "none", "--logistic-c", "1",
            "--out-dir", str(tmp_path), "--quiet"]
    assert train.main(args) == 2
    err = capsys.readouterr()
    text = err.out + err.err
    assert "--head-units 0" in text and "pretrained trunk" in text and "Traceback" not in text


@pytest.mark.slow
def test_ensemble_bundle_end_to_end(tiny_bundle, tiny_tree, tmp_path, capsys):
    """--ensemble joins two bundles of one split into one checkpoint: its predictions are the softmax of the mean of
    the members' logits (temperature fitted on validation), its CV combines the members' out-of-fold predictions
    the same way, Grad-CAM averages the members' maps, and a refresh retrains the members first."""
    from core.checkpoints import apply_temperature
    from core.explain import explain
    from core.preprocessing import load_image
    from core.training.ensemble import mean_logit_probabilities

    members = tmp_path / "members"
    base = ["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "simple_cnn", "--input-size", "32",
            "--fine-tune-epochs", "0", "--dropout", "0", "--batch-size", "8", "--cv-folds", "2",
            "--out-dir", str(members), "--quiet"]
    assert train.main([*base, "--head-epochs", "2", "--head-units", "16", "--lr", "3e-3", "--name", "a"]) == 0
    assert train.main([*base, "--head-epochs", "3", "--head-units", "8", "--lr", "2e-3", "--seed", "42",
                       "--split-file", str(members / "a" / "split.csv"), "--name", "b"]) == 0
    argv = ["--ensemble", str(members / "a"), str(members / "b"), "--name", "ens", "--out-dir", str(tmp_path)]
    assert train.main(argv) == 0
    meta = json.loads((tmp_path / "ens" / "metadata.json").read_text())
    assert [m["name"] for m in meta["ensemble"]["members"]] == ["a", "b"]
    assert [m["config"]["head_units"] for m in meta["ensemble"]["members"]] == [[16], [8]]  # recipes, for --distil-from
    assert meta["gradcam_layer"] == [f"m{i}_" + json.loads((members / n / "metadata.json").read_text())["gradcam_layer"]
                                     for i, n in ((1, "a"), (2, "b"))]
    assert all(m["in_ensemble"]["val_max_abs_probability_difference"] < 1e-4 for m in meta["ensemble"]["members"])
    ens = load_classifier(tmp_path / "ens", backend="keras")
    a, b = (load_classifier(members / n, backend="keras") for n in "ab")
    imgs = [load_image(str(p)) for p in sorted(tiny_tree.rglob("*.png"))[:6]]
    expected = apply_temperature(mean_logit_probabilities([a.raw_proba(imgs), b.raw_proba(imgs)]), ens.temperature)
    np.testing.assert_allclose(ens.predict_proba(imgs), expected, atol=1e-5)
    # CV: the members' out-of-fold probabilities, combined image by image.
    rows = {n: {r["path"]: r for r in read_csv(members / n / "cv_predictions.csv")} for n in "ab"}
    mine = {r["path"]: r for r in read_csv(tmp_path / "ens" / "cv_predictions.csv")}
    names = meta["class_names"]
    assert set(mine) == set(rows["a"]) and len(meta["cross_validation"]["folds"]) == 2
    k = sorted(mine)[0]
    p = mean_logit_probabilities([np.array([[float(rows[n][k][f"p_{c}"]) for c in names]]) for n in "ab"])[0]
    np.testing.assert_allclose([float(mine[k][f"p_{c}"]) for c in names], p, atol=2e-6)
    e = explain(ens, imgs[0], "gradcam")
    assert e.extras["members"] == 2 and e.attribution.shape == imgs[0].shape[:2]
    assert ens.features(np.stack(imgs[:2])).shape == (2, 16 + 8)  # head_concat: both members' penultimate features
    # Another split, or one member: a message, not a traceback.
    assert train.main([*base, "--head-epochs", "1", "--head-units", "8", "--seed", "7", "--cv-folds", "0",
                       "--name", "c"]) == 0
    assert train.main(["--ensemble", str(members / "a"), str(members / "c"), "--name", "bad",
                       "--out-dir", str(tmp_path)]) == 2
    assert train.main(["--ensemble", str(members / "a"), "--name", "bad", "--out-dir", str(tmp_path)]) == 2
    assert "another split" in capsys.readouterr().out and not (tmp_path / "bad").exists()
    assert train.ensemble_options(argv) == ["--name", "ens", "--out-dir", str(tmp_path)]
    # `python train.py` with no arguments: the members are retrained from their own commands, then joined again.
    shutil.copytree(tmp_path / "ens", tmp_path / "again" / "ens")
    assert train.refresh_all(tmp_path / "again") == 0
    again = json.loads((tmp_path / "again" / "ens" / "metadata.json").read_text())
    assert [m["bundle"] for m in again["ensemble"]["members"]] == [
        str(tmp_path / "again" / ".members" / f"ens_member{i}") for i in (1, 2)]
    assert again["argv"][:3] == ["--ensemble", *[m["bundle"] for m in again["ensemble"]["members"]]]
    for i in (1, 2):  # every member is retrained on the ensemble's own split
        member = json.loads((tmp_path / "again" / ".members" / f"ens_member{i}" / "metadata.json").read_text())
        assert member["split"]["reused_from"] == str(tmp_path / "again" / "ens" / "split.csv")
    load_classifier(tmp_path / "again" / "ens", backend="keras")


def test_mix_batch_by_hand():
    x = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    y = np.eye(2, dtype=np.float32)[[0, 1, 1, 0]]
    sw = np.array([1.0, 2.0, 2.0, 1.0], np.float32)
    xm, ym, swm = T.mix_batch(x, y, sw, 0.4, np.random.default_rng(7))
    ref = np.random.default_rng(7)
    lam = ref.beta(0.4, 0.4)
    perm = ref.permutation(4)
    assert np.allclose(xm, lam * x + (1 - lam) * x[perm])
    assert np.allclose(ym, lam * y + (1 - lam) * y[perm]) and np.allclose(ym.sum(1), 1)
    assert np.allclose(swm, lam * sw + (1 - lam) * sw[perm]) and swm.dtype == np.float32


def test_cached_sequence_mixes_each_batch_the_same_way_every_time():
    cache = np.arange(2 * 8 * 3, dtype=np.float32).reshape(2, 8, 3)  # 2 copies of 8 cached activations
    y = np.eye(2, dtype=np.float32)[[0, 1] * 4]
    seq = T._CachedSequence(cache, y, np.ones(8, np.float32), 4, 0, 0.4)
    x0, y0, _ = seq[0]
    assert np.allclose(y0.sum(1), 1) and not np.all(np.isin(y0, (0.0, 1.0)))  # soft rows: mixed labels
    again = seq[0]
    assert np.array_equal(x0, again[0]) and np.array_equal(y0, again[1])
    plain = T._CachedSequence(cache, y, np.ones(8, np.float32), 4, 0)[0]
    assert np.all(np.isin(plain[1], (0.0, 1.0)))  # no mixup: the rows as given


@pytest.mark.slow
def test_mixup_training_end_to_end(tiny_tree, tmp_path):
    """The plain tf.data path (a small CNN trained from scratch); mixup on cached activations of a pretrained trunk
    is test_two_phase_training_cached_and_plain[True-bfloat16-extra0]."""
    args = ["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "simple_cnn", "--weights", "none",
            "--input-size", "32", "--head-epochs", "1", "--fine-tune-epochs", "1", "--augment-copies", "1",
            "--batch-size", "8", "--out-dir", str(tmp_path), "--name", "m", "--quiet", "--mixup", "0.4"]
    assert train.main(args) == 0
    meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
    assert meta["config"]["mixup"] == 0.4 and meta["training"]["cut_layer"] is None
    assert "--mixup 0.4" in meta["command"]
    p = load_classifier(tmp_path / "m", backend="keras").predict_proba(np.zeros((2, 40, 40, 3), np.uint8))
    assert np.allclose(p.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("extra,says", [(["--head-units", "0", "--logistic-c", "1"], "--mixup"),
                                        (["--patches", "2"], "mixes whole images"), (["--mixup", "-1"], "0 (off) or above")])
def test_mixup_refuses_what_it_cannot_honour_before_decoding(tiny_tree, tmp_path, capsys, extra, says):
    args = ["--dataset", "folder", "--data-dir", str(tiny_tree), "--weights", "none", "--mixup", "0.2",
            "--out-dir", str(tmp_path), "--quiet", *extra]
    assert train.main(args) == 2
    err = capsys.readouterr()
    text = err.out + err.err
    assert says in text and "Traceback" not in text and "Decoded" not in text and "Dataset folder" not in text


@pytest.mark.parametrize("joint", ["classifier", "segmenter", "segmenter_elastic"])
def test_augmenter_pair_moves_each_mask_with_its_image(joint):
    """--aux-mask and segmentation training (with --elastic too): the random geometry of an image is its mask's too;
    brightness/contrast leave the mask binary (both go through core.training.common.joint_geometry)."""
    from core.training.segment import make_joint_augmenter

    img = np.full((16, 32, 32, 3), 40.0, np.float32)
    masks = np.zeros((16, 32, 32, 1), np.float32)
    img[:, 4:14, 6:20] = 220.0  # a bright lesion off-centre, its mask beneath it
    masks[:, 4:14, 6:20] = 1.0
    pair = (T.make_augmenter(3, flip="horizontal_and_vertical", rotation=0.1).pair if joint == "classifier"
            else make_joint_augmenter(3, flip="horizontal_and_vertical", rotation=0.1,
                                      elastic=1.0 if joint == "segmenter_elastic" else 0.0))
    out, m = (np.asarray(a) for a in pair(img, masks))
    assert out.shape == img.shape and m.shape == masks.shape and np.all(np.isin(m, (0.0, 1.0)))
    assert not np.array_equal(m, masks)  # the geometry did move them
    for o, k in zip(out, m[..., 0] > 0):
        assert k.any() and o[k].mean() > 150 > o[~k].mean()  # the lesion is still where its mask says


def test_mask_targets_are_each_grid_cells_lesion_share():
    m = np.zeros((2, 4, 4, 1), np.float32)
    m[0, :2, :2] = 1.0  # top-left cell full
    m[1, 2:, 2] = 1.0  # half of the bottom-right cell
    got = np.asarray(T.mask_targets(m, (2, 2)))
    assert got.shape == (2, 4)
    assert np.allclose(got, [[1, 0, 0, 0], [0, 0, 0, 0.5]])


def test_cached_sequence_gives_each_drawn_copy_its_own_mask_targets():
    from core.models import OUTPUT_NAME

    cache = np.arange(3 * 8, dtype=np.float32).reshape(3, 8, 1)  # activation = copy * 8 + image
    aux = np.broadcast_to(cache, (3, 8, 5)).copy()  # mask rows tagged the same way
    seq = T._CachedSequence(cache, np.arange(8) % 2, np.ones(8, np.float32), 4, 0, aux=aux)
    for i in range(len(seq)):
        x, y, _ = seq[i]
        assert set(y) == {OUTPUT_NAME, T.AUX_MASK_NAME}
        assert np.array_equal(y[T.AUX_MASK_NAME], np.repeat(x, 5, axis=1))
        assert np.array_equal(y[OUTPUT_NAME], (x[:, 0].astype(int) % 8) % 2)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.slow
def test_aux_mask_training_end_to_end(tiny_busi_tree, tmp_path, cache):
    """train.py --aux-mask: trains with the lesion-map head, saves the one-output classifier."""
    if cache and not DENSENET_WEIGHTS.is_file():
        pytest.skip("shared DenseNet121 weights not available")
    # cached: a head-only fit on a pretrained trunk, so the cut has to move back to the mask head's feature map
    model = (["--weights", str(DENSENET_WEIGHTS), "--fine-tune-epochs", "0"] if cache
             else ["--backbone", "simple_cnn", "--weights", "none", "--fine-tune-epochs", "1"])
    args = ["--dataset", "busi", "--data-dir", str(tiny_busi_tree), *model, "--input-size", "32",
            "--head-epochs", "1", "--augment-copies", "1", "--batch-size", "8",
            "--out-dir", str(tmp_path), "--name", "m", "--quiet", "--aux-mask", "0.5"]
    assert train.main(args) == 0
    meta = json.loads((tmp_path / "m" / "metadata.json").read_text())
    aux = meta["training"]["auxiliary_mask"]
    assert meta["config"]["aux_mask"] == 0.5 and aux["weight"] == 0.5 and "--aux-mask 0.5" in meta["command"]
    assert aux["feature_layer"] == meta["gradcam_layer"] and len(aux["grid"]) == 2
    # head only would cache the pooled features; the mask head needs the cut at its feature map ("relu") or before
    assert meta["training"]["cut_layer"] == ("bn" if cache else None)
    hist = read_csv(tmp_path / "m" / "history.csv")
    assert {"accuracy", "val_accuracy", "aux_mask_loss", "val_aux_mask_loss"} <= set(hist[0])
    clf = load_classifier(tmp_path / "m", backend="keras")
    assert len(clf.model.outputs) == 1 and not any(T.AUX_MASK_NAME in l.name for l in clf.model.layers)
    p = clf.predict_proba(np.zeros((2, 40, 40, 3), np.uint8))
    assert p.shape == (2, 3) and np.allclose(p.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("extra,says", [(["--mixup", "0.2"], "no --mixup"), (["--aux-mask", "-1"], "0 (off) or above"),
                                        (["--patches", "2"], "whole images")])
def test_aux_mask_refuses_what_it_cannot_honour_before_decoding(tiny_busi_tree, tmp_path, capsys, extra, says):
    args = ["--dataset", "busi", "--data-dir", str(tiny_busi_tree), "--weights", "none", "--aux-mask", "0.5",
            "--out-dir", str(tmp_path), "--quiet", *extra]
    assert train.main(args) == 2
    err = capsys.readouterr()
    text = err.out + err.err
    assert says in text and "Traceback" not in text and "Decoded" not in text


def test_aux_mask_needs_masks(tiny_tree, tmp_path, capsys):
    args = ["--dataset", "folder", "--data-dir", str(tiny_tree), "--weights", "none", "--aux-mask", "0.5",
            "--head-epochs", "1", "--input-size", "32", "--out-dir", str(tmp_path), "--quiet"]
    assert train.main(args) == 2
    err = capsys.readouterr()
    assert "No lesion masks" in err.out + err.err


def test_classes_a_split_lacks_are_warned_and_recorded(tmp_path, monkeypatch):
    """A class folder with one image lands in one split only: the checkpoint cannot learn it (it used to be written
    without a word). train.py warns and records why in metadata split.warnings; a class absent from validation or
    test is warned too (its recall and ROC AUC there are undefined)."""
    from core.training.classify import check_class_coverage
    from tests.conftest import write_class_tree

    data = write_class_tree(tmp_path / "d", n_per_class=6, size=32)
    (tmp_path / "d" / "rare").mkdir()
    next((tmp_path / "d" / "benign").glob("*.png")).rename(tmp_path / "d" / "rare" / "only.png")
    rc = train.main(["--dataset", "folder", "--data-dir", str(data), "--backbone", "simple_cnn", "--weights", "none",
                     "--input-size", "16", "--head-epochs", "1", "--fine-tune-epochs", "0", "--name", "rare",
                     "--out-dir", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    meta = json.loads((tmp_path / "out" / "rare" / "metadata.json").read_text())
    rare_split = next(s for s, c in meta["split"]["class_counts"].items() if c["rare"] == 1)
    notes = meta["split"]["warnings"]
    assert (rare_split != "train") == any(n.startswith("No training images of rare (1 image(s) in all)") for n in notes)
    for part in ("val", "test"):  # the one image is in one split: every other one is named
        lacks = [n for n in notes if n.startswith(f"The {part} split has no images of ")]
        assert (part != rare_split) == bool(lacks and "rare" in lacks[0].split(":")[0])

    warned = []
    monkeypatch.setattr(T.log, "warning", lambda msg, *args: warned.append(msg % args if args else msg))
    full = check_class_coverage({"train": {"a": 4, "b": 3}, "val": {"a": 1, "b": 1}, "test": {"a": 2, "b": 1}},
                                {"a": 7, "b": 5})
    assert full == [] and warned == []
    notes = check_class_coverage({"train": {"a": 4, "b": 0}, "val": {"a": 1, "b": 1}, "test": {"a": 2, "b": 0}},
                                 {"a": 7, "b": 1})
    assert notes == warned == ["No training images of b (1 image(s) in all): this checkpoint cannot learn it; add "
                               "images (or patients) of it, or remove its folder.",
                               "The test split has no images of b: recall and ROC AUC of it there are undefined."]
