"""One contract test parametrised over every explainer (type, shape, range, seeds, progress, no mutation)."""
from __future__ import annotations

import numpy as np
import pytest

from core.explain import EXPLAINERS, Explanation, explain

FAST = {
    "gradcam": {},
    "gradcam++": {},
    "lime": {"num_samples": 64, "n_segments": 12},
    "shap": {"max_evals": 64, "blur_kernel": 8},
    "occlusion": {"window": 8, "stride": 8},
    "integrated_gradients": {"steps": 8},
}
SEEDS = {"lime": "random_seed", "shap": "seed"}


def test_registry_has_required_methods():
    assert {"gradcam", "gradcam++", "lime", "shap", "occlusion", "integrated_gradients"} <= set(EXPLAINERS)


@pytest.mark.parametrize("method", sorted(FAST))
def test_contract(method, tiny_classifier, test_image):
    calls = []
    e = explain(tiny_classifier, test_image, method, progress=calls.append, **FAST[method])
    assert isinstance(e, Explanation) and e.method == method
    assert e.attribution.dtype == np.float32 and e.attribution.shape == test_image.shape[:2]
    assert np.isfinite(e.attribution).all()
    h = e.heatmap()
    assert h.shape == test_image.shape[:2] and h.min() >= 0 and h.max() <= 1
    probs = tiny_classifier.predict_proba(test_image)[0]
    assert e.target == int(np.argmax(probs)) and e.probability == pytest.approx(float(probs[e.target]), abs=1e-6)
    for k, v in FAST[method].items():
        assert e.params[k] == v
    assert e.seconds > 0 and calls and calls[-1] == 1.0 and all(0 <= c <= 1 for c in calls)
    with pytest.raises(TypeError):
        EXPLAINERS[method](tiny_classifier, not_a_parameter=1)


@pytest.mark.parametrize("method", sorted(FAST))
def test_same_seed_same_result_and_explicit_target(method, tiny_classifier, test_image):
    a = explain(tiny_classifier, test_image, method, target=1, **FAST[method])
    b = explain(tiny_classifier, test_image, method, target=1, **FAST[method])
    assert a.target == 1
    np.testing.assert_allclose(a.attribution, b.attribution, rtol=1e-5, atol=1e-6)


def test_lime_different_seed_differs(tiny_classifier, test_image):
    a = explain(tiny_classifier, test_image, "lime", random_seed=1, **FAST["lime"])
    b = explain(tiny_classifier, test_image, "lime", random_seed=2, **FAST["lime"])
    assert not np.allclose(a.attribution, b.attribution)


def test_explainers_do_not_mutate_the_model(tiny_classifier, test_image):
    model = tiny_classifier.model
    before = [w.copy() for w in model.get_weights()]
    n_layers, trainable = len(model.layers), [l.trainable for l in model.layers]
    for method in FAST:
        explain(tiny_classifier, test_image, method, **FAST[method])
    assert len(model.layers) == n_layers and [l.trainable for l in model.layers] == trainable
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_heatmap_robust_to_constant_map():
    e = Explanation("x", 0, 0.5, np.full((4, 4), 3.0, np.float32), {}, 0.0)
    assert e.heatmap().max() == pytest.approx(1.0, abs=1e-5)
    z = Explanation("x", 0, 0.5, np.zeros((4, 4), np.float32), {}, 0.0)
    assert np.all(z.heatmap() == 0) and np.isfinite(z.heatmap()).all()
    neg = Explanation("x", 0, 0.5, -np.ones((4, 4), np.float32), {}, 0.0)
    assert np.all(neg.heatmap() == 0)


def test_all_negative_map_is_flagged_and_its_signed_view_is_not_blank():
    a = -np.arange(16, dtype=np.float32).reshape(4, 4)
    e = Explanation("lime", 1, 0.2, a, {}, 0.0, extras={"segment_weights": {0: -0.3, 1: -0.1}})
    assert not e.has_positive_evidence and np.all(e.heatmap() == 0)
    flipped = e.against()
    assert flipped.heatmap()[3, 3] == pytest.approx(1.0, abs=1e-5) and flipped.heatmap()[0, 0] == 0
    assert flipped.extras["segment_weights"] == {0: 0.3, 1: 0.1} and e.extras["segment_weights"][0] == -0.3
    assert Explanation("x", 0, 0.5, a + 20, {}, 0.0).has_positive_evidence


@pytest.mark.parametrize("method", sorted(FAST))
def test_perturbation_methods_report_how_far_they_moved_the_prediction(method, tiny_classifier, test_image):
    """perturbed_range is the lowest and highest p(target) over exactly the images the method sent to the
    perturbation forward pass; gradient methods perturb nothing and report None."""
    from dataclasses import replace

    seen = []

    def recording(x):
        out = tiny_classifier.predict_perturbed(x)
        seen.append(np.asarray(out))
        return out

    clf = replace(tiny_classifier)
    clf.predict_perturbed = recording
    e = explain(clf, test_image, method, **FAST[method])
    if method in ("lime", "shap", "occlusion"):
        p = np.concatenate(seen)[:, e.target]
        assert e.perturbed_range == pytest.approx((float(p.min()), float(p.max())), abs=1e-7)
        assert e.perturbed_range[0] < e.perturbed_range[1]
        assert e.weak_effect == (float(p.max() - p.min()) < 0.01)
    else:
        assert not seen and e.perturbed_range is None and not e.weak_effect


def test_weak_effect_is_a_range_under_one_point():
    a = np.ones((4, 4), np.float32)
    assert Explanation("lime", 1, 0.9, a, {}, 0.0, extras={"perturbed_probability": [0.995, 0.9999]}).weak_effect
    assert not Explanation("lime", 1, 0.9, a, {}, 0.0, extras={"perturbed_probability": [0.95, 0.99]}).weak_effect
    assert not Explanation("gradcam", 1, 0.9, a, {}, 0.0).weak_effect


@pytest.mark.parametrize("seg", ["slic", "quickshift", "felzenszwalb"])
def test_lime_segmentations_and_hide_colors(seg, tiny_classifier, test_image):
    for hide in ("mean", "black", "blur"):
        e = explain(tiny_classifier, test_image, "lime", segmentation=seg, hide_color=hide, num_samples=32,
                    n_segments=10, kernel_size=2, max_dist=20, scale=50, min_size=10)
        assert e.segments.shape == test_image.shape[:2] and e.extras["n_segments_found"] >= 2


def test_lime_greyscale_and_positive_only(tiny_classifier, test_image):
    grey = test_image.mean(axis=2).astype(np.uint8)
    e = explain(tiny_classifier, grey, "lime", positive_only=True, num_features=3, **FAST["lime"])
    assert e.attribution.shape == grey.shape and e.attribution.min() >= 0
    assert len(np.unique(e.attribution[e.attribution > 0])) <= 3


@pytest.mark.parametrize("method,params,words", [
    ("lime", {"num_samples": 0}, "num_samples must be a whole number from 10 to 20000, not 0"),
    ("lime", {"num_samples": 2.5}, "whole number"),
    ("lime", {"n_segments": 1}, "n_segments"),
    ("lime", {"kernel_size": float("inf")}, "kernel_size must be a number above 0"),
    ("lime", {"hide_color": "red"}, "hide_color must be one of 'mean', 'black', 'blur'"),
    ("lime", {"positive_only": "yes"}, "positive_only must be true or false"),
    ("lime", {"segmentation": "watershed"}, "segmentation must be one of"),
    ("shap", {"max_evals": 1}, "max_evals"),
    ("shap", {"seed": "x"}, "seed must be a whole number"),
    ("occlusion", {"window": 0}, "window"),
    ("occlusion", {"stride": -3}, "stride"),
    ("integrated_gradients", {"steps": 0}, "steps"),
    ("integrated_gradients", {"batch_size": True}, "batch_size"),
    ("gradcam", {"relu": "no"}, "relu must be true or false"),
])
def test_out_of_range_parameters_fail_at_construction_with_the_allowed_values(method, params, words,
                                                                                tiny_classifier):
    with pytest.raises(ValueError, match=words):
        EXPLAINERS[method](tiny_classifier, **params)


def test_whole_number_floats_become_ints_and_defaults_pass(tiny_classifier):
    for method, cls in EXPLAINERS.items():
        assert cls(tiny_classifier).params == cls.Params()  # every default is inside its own range
    lime = EXPLAINERS["lime"](tiny_classifier, num_samples=300.0, random_seed=np.int64(3))
    assert lime.params.num_samples == 300 and type(lime.params.num_samples) is int
    assert type(lime.params.random_seed) is int


def test_unknown_method():
    with pytest.raises(ValueError, match="Unknown method"):
        explain(None, np.zeros((8, 8, 3), np.uint8), "magic")


def test_fast_lime_sampling_matches_lime_exactly():
    """Our vectorised data_labels gives lime's own data and labels for the same seed."""
    import lime.lime_image as li

    from core.explain.lime_explainer import _fast_explainer_class, _no_bar

    li.tqdm = _no_bar
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    fudged = np.zeros_like(image)
    segments = (np.arange(24)[:, None] // 6 * 4 + np.arange(24)[None, :] // 6).astype(int)  # 16 blocks
    seen = {"ours": [], "lime": []}

    def fn(key):
        def f(imgs):
            imgs = np.asarray(imgs)
            seen[key].append(imgs.copy())
            return np.stack([imgs.mean(axis=(1, 2, 3)), imgs[:, :12].mean(axis=(1, 2, 3))], 1)
        return f

    d1, l1 = li.LimeImageExplainer(random_state=7).data_labels(image, fudged, segments, fn("lime"), 25, 10)
    d2, l2 = _fast_explainer_class()(random_state=7).data_labels(image, fudged, segments, fn("ours"), 25, 10)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_allclose(l1, l2)
    for a, b in zip(seen["lime"], seen["ours"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method,params,n", [("lime", {"num_samples": 300, "n_segments": 12}, 300),
                                             ("shap", {"max_evals": 300, "blur_kernel": 8}, 300)])
def test_perturbation_progress_moves_every_classifier_batch_with_the_same_answer(method, params, n, tiny_classifier,
                                                                              test_image):
    """LIME and SHAP hand the classifier 4 of its batches at a time; progress is reported after each of its batches
    (every 32 images, not once per 128), with the same map as when each of their batches goes
    through in one call."""
    calls = []
    e = explain(tiny_classifier, test_image, method, progress=calls.append, batch_size=128, **params)
    steps = [c for c in calls if 0 < c < 1]
    assert tiny_classifier.batch_size == 32
    assert len(steps) >= n // 32 - 1 and steps == sorted(steps), calls
    try:
        tiny_classifier.batch_size = 256  # the explainer's chunks now hold a whole LIME / SHAP batch
        whole = explain(tiny_classifier, test_image, method, batch_size=128, **params)
    finally:
        tiny_classifier.batch_size = 32
    np.testing.assert_allclose(e.attribution, whole.attribution, rtol=1e-5, atol=1e-6)
