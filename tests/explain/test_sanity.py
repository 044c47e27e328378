"""Sanity checks (model-parameter randomisation, random logit) on the tiny trained model."""
from __future__ import annotations

import numpy as np
import pytest

from core.checkpoints import load_classifier
from core.explain.sanity import (SanityConfig, clone_model, fully_randomised, layer_blocks, randomise_layers,
                                 sanity_checks, similarity)
from tests.conftest import make_class_image


@pytest.fixture(scope="module")
def clf(tiny_bundle):
    return load_classifier(tiny_bundle, backend="keras")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [make_class_image(k % 2, rng, 48) for k in range(3)]


def test_blocks_run_from_input_to_head(clf):
    blocks = layer_blocks(clf.model)
    assert [b for b, _ in blocks] == ["stage 1", "stage 2", "stage 3", "head"]
    assert blocks[0][1] == ["conv1"] and "head_predictions" in blocks[-1][1]


def test_randomising_changes_only_the_named_layers(clf):
    model = clone_model(clf.model)
    randomise_layers(model, ["conv2"], seed=1)
    for a, b in zip(clf.model.layers, model.layers):
        same = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.weights, b.weights))
        assert same == (b.name != "conv2") or not a.weights


def test_similarity_of_identical_and_unrelated_maps():
    rng = np.random.default_rng(0)
    a = rng.random((32, 32))
    s = similarity(a, a)
    assert s["spearman"] == pytest.approx(1.0) and s["ssim"] == pytest.approx(1.0)
    t = similarity(a, rng.random((32, 32)))
    assert abs(t["spearman"]) < 0.2 and t["ssim"] < 0.2
    assert similarity(np.zeros((8, 8)), a[:8, :8]) == {"spearman": None, "ssim": None}


def test_gradcam_similarity_falls_as_the_network_is_randomised(clf, images):
    res = sanity_checks(clf, images, SanityConfig(methods=("gradcam",), independent=True))
    g = res["methods"]["gradcam"]
    assert [s["randomised"] for s in g["cascading"]][-1] == ["head", "stage 3", "stage 2", "stage 1"]
    last = g["cascading"][-1]
    assert last["spearman"] < 0.5 and last["ssim"] < 0.9 and g["passed"] is True
    assert len(g["independent"]) == 4 and [s["randomised"] for s in g["independent"]][0] == ["head"]
    logit = g["random_logit"]
    assert logit["n_defined"] + logit["n_other_map_empty"] + logit["n_reference_empty"] == 3
    assert "0.5" in res["pass_rule"]


def test_constant_output_model_is_reported_not_crashed_on(clf, images):
    model = clone_model(clf.model)
    head = model.get_layer("head_predictions")
    head.kernel.assign(np.zeros(head.kernel.shape, np.float32))
    head.bias.assign(np.array([0.3, -0.3], np.float32))
    from core.explain.sanity import randomised_classifier

    const = randomised_classifier(clf, model)
    p = const.predict_proba(np.stack(images))
    assert np.allclose(p, p[0])
    res = sanity_checks(const, images[:2], SanityConfig(methods=("gradcam", "occlusion"), independent=False))
    for m in ("gradcam", "occlusion"):
        assert res["methods"][m]["passed"] is None and "undefined" in res["methods"][m]["note"]


def test_fully_randomised_classifier_keeps_the_contract(clf, images):
    r = fully_randomised(clf, seed=3)
    assert r.model is not clf.model and r.class_names == clf.class_names
    assert not np.allclose(r.predict_proba(images[0]), clf.predict_proba(images[0]))


def test_a_map_that_goes_blank_counts_as_no_similarity():
    from core.explain.sanity import step_similarity

    ref = np.random.default_rng(0).random((16, 16))
    s = step_similarity(ref, np.zeros((16, 16)))
    assert s["spearman"] is None and s["other_empty"] and not s["reference_empty"]
