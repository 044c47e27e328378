"""Grad-CAM golden values on a hand-built model whose arithmetic can be checked by hand."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def hand_model():
    """image (4,4,3) -> 1x1 conv 'conv' (f0 = R, f1 = G) -> GAP -> Dense(2, softmax), W = [[1,-1],[-1,1]], b = 0."""
    import keras

    from core.checkpoints import Classifier
    from core.models import BackbonePreprocess

    inp = keras.Input((4, 4, 3), name="image")
    x = BackbonePreprocess("raw", name="preprocess")(inp)
    x = keras.layers.Conv2D(2, 1, use_bias=False, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
    out = keras.layers.Dense(2, activation="softmax", name="head_predictions")(x)
    model = keras.Model(inp, out)
    model.get_layer("conv").set_weights([np.array([[[[1, 0], [0, 1], [0, 0]]]], np.float32)])
    model.get_layer("head_predictions").set_weights([np.array([[1, -1], [-1, 1]], np.float32), np.zeros(2, np.float32)])
    return Classifier(model=model, class_names=("a", "b"), input_size=4, metadata={})


def image():
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0] = np.arange(16).reshape(4, 4) * 10  # R: 0..150
    img[..., 1] = 40  # G constant
    return img


def test_gradcam_exact_values(hand_model):
    from core.explain import explain

    e = explain(hand_model, image(), "gradcam", target=0)
    # logit_0 = mean(R) - mean(G): dlogit/dA = [+1/16, -1/16]; cam = relu((R - G) / 16)
    r = image()[..., 0].astype(np.float64)
    expected = np.maximum((r - 40.0) / 16.0, 0)
    np.testing.assert_allclose(e.attribution, expected, rtol=1e-5, atol=1e-5)
    assert e.params["layer"] == "conv"
    e1 = explain(hand_model, image(), "gradcam", target=1)
    np.testing.assert_allclose(e1.attribution, np.maximum((40.0 - r) / 16.0, 0), rtol=1e-5, atol=1e-5)
    signed = explain(hand_model, image(), "gradcam", target=0, relu=False)
    np.testing.assert_allclose(signed.attribution, (r - 40.0) / 16.0, rtol=1e-5, atol=1e-5)


def test_gradcam_plus_plus_on_linear_model(hand_model):
    """Linear score: grads constant (g = ±1/16), so alpha = 1 / (2 + sum(A) g) and weights follow by hand."""
    from core.explain import explain

    e = explain(hand_model, image(), "gradcam++", target=0)
    r = image()[..., 0].astype(np.float64)
    g = 1 / 16
    alpha_r = g * g / (2 * g * g + r.sum() * g ** 3)
    w_r = 16 * alpha_r * g  # summed over 16 positions; the G channel has a negative gradient -> weight 0
    np.testing.assert_allclose(e.attribution, np.maximum(w_r * r, 0), rtol=1e-4, atol=1e-6)


def test_integrated_gradients_completeness(hand_model):
    """IG on a linear logit: attributions sum to logit(x) - logit(baseline)."""
    from core.explain import explain

    e = explain(hand_model, image(), "integrated_gradients", target=0, steps=4, baseline="black")
    r = image()[..., 0].astype(np.float64)
    assert e.attribution.sum() == pytest.approx(r.mean() - 40.0, rel=1e-4)


def test_multi_scale_gradcam_is_the_mean_of_its_scales_maps():
    """A two-scale model (the same 1x1 conv on the 4x4 image and on its 2x2 resize, pooled features concatenated):
    Grad-CAM is the mean of the two scales' maps, the 2x2 one resized to 4x4."""
    import keras

    from core.checkpoints import Classifier
    from core.explain import explain
    from core.explain.base import upsample
    from core.models import BackbonePreprocess

    inp = keras.Input((4, 4, 3), name="image")
    pre = BackbonePreprocess("raw", name="preprocess")
    conv = keras.layers.Conv2D(2, 1, use_bias=False, name="conv")
    full = keras.layers.GlobalAveragePooling2D(name="head_pool")(conv(pre(inp)))
    small = keras.layers.GlobalAveragePooling2D(name="head_pool_2")(
        conv(pre(keras.layers.Resizing(2, 2, name="scale_2")(inp))))
    h = keras.layers.Concatenate(name="head_concat")([full, small])
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="head_predictions")(h))
    conv.set_weights([np.array([[[[1, 0], [0, 1], [0, 0]]]], np.float32)])
    model.get_layer("head_predictions").set_weights(
        [np.array([[1, -1], [-1, 1], [1, -1], [-1, 1]], np.float32), np.zeros(2, np.float32)])
    clf = Classifier(model=model, class_names=("a", "b"), input_size=4, metadata={})
    e = explain(clf, image(), "gradcam", target=0)
    r4 = image()[..., 0].astype(np.float64)
    r2 = np.asarray(keras.layers.Resizing(2, 2)(image()[None].astype(np.float32)))[0, ..., 0].astype(np.float64)
    cam4 = np.maximum((r4 - 40.0) / 16.0, 0)  # d logit / d A = ±1/16 at 4x4
    cam2 = np.maximum((r2 - 40.0) / 4.0, 0)   # ±1/4 at 2x2
    expected = (cam4 + upsample(cam2.astype(np.float32), (4, 4))) / 2
    np.testing.assert_allclose(e.attribution, expected, rtol=1e-4, atol=1e-4)
    assert e.extras["scales"] == 2


def test_ensemble_gradcam_is_the_mean_of_its_members_maps():
    """An ensemble of the hand model and a copy that looks at G - R (`core.models.build_ensemble`): its Grad-CAM
    for a class is the mean of the two members' maps, each scaled to a maximum of 1; its probabilities are the
    softmax of the mean logit, and integrated gradients still add up to the ensemble's logit difference."""
    import keras

    from core.checkpoints import Classifier
    from core.explain import explain
    from core.models import BackbonePreprocess, build_ensemble

    def member(kernel, head):
        inp = keras.Input((4, 4, 3), name="image")
        x = keras.layers.Conv2D(2, 1, use_bias=False, name="conv")(BackbonePreprocess("raw", name="preprocess")(inp))
        x = keras.layers.GlobalAveragePooling2D(name="head_pool")(x)
        model = keras.Model(inp, keras.layers.Dense(2, activation="softmax", name="head_predictions")(x))
        model.get_layer("conv").set_weights([np.array(kernel, np.float32)])
        model.get_layer("head_predictions").set_weights([np.array(head, np.float32), np.zeros(2, np.float32)])
        return model

    a = member([[[[1, 0], [0, 1], [0, 0]]]], [[1, -1], [-1, 1]])  # class 0 score: mean(R) - mean(G)
    b = member([[[[2, 0], [0, 2], [0, 0]]]], [[1, -1], [-1, 1]])  # twice the features: twice the logit
    c = member([[[[0, 1], [1, 0], [0, 0]]]], [[1, -1], [-1, 1]])  # class 0 score: mean(G) - mean(R)
    r = image()[..., 0].astype(np.float64)
    # d(ensemble logit 0)/dA = ±1/(16 * 2): member a's map is ReLU(R - G) / 32, member c's ReLU(G - R) / 32.
    cam_a = np.maximum(r - 40.0, 0) / 32
    cam_c = np.maximum(40.0 - r, 0) / 32
    for members, maps in (((a, b), (cam_a, cam_a)), ((a, c), (cam_a, cam_c))):
        ens = build_ensemble(list(members), 4)
        clf = Classifier(model=ens, class_names=("a", "b"), input_size=4,
                         metadata={"gradcam_layer": ["m1_conv", "m2_conv"]})
        e = explain(clf, image(), "gradcam", target=0)
        expected = np.mean([m / m.max() for m in maps], axis=0)
        np.testing.assert_allclose(e.attribution, expected, rtol=1e-4, atol=1e-4)
        assert e.extras["members"] == 2
    # a + c: logits (mean R - mean G) and (mean G - mean R) cancel: every probability is 1/2.
    np.testing.assert_allclose(clf.predict_proba(image())[0], [0.5, 0.5], atol=1e-6)
    ig = explain(Classifier(model=build_ensemble([a, b], 4), class_names=("a", "b"), input_size=4, metadata={}),
                 image(), "integrated_gradients", target=0)
    assert ig.attribution.sum() == pytest.approx(1.5 * (r.mean() - 40.0), rel=1e-3)  # mean of 1x and 2x
    # Members that share their conv layer (identical weights on the same input) share its call: one map.
    same = build_ensemble([a, member([[[[1, 0], [0, 1], [0, 0]]]], [[2, -2], [-2, 2]])], 4)
    assert "m2_conv" not in [l.name for l in same.layers]
