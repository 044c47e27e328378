"""Grad-CAM and Grad-CAM++ with tf.GradientTape on the flat Keras graph."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import numpy as np

from core.explain.base import Explainer

_GRAD_MODELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def gradient_model(model, layer_name: str):
    """A new Model(inputs -> [feature map, penultimate features]); the shared model is not modified."""
    import keras

    per_model = _GRAD_MODELS.setdefault(model, {})
    if layer_name not in per_model:
        final = model.layers[-1]
        per_model[layer_name] = keras.Model(model.inputs, [model.get_layer(layer_name).output, final.input])
    return per_model[layer_name]


def target_logit(model, penultimate, target: int):
    """Pre-softmax score of `target` from the penultimate features (avoids softmax saturation)."""
    import tensorflow as tf

    final = model.layers[-1]
    kernel, bias = final.kernel, final.bias
    return tf.linalg.matvec(penultimate, tf.convert_to_tensor(kernel)[:, target]) + tf.convert_to_tensor(bias)[target]


def default_layer(classifier) -> str:
    from core.models import last_conv_layer

    return classifier.metadata.get("gradcam_layer") or last_conv_layer(classifier.model)


@dataclass(frozen=True)
class GradCAMParams:
    layer: Optional[str] = None  # default: the backbone's last conv activation
    relu: bool = True


class GradCAM(Explainer):
    """Selvaraju et al. 2017: ReLU(sum_k mean(dy/dA_k) A_k), upsampled to the input size."""

    name = "gradcam"
    Params = GradCAMParams
    plus_plus = False

    def _attribute(self, image, target):
        import tensorflow as tf

        layer = self.params.layer or default_layer(self.classifier)
        model = self.classifier.model
        gm = gradient_model(model, layer)
        x = tf.convert_to_tensor(self.classifier.prepare(image)[None])
        with tf.GradientTape() as tape:
            fmap, pen = gm(x, training=False)
            score = target_logit(model, pen, target)
        grads = tape.gradient(score, fmap)[0].numpy().astype(np.float64)
        a = fmap[0].numpy().astype(np.float64)
        if self.plus_plus:
            g2, g3 = grads ** 2, grads ** 3
            denom = 2 * g2 + a.sum(axis=(0, 1), keepdims=True) * g3
            alpha = np.where(grads != 0, g2 / np.where(denom != 0, denom, 1e-7), 0.0)
            weights = (alpha * np.maximum(grads, 0)).sum(axis=(0, 1))
        else:
            weights = grads.mean(axis=(0, 1))
        cam = (a * weights).sum(axis=-1)
        if self.params.relu:
            cam = np.maximum(cam, 0)
        return cam.astype(np.float32), {"resolved": {"layer": layer}, "feature_map_shape": list(a.shape)}


class GradCAMPlusPlus(GradCAM):
    """Chattopadhay et al. 2018: pixel-wise weighted positive gradients (closed form, as pytorch-grad-cam)."""

    name = "gradcam++"
    plus_plus = True
