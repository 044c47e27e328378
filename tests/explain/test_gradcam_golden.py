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
