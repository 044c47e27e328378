"""SHAP through the `shap` package: shap.Explainer with a shap.maskers.Image (blur or inpaint)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from core.explain.base import BATCH_MAX, SEED_MAX, Explainer, bounded, one_of

_MASKERS: dict = {}


def image_masker(mask_value: str, shape: tuple):
    """A shap.maskers.Image; its partition tree (about 1 s to build at 224 px) is built once per (mask, shape).

    Each call gets its own shallow copy, so per-image state (the blur cache) is never shared.
    """
    import copy

    import shap

    key = (mask_value, tuple(shape))
    if key not in _MASKERS:
        if len(_MASKERS) >= 8:
            _MASKERS.pop(next(iter(_MASKERS)))
        _MASKERS[key] = shap.maskers.Image(mask_value, shape)
    masker = copy.copy(_MASKERS[key])
    masker.last_xid, masker._blur_value_cache = None, None
    return masker


@dataclass(frozen=True)
class ShapParams:
    masker: str = one_of("blur", "inpaint_telea", "inpaint_ns")
    blur_kernel: int = bounded(32, 1, 1024)  # blur(k, k), in model-resolution pixels
    max_evals: int = bounded(500, 10, 100000)
    batch_size: Optional[int] = bounded(None, 1, BATCH_MAX)  # default: 4 compiled batches
    seed: int = bounded(0, 0, SEED_MAX)


class ShapExplainer(Explainer):
    """Partition SHAP values over a hierarchical image masking (Lundberg & Lee 2017)."""

    name = "shap"
    Params = ShapParams
    slow = True

    def _attribute(self, image, target):
        import shap

        p = self.params
        work = self.work_image(image).astype(np.float32)
        # masker is one of ShapParams' choices (checked on construction): blur, or an inpainting name shap knows
        mask_value = f"blur({int(p.blur_kernel)},{int(p.blur_kernel)})" if p.masker == "blur" else p.masker
        masker = image_masker(mask_value, work.shape)
        batch = int(p.batch_size or 4 * getattr(self.classifier, "batch_size", 32))
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            self.report(0.95 * done[0] / max(p.max_evals, 1))

        predict = self.predict_fn(done=tick)

        def f(x):
            return predict(np.asarray(x, np.float32))  # masked images are already model-sized 0-255 floats

        state = np.random.get_state()
        np.random.seed(p.seed)
        try:
            explainer = shap.Explainer(f, masker, output_names=list(self.classifier.class_names), seed=p.seed)
            sv = explainer(work[None], max_evals=int(p.max_evals), batch_size=batch,
                           outputs=np.array([target]), silent=True)
        finally:
            np.random.set_state(state)
        values = np.asarray(sv.values)[0]  # (S, S, 3, 1)
        attribution = values.reshape(values.shape[0], values.shape[1], -1).sum(axis=-1)
        base = float(np.ravel(sv.base_values)[0])
        return attribution.astype(np.float32), {"base_value": base, "resolved": {"batch_size": batch,
                                                                                 "mask_value": mask_value}}
