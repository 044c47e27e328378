"""Inference backends: OpenVINO bfloat16 is used only where it agrees with float32 Keras (core.backends)."""
from __future__ import annotations

import numpy as np
import pytest

import core.backends as B
from core.checkpoints import load_classifier

pytest.importorskip("openvino")


@pytest.fixture()
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BREASTXAI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "openvino"


def test_auto_backend_agrees_with_keras_and_caches_the_converted_model(tiny_bundle, isolated_cache):
    x = np.random.default_rng(0).integers(0, 255, (20, 48, 48, 3)).astype(np.uint8)
    ref = load_classifier(tiny_bundle, backend="keras")
    fast = load_classifier(tiny_bundle, backend="auto")
    p_ref, p_fast = ref.predict_proba(x), fast.predict_proba(x)
    assert ref.backend_info["backend"] == "keras float32"
    assert fast.backend_info["backend"] == "openvino float32", fast.backend_info
    assert np.abs(p_fast - p_ref).max() <= 1e-4  # float32: the same numbers up to summation order
    assert fast.backend_info["max_dp_probe"] <= B.MAX_DP
    sha = fast.metadata["model_sha256"]
    assert (isolated_cache / f"{sha}.xml").is_file() and (isolated_cache / f"{sha}.bin").is_file()
    assert (isolated_cache / f"{sha}.keras-probe.json").is_file()  # a warm start skips the Keras self-check pass
    again = load_classifier(tiny_bundle, backend="openvino")  # reads the cached IR
    np.testing.assert_allclose(again.predict_proba(x), p_fast, atol=1e-6)


def test_a_disagreeing_backend_is_refused(tiny_bundle, isolated_cache, monkeypatch):
    monkeypatch.setattr(B, "openvino_forward", lambda *a, **k: (lambda b: np.full((len(b), 2), 0.5, np.float32)))
    clf = load_classifier(tiny_bundle, backend="auto")
    x = np.random.default_rng(1).integers(0, 255, (4, 48, 48, 3)).astype(np.uint8)
    p = clf.predict_proba(x)
    assert clf.backend_info["backend"] == "keras float32" and "differs" in clf.backend_info["reason"]
    np.testing.assert_allclose(p, load_classifier(tiny_bundle, backend="keras").predict_proba(x), atol=1e-6)
    strict = load_classifier(tiny_bundle, backend="openvino")
    with pytest.raises(RuntimeError, match="differs"):
        strict.predict_proba(x)


def test_environment_selects_the_backend(monkeypatch):
    monkeypatch.setenv("BREASTXAI_BACKEND", "keras")
    assert B.requested_backend() == "keras"
    assert B.requested_backend("openvino") == "openvino"
    assert B.requested_backend("openvino-bf16") == "openvino-bf16"
    with pytest.raises(ValueError, match="backend must be one of"):
        B.requested_backend("tensorrt")


def test_bfloat16_is_opt_in_and_close(tiny_bundle, isolated_cache):
    x = np.random.default_rng(2).integers(0, 255, (8, 48, 48, 3)).astype(np.uint8)
    bf = load_classifier(tiny_bundle, backend="openvino-bf16")
    p = bf.predict_proba(x)
    assert bf.backend_info["backend"] == "openvino bfloat16"
    assert np.abs(p - load_classifier(tiny_bundle, backend="keras").predict_proba(x)).max() <= 0.05


def test_concurrent_callers_share_one_compiled_model(tiny_bundle, isolated_cache):
    """Dashboard sessions run in threads and share the cached classifier."""
    from concurrent.futures import ThreadPoolExecutor

    clf = load_classifier(tiny_bundle, backend="openvino")
    xs = [np.random.default_rng(i).integers(0, 255, (6, 48, 48, 3)).astype(np.uint8) for i in range(8)]
    expected = [clf.predict_proba(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(clf.predict_proba, xs))
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-6)
