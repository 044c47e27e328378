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


def test_the_request_pool_serves_batches_at_the_same_time(tiny_bundle, isolated_cache):
    """While one caller holds an infer request (a long batch), another caller's batch still runs: a pool of
    requests, not one lock held by one caller."""
    from concurrent.futures import ThreadPoolExecutor

    clf = load_classifier(tiny_bundle, backend="keras")
    fwd = B.openvino_forward(clf.model, clf.input_size, None, "f32")
    held = fwd.pool.get()  # another session's batch in flight
    s = clf.input_size
    x = np.random.default_rng(0).integers(0, 255, (4, s, s, 3)).astype(np.float32)
    with ThreadPoolExecutor(1) as pool:
        out = pool.submit(fwd, x).result(timeout=30)  # would wait forever behind a single lock
    fwd.pool.put(held)
    assert out.shape == (4, 2) and B.REQUEST_POOL >= 2


def test_perturbation_forward_is_bfloat16_only_where_explanations_agree(tiny_bundle, isolated_cache, tmp_path,
                                                                        monkeypatch):
    import json
    import shutil

    from core.explain import explain
    from tests.conftest import make_class_image

    bundle = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    clf = load_classifier(bundle)
    assert clf.perturbation == "float32"  # nothing recorded: perturbations stay float32
    imgs = [make_class_image(k % 2, np.random.default_rng(k), 48) for k in range(2)]
    res = B.perturbation_agreement(clf, imgs, params={"lime": {"num_samples": 200, "n_segments": 12,
                                                               "random_seed": 0}, "occlusion": {}, "shap": {"max_evals": 60}},
                                   log=lambda *_: None)
    assert {r["method"] for r in res["rows"]} == {"lime", "occlusion", "shap"} and len(res["rows"]) == 6
    assert res["passed"] == all(r["spearman"] is not None and r["spearman"] >= 0.95 and r.get("lime_top5_same", True)
                                for r in res["rows"])
    # judged method by method: one image under 0.95 keeps that method (and only that one) on float32
    rows = [{**r, "spearman": 0.949} if (r["method"], r["image"]) == ("shap", 1) else {**r, "spearman": 0.99}
            for r in res["rows"]]
    rows = [{**r, "lime_top5_same": True} if r["method"] == "lime" else r for r in rows]
    verdict = B.agreement_verdict(rows, ["lime", "occlusion", "shap"])
    assert verdict["passed"] is False and verdict["passed_methods"] == ["lime", "occlusion"]
    assert B.agreement_verdict([{**r, "lime_top5_same": False} if r["method"] == "lime" else r for r in rows],
                               ["lime", "occlusion", "shap"])["passed_methods"] == ["occlusion"]
    (bundle / "fast_forward.json").write_text(json.dumps({**res, "passed": True}))
    monkeypatch.setattr(B, "cpu_has_bf16", lambda: False)  # emulated bfloat16 is slower than float32: not used
    assert load_classifier(bundle).perturbation == "float32"
    monkeypatch.setattr(B, "cpu_has_bf16", lambda: True)
    fast = load_classifier(bundle)
    assert fast.perturbation == "openvino-bf16"
    np.testing.assert_allclose(fast.predict_proba(imgs[0]), clf.predict_proba(imgs[0]), atol=1e-6)  # display: float32
    e = explain(fast, imgs[0], "occlusion")
    assert e.probability == pytest.approx(float(clf.predict_proba(imgs[0])[0][e.target]), abs=1e-6)
    (bundle / "fast_forward.json").write_text(json.dumps({**res, "passed": True, "model_sha256": "other"}))
    assert load_classifier(bundle).perturbation == "float32"  # a record of another model does not count
    (bundle / "fast_forward.json").write_text(json.dumps({**res, "passed": False, "passed_methods": []}))
    assert load_classifier(bundle).perturbation == "float32"
    # lime and occlusion agreed, shap did not: shap's perturbed copies go through float32, the others' bfloat16
    (bundle / "fast_forward.json").write_text(json.dumps({**res, **verdict}))
    part = load_classifier(bundle)
    assert part.perturbation == "openvino-bf16" and part.perturbation_methods == ("lime", "occlusion")
    fast_calls, f32_calls = [], []
    fast_fn, f32_fn = part.predict_perturbed, part.predict_work
    monkeypatch.setattr(part, "predict_perturbed", lambda x, *a, **k: fast_calls.append(len(x)) or fast_fn(x, *a, **k))
    monkeypatch.setattr(part, "predict_work", lambda x, *a, **k: f32_calls.append(len(x)) or f32_fn(x, *a, **k))
    explain(part, imgs[0], "shap", max_evals=60)
    assert f32_calls and not fast_calls
    f32_calls.clear()
    explain(part, imgs[0], "occlusion")
    assert fast_calls and not f32_calls


def test_openvino_runs_a_batch_in_calls_of_ov_batch_images_with_the_same_result(tiny_bundle, isolated_cache,
                                                                               monkeypatch):
    """A batch longer than OV_BATCH goes through in several inference calls; the output is the one-image-at-a-time
    result in order, and an empty batch still gives an empty (0, K) answer."""
    clf = load_classifier(tiny_bundle, backend="keras")
    fwd = B.openvino_forward(clf.model, clf.input_size, None, "f32")
    s = clf.input_size
    x = np.random.default_rng(3).integers(0, 255, (2 * B.OV_BATCH + 3, s, s, 3)).astype(np.float32)
    calls = []
    request = fwd.pool.get()
    real_infer = request.infer

    class Spy:
        def infer(self, inputs):
            calls.append(len(inputs[0]))
            return real_infer(inputs)

    fwd.pool.put(Spy())
    for _ in range(B.REQUEST_POOL - 1):  # only the spy is free
        fwd.pool.get()
    out = fwd(x)
    assert calls == [B.OV_BATCH, B.OV_BATCH, 3]
    ref = B.openvino_forward(clf.model, s, None, "f32")
    one = np.concatenate([ref(x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(out, one, rtol=1e-4, atol=1e-5)
    assert fwd(x[:0]).shape == (0, 2)


def test_a_warm_start_reuses_the_self_check_and_the_compiled_model(tiny_bundle, isolated_cache, monkeypatch):
    """The probe self-check against Keras runs once per IR, OpenVINO version, CPU and precision; later loads read the
    recorded |Δp| and import OpenVINO's compiled blob, with the same predictions. Another runtime checks again."""
    import json

    x = np.random.default_rng(2).integers(0, 255, (6, 48, 48, 3)).astype(np.uint8)
    cold = load_classifier(tiny_bundle, backend="auto")
    p_cold = cold.predict_proba(x)
    sha = cold.metadata["model_sha256"]
    record = isolated_cache / f"{sha}.f32.verified.json"
    rec = json.loads(record.read_text())
    assert rec["max_dp"] == cold.backend_info["max_dp_probe"] <= B.MAX_DP and rec["precision"] == "f32"
    load_classifier(tiny_bundle, backend="auto").predict_proba(x)  # the first cached compile writes the blob
    assert list((isolated_cache / "compiled").glob("*.blob"))
    probes = []
    real = B.keras_reference
    monkeypatch.setattr(B, "keras_reference", lambda *a, **k: probes.append(1) or real(*a, **k))
    warm = load_classifier(tiny_bundle, backend="auto")
    np.testing.assert_allclose(warm.predict_proba(x), p_cold, atol=1e-6)
    assert probes == [] and warm.backend_info["max_dp_probe"] == rec["max_dp"]
    record.write_text(json.dumps({**rec, "openvino": "another version"}))
    again = load_classifier(tiny_bundle, backend="auto")
    again.predict_proba(x)
    assert probes == [1] and json.loads(record.read_text())["openvino"] == rec["openvino"]


def test_segmenter_maps_run_on_openvino_and_a_warm_start_defers_keras(tiny_segmenter, isolated_cache):
    """load_segmenter's 'auto' maps come from OpenVINO float32 within MAX_DP of Keras per pixel; once that passed, a
    later load leaves the Keras model unloaded and gives the same maps and masks."""
    from core.checkpoints import DeferredModel, load_segmenter

    img = np.random.default_rng(3).integers(0, 255, (45, 70, 3)).astype(np.uint8)
    ref = load_segmenter(tiny_segmenter, backend="keras")
    p_ref = ref.predict_proba_map(img)
    assert ref.backend_info["backend"] == "keras float32"
    cold = load_segmenter(tiny_segmenter, backend="auto")
    p_cold = cold.predict_proba_map(img)
    assert cold.backend_info["backend"] == "openvino float32" and cold.backend_info["max_dp_probe"] <= B.MAX_DP
    np.testing.assert_allclose(p_cold, p_ref, atol=B.MAX_DP)
    warm = load_segmenter(tiny_segmenter, backend="auto")
    assert isinstance(warm.model, DeferredModel)
    np.testing.assert_allclose(warm.predict_proba_map(img), p_cold, atol=1e-6)
    assert isinstance(warm.model, DeferredModel)  # the maps never needed the Keras graph
    assert np.array_equal(warm.predict_mask(img), cold.predict_mask(img))
    assert warm.keras_model().output_shape[-1] == 1  # still loadable on demand (training code, diagnostics)


def test_a_long_batch_is_spread_over_free_requests_one_per_stream(tiny_bundle, isolated_cache):
    """With several OpenVINO streams (the perturbation forward's BATCH_HINT) a batch of several OV_BATCH calls runs on
    as many free infer requests at once (never waiting for a second one); the output is in order and equal to one
    request's, and an inference error in a helper thread reaches the caller."""
    import threading

    clf = load_classifier(tiny_bundle, backend="keras")
    fwd = B.openvino_forward(clf.model, clf.input_size, None, "f32", B.BATCH_HINT)
    s = clf.input_size
    x = np.random.default_rng(4).integers(0, 255, (4 * B.OV_BATCH + 1, s, s, 3)).astype(np.float32)
    seen: dict = {}
    requests = [fwd.pool.get() for _ in range(B.REQUEST_POOL)]

    class Spy:
        def __init__(self, k, request, fail=False):
            self.k, self.request, self.fail = k, request, fail

        def infer(self, inputs):
            seen.setdefault(self.k, set()).add(threading.get_ident())
            if self.fail:
                raise RuntimeError("device lost")
            return self.request.infer(inputs)

    for k, r in enumerate(requests):
        fwd.pool.put(Spy(k, r))
    out = fwd(x)
    expected = min(fwd.streams, B.REQUEST_POOL, 5)
    assert len(seen) == expected and len(set.union(*seen.values())) == expected  # one thread per request
    single = B.openvino_forward(clf.model, s, None, "f32")
    for _ in range(B.REQUEST_POOL - 1):
        single.pool.get()  # a pool of one: the same batch through one request
    np.testing.assert_allclose(out, single(x), rtol=1e-5, atol=1e-6)
    if fwd.streams > 1:
        spies = [fwd.pool.get() for _ in range(B.REQUEST_POOL)]
        for k, spy in enumerate(spies):
            fwd.pool.put(Spy(k, spy.request, fail=k > 0))
        with pytest.raises(RuntimeError, match="device lost"):
            fwd(x)
