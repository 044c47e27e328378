"""Bundles: atomic replacement, integrity checks, and the classifier contract."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from core.checkpoints import list_bundles, load_classifier, verify_bundle, write_bundle
from core.errors import CheckpointError


def test_write_bundle_is_atomic(tmp_path):
    dest = tmp_path / "b"

    def fill(v):
        def _f(tmp):
            (tmp / "a.txt").write_text(v)
        return _f

    write_bundle(dest, fill("one"))
    assert (dest / "a.txt").read_text() == "one"

    def broken(tmp):
        (tmp / "a.txt").write_text("half")
        raise KeyboardInterrupt  # killed midway

    with pytest.raises(KeyboardInterrupt):
        write_bundle(dest, broken)
    assert (dest / "a.txt").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["b"], "no temporary folder left behind"
    write_bundle(dest, fill("two"))
    assert (dest / "a.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_classifier_contract_any_size(tiny_bundle):
    clf = load_classifier(tiny_bundle)
    assert clf.class_names == ("benign", "malignant") and clf.input_size == 32
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (50, 70, 3), dtype=np.uint8), rng.integers(0, 255, (20, 20, 3), dtype=np.uint8),
            rng.integers(0, 255, (64, 64), dtype=np.uint8)]
    p = clf.predict_proba(imgs)
    assert p.dtype == np.float32 and p.shape == (3, 2)
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-5)
    one = clf.predict_proba(imgs[0])
    np.testing.assert_allclose(one[0], p[0], rtol=1e-5, atol=1e-6)
    batch = rng.integers(0, 255, (70, 32, 32, 3), dtype=np.uint8)  # more than one batch, padded tail
    pb = clf.predict_proba(batch)
    assert pb.shape == (70, 2)
    np.testing.assert_allclose(pb[-1], clf.predict_proba(batch[-1])[0], atol=1e-5)


def test_predict_proba_converts_any_image_array_and_names_an_unusable_one(tiny_bundle):
    """A single grey, one-channel, RGBA, bool or 16-bit array predicts as its RGB uint8 form (these used to fail
    with an unpacking error or an OpenVINO shape error, or clip 16-bit data to white); an empty or 1-D array is
    an InvalidImageError that says what it got."""
    from core.errors import InvalidImageError

    clf = load_classifier(tiny_bundle)
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 255, (40, 48), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    ref = clf.predict_proba(rgb)
    for arr in (grey, grey[..., None], np.dstack([rgb, np.full_like(grey, 255)])):
        np.testing.assert_allclose(clf.predict_proba(arr), ref, atol=1e-6)
    twelve_bit = (rgb.astype(np.int64) * 4095 // 255).astype(np.uint16)  # a 12-bit scan in 16-bit storage
    np.testing.assert_allclose(clf.predict_proba(twelve_bit), ref, atol=0.02)
    mask = grey > 127
    np.testing.assert_allclose(clf.predict_proba(mask), clf.predict_proba(mask.astype(np.uint8) * 255), atol=1e-6)
    for bad, words in ((np.zeros((0, 0, 3), np.uint8), "empty"), (np.zeros(10, np.uint8), "got shape"),
                       (np.zeros((8, 8, 2), np.uint8), "1, 3 or 4 channels")):
        with pytest.raises(InvalidImageError, match=words):
            clf.predict_proba(bad)


def test_tampered_model_refused(tiny_bundle, tmp_path):
    b = tmp_path / "t"
    shutil.copytree(tiny_bundle, b)
    data = (b / "model.keras").read_bytes()
    (b / "model.keras").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="sha256"):
        load_classifier(b)


def three_class_copy(bundle, dest):
    """A copy of a two-class bundle whose metadata names three classes (the model file is untouched)."""
    shutil.copytree(bundle, dest)
    meta = json.loads((dest / "metadata.json").read_text())
    meta["class_names"] = ["a", "b", "c"]
    (dest / "metadata.json").write_text(json.dumps(meta))
    return dest


def test_class_count_mismatch_refused(tiny_bundle, tmp_path):
    with pytest.raises(CheckpointError, match="3"):
        load_classifier(three_class_copy(tiny_bundle, tmp_path / "t"))


def test_missing_pieces(tmp_path, tiny_bundle):
    with pytest.raises(CheckpointError, match="not found"):
        verify_bundle(tmp_path / "none")
    b = tmp_path / "m"
    shutil.copytree(tiny_bundle, b)
    (b / "model.keras").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        verify_bundle(b)
    assert list_bundles(tmp_path) == [b]


def test_warm_start_predicts_on_openvino_while_keras_loads_behind(tiny_bundle, tmp_path, monkeypatch):
    """With the converted model cached, load_classifier returns without loading the Keras model (deferred to first use),
    predicts and scores out-of-distribution the same as Keras, and hands over the Keras model when asked."""
    from core.checkpoints import DeferredModel

    pytest.importorskip("openvino")
    monkeypatch.setenv("BREASTXAI_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 40, 52, 3), dtype=np.uint8)
    cold = load_classifier(tiny_bundle)  # converts and caches
    assert not isinstance(cold.__dict__["_model"], DeferredModel)
    p_cold = cold.predict_proba(images)
    f_cold = cold.features(images)
    warm = load_classifier(tiny_bundle)
    assert isinstance(warm.__dict__["_model"], DeferredModel)
    assert np.allclose(warm.predict_proba(images), p_cold, atol=1e-4)
    assert warm.backend_info["backend"] == "openvino float32"
    assert np.allclose(warm.features(images), f_cold, atol=1e-3)
    keras_clf = load_classifier(tiny_bundle, backend="keras")
    assert np.allclose(warm.predict_proba(images), keras_clf.predict_proba(images), atol=1e-4)
    assert warm.model.count_params() == keras_clf.model.count_params()  # first use loads the Keras model
    # A warm cache does not let a bundle whose metadata disagrees with the model through.
    with pytest.raises(CheckpointError, match="3"):
        load_classifier(three_class_copy(tiny_bundle, tmp_path / "t"))


def test_the_path_to_a_prediction_imports_no_explainer_library():
    """Loading a model imports no explainer, and the dashboard's page modules import neither scikit-learn, LIME nor
    SHAP (about 1, 1 and 2.4 s to import on a 2-core CPU): the first prediction on screen waits for none of them."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys; sys.path.insert(0, 'dashboard'); import core.checkpoints; "
            "assert not [m for m in sys.modules if m.startswith('core.explain')], 'an explainer is imported'; "
            "import components, services; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'lime', 'shap'}); "
            "assert not bad, bad")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
