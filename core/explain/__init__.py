"""Explainers behind one interface: `explain(classifier, image, method, target=None, **params)`."""
from __future__ import annotations

from typing import Optional

import numpy as np

from core.explain.base import Explainer, Explanation, Progress, baseline_image, normalise_positive
from core.explain.gradcam import GradCAM, GradCAMPlusPlus
from core.explain.integrated_gradients import IntegratedGradients
from core.explain.lime_explainer import LimeExplainer
from core.explain.occlusion import OcclusionExplainer
from core.explain.shap_explainer import ShapExplainer

EXPLAINERS: dict[str, type[Explainer]] = {
    cls.name: cls for cls in (GradCAM, GradCAMPlusPlus, LimeExplainer, ShapExplainer, OcclusionExplainer,
                              IntegratedGradients)
}


#: Settings that keep every method within seconds on a laptop CPU (the dashboard's defaults, the report's).
FAST_PARAMS: dict[str, dict] = {"lime": {"num_samples": 300, "n_segments": 50, "num_features": 20},
                                "shap": {"max_evals": 300}, "integrated_gradients": {"steps": 16}}


#: Methods that re-classify the image hundreds of times; refused above MAX_PERTURBATION_TILES model inputs per image.
PERTURBATION_METHODS = ("lime", "shap", "occlusion")
MAX_PERTURBATION_TILES = 16


def explain(classifier, image: np.ndarray, method: str, target: Optional[int] = None,
            progress: Progress = None, **params) -> Explanation:
    """Explain `classifier`'s prediction on a uint8 RGB image with one method by name."""
    if method not in EXPLAINERS:
        raise ValueError(f"Unknown method {method!r}; choose one of {', '.join(EXPLAINERS)}")
    return EXPLAINERS[method](classifier, progress=progress, **params).explain(image, target)


__all__ = ["EXPLAINERS", "FAST_PARAMS", "MAX_PERTURBATION_TILES", "PERTURBATION_METHODS", "Explainer", "Explanation", "explain", "normalise_positive", "baseline_image"]
