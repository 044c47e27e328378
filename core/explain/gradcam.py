"""Grad-CAM and Grad-CAM++ with tf.GradientTape on the flat Keras graph."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import numpy as np

from core.explain.base import Explainer, upsample
from core.patches import blend_window, stitch

_GRAD_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_for(model) -> dict:
    """The gradient functions compiled for `model` so far (Grad-CAM's by layer name, integrated gradients' under
    `core.explain.integrated_gradients.INPUT_GRADIENT`), kept while the model lives."""
    return _GRAD_FNS.setdefault(model, {})


def layer_outputs(model, layer_name: str) -> list:
    """Every output of a layer inside `model`'s graph: one per call. A multi-scale model calls each trunk layer
    once per scale (full size first, `core.models._multi_scale`); other models call it once."""
    import keras

    layer = model.get_layer(layer_name)
    outs = [node.output_tensors[0] for node in getattr(layer, "_inbound_nodes", [])]
    if len(outs) <= 1:
        return [layer.output]
    connected = []
    for t in outs:  # keep the calls that belong to this model's graph
        try:
            keras.Model(model.inputs, t)
        except ValueError:
            continue
        connected.append(t)
    return connected or [layer.output]


def layer_names(spec: str) -> list[str]:
    """The layers a Grad-CAM layer spec names: one name, or an ensemble's members' layers joined by '+'."""
    names = [n.strip() for n in spec.split("+") if n.strip()]
    if not names:
        raise ValueError(f"No layer named in {spec!r}.")
    return names


def gradcam_function(model, layer_name: str):
    """Compiled f(x (1, S, S, 3), target (-1 = predicted)) -> (feature maps, d logit_target / d maps, logits).

    Feature maps and gradients are tuples with one (1, h, w, k) entry per call of the layer (one per scale of a
    multi-scale model); `layer_name` may join several layers with '+' (an ensemble's members' layers), their
    calls in that order (`layer_groups` counts them). Built on a new Model(inputs -> [feature maps...,
    penultimate features]) sharing the layers; the shared model is never modified. One forward pass plus the
    backward pass through the head only.
    """
    import keras
    import tensorflow as tf

    per_model = compiled_for(model)
    if layer_name not in per_model:
        final = model.layers[-1]
        groups = [layer_outputs(model, n) for n in layer_names(layer_name)]
        maps = [t for g in groups for t in g]
        gm = keras.Model(model.inputs, [*maps, final.input])

        @tf.function(reduce_retracing=True)
        def fn(x, target):
            with tf.GradientTape() as tape:
                *fmaps, pen = gm(x, training=False)
                tape.watch(fmaps)
                logits = tf.linalg.matmul(pen, tf.convert_to_tensor(final.kernel)) + tf.convert_to_tensor(final.bias)
                t = tf.where(target < 0, tf.argmax(logits[0], output_type=tf.int32), target)
                score = logits[0, t]
            return tuple(fmaps), tuple(tape.gradient(score, fmaps)), logits

        per_model[layer_name] = fn
        per_model[("groups", layer_name)] = [len(g) for g in groups]
    return per_model[layer_name]


def layer_groups(model, layer_name: str) -> list[int]:
    """How many of `gradcam_function(model, layer_name)`'s maps belong to each named layer, in order."""
    gradcam_function(model, layer_name)
    return _GRAD_FNS[model][("groups", layer_name)]


def target_logit(model, penultimate, target: int):
    """Pre-softmax score of `target` from the penultimate features (avoids softmax saturation)."""
    import tensorflow as tf

    final = model.layers[-1]
    kernel, bias = final.kernel, final.bias
    return tf.linalg.matvec(penultimate, tf.convert_to_tensor(kernel)[:, target]) + tf.convert_to_tensor(bias)[target]


def default_layer(classifier) -> str:
    from core.models import last_conv_layer

    layer = classifier.metadata.get("gradcam_layer")
    if isinstance(layer, (list, tuple)):  # an ensemble: every member's layer
        return "+".join(layer)
    return layer or last_conv_layer(classifier.model)


@dataclass(frozen=True)
class GradCAMParams:
    layer: Optional[str] = None  # default: the backbone's last conv activation (an ensemble: each member's, '+'-joined)
    relu: bool = True


class GradCAM(Explainer):
    """Selvaraju et al. 2017: ReLU(sum_k mean(dy/dA_k) A_k), upsampled to the input size."""

    name = "gradcam"
    Params = GradCAMParams
    plus_plus = False

    def _forward_and_attribute(self, image, target):
        import tensorflow as tf

        from core.checkpoints import apply_temperature

        if target is not None:
            self._resolve_target(np.zeros(len(self.classifier.class_names)), target)  # range check
        layer = self.params.layer or default_layer(self.classifier)
        fn = gradcam_function(self.classifier.model, layer)
        groups = layer_groups(self.classifier.model, layer)
        if self.tiled():
            # Patch model: the prediction is the mean over the tile grid. Each tile of a half-step grid
            # gets its own CAM for the image's target class; the CAMs are blended with a smooth window
            # (no seams at tile borders) over the whole work image.
            work = self.work_image(image)
            probs = self.classifier.predict_work(work[None])[0]
            target = self._resolve_target(probs, target)
            s = self.classifier.input_size
            stride = max(1, s // 2)
            xs = self.classifier.tiles(work, stride)
            cams = []
            for i, x in enumerate(xs):
                fmaps, grads, _ = fn(tf.convert_to_tensor(x[None]), tf.constant(target, tf.int32))
                cams.append(upsample(self._cam_all(fmaps, grads, groups), (s, s)))
                self.report(0.95 * (i + 1) / len(xs))
            cam = stitch(np.stack(cams), work.shape[:2], s, stride, blend_window(s))
            return probs, target, cam, {"resolved": {"layer": layer}, "feature_map_shape": list(fmaps[0].shape[1:]),
                                        "n_tiles": len(xs), "tile_stride": stride}
        x = tf.convert_to_tensor(self.classifier.prepare(image)[None])
        fmaps, grads, logits = fn(x, tf.constant(-1 if target is None else int(target), tf.int32))
        z = logits.numpy()[0].astype(np.float64)
        p = np.exp(z - z.max())
        probs = apply_temperature((p / p.sum())[None], getattr(self.classifier, "temperature", 1.0))[0]
        target = self._resolve_target(probs, target)
        cam = self._cam_all(fmaps, grads, groups)
        extra = {"members": len(groups)} if len(groups) > 1 else {"scales": len(fmaps)} if len(fmaps) > 1 else {}
        return probs, target, cam, {"resolved": {"layer": layer}, "feature_map_shape": list(fmaps[0].shape[1:]),
                                    **extra}

    def _cam_all(self, fmaps, grads, groups: Optional[list[int]] = None) -> np.ndarray:
        """One CAM per call of the layer (per scale), each resized to the largest map and averaged: a multi-scale
        model's Grad-CAM is the mean of its scales' maps. With `groups` (maps per layer of an ensemble's
        '+'-joined layers), each member's map is its scales' mean scaled to a maximum of 1, and the ensemble's
        Grad-CAM is the mean of its members' maps."""
        cams = [self._cam(f.numpy()[0], g.numpy()[0]) for f, g in zip(fmaps, grads)]
        groups = groups or [len(cams)]
        shape = max((c.shape for c in cams), key=lambda s: s[0] * s[1])

        def mean(cs):
            return np.mean([c if c.shape == shape else upsample(c, shape) for c in cs], axis=0).astype(np.float32)

        if len(groups) == 1:
            return cams[0] if len(cams) == 1 else mean(cams)
        edges = np.cumsum([0, *groups])
        members = [mean(cams[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        return mean([m / m.max() if m.max() > 0 else m for m in members])

    def _cam(self, fmap: np.ndarray, grads: np.ndarray) -> np.ndarray:
        """Feature map A (h, w, k) and dy/dA (h, w, k) -> CAM (h, w) float32."""
        grads = grads.astype(np.float64)
        a = fmap.astype(np.float64)
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
        return cam.astype(np.float32)


class GradCAMPlusPlus(GradCAM):
    """Chattopadhay et al. 2018: pixel-wise weighted positive gradients (closed form, as pytorch-grad-cam)."""

    name = "gradcam++"
    plus_plus = True
