"""LIME through the `lime` package (LimeImageExplainer), with the caller's choice of segmentation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from core.explain.base import BATCH_MAX, SEED_MAX, Explainer, baseline_image, bounded, one_of, upsample

SEGMENTERS = ("slic", "quickshift", "felzenszwalb")


@dataclass(frozen=True)
class LimeParams:
    segmentation: str = one_of(*SEGMENTERS)
    n_segments: int = bounded(50, 2, 2000)  # SLIC: the "segment count"
    compactness: float = bounded(10.0, 0, 1000, float, above=True)  # SLIC
    kernel_size: float = bounded(4.0, 0, 100, float, above=True)  # quickshift
    max_dist: float = bounded(200.0, 0, 10000, float, above=True)  # quickshift
    ratio: float = bounded(0.2, 0, 1, float)  # quickshift
    scale: float = bounded(100.0, 0, 100000, float, above=True)  # felzenszwalb
    min_size: int = bounded(50, 1, 100000)  # felzenszwalb
    sigma: float = bounded(1.0, 0, 100, float)  # SLIC / felzenszwalb smoothing
    num_samples: int = bounded(1000, 10, 20000)  # lime default 1000
    kernel_width: float = bounded(0.25, 0, 100, float, above=True)  # lime default
    hide_color: str = one_of("mean", "black", "blur")  # mean (per-segment mean, lime's None) | black | blur
    num_features: int = bounded(100000, 1, 100000)  # keep the top-N segments by |weight| (lime default: all)
    positive_only: bool = False
    random_seed: int = bounded(0, 0, SEED_MAX)
    batch_size: Optional[int] = bounded(None, 1, BATCH_MAX)  # images per classifier call; default: 4 compiled batches


def segment(image: np.ndarray, p: LimeParams) -> np.ndarray:
    """Superpixels of a uint8 RGB image (H, W) -> int labels 0..n-1, via lime's scikit-image wrapper."""
    from lime.wrappers.scikit_image import SegmentationAlgorithm

    if p.segmentation == "slic":
        fn = SegmentationAlgorithm("slic", n_segments=int(p.n_segments), compactness=float(p.compactness),
                                   sigma=float(p.sigma), start_label=0)
    elif p.segmentation == "quickshift":
        fn = SegmentationAlgorithm("quickshift", kernel_size=float(p.kernel_size), max_dist=float(p.max_dist),
                                   ratio=float(p.ratio), random_seed=int(p.random_seed))
    elif p.segmentation == "felzenszwalb":
        fn = SegmentationAlgorithm("felzenszwalb", scale=float(p.scale), sigma=float(p.sigma),
                                   min_size=int(p.min_size))
    else:
        raise ValueError(f"segmentation must be one of {SEGMENTERS}, not {p.segmentation!r}")
    seg = np.asarray(fn(image))
    _, seg = np.unique(seg, return_inverse=True)  # lime needs labels 0..n-1
    return seg.reshape(image.shape[:2]).astype(np.int32)


def _no_bar(iterable, *args, **kwargs):
    return iterable


def _fast_explainer_class():
    """LimeImageExplainer whose neighbourhood sampling builds each batch with one vectorised mask.

    Same random draws, same first all-on row, same batches to `classifier_fn` and so the same images and
    labels as lime's own `data_labels` (tested), without its per-sample Python loop over segments.
    Everything else (kernel, weighting, ridge fit, explanation object) is lime's.
    """
    from lime.lime_image import LimeImageExplainer

    class FastLimeImageExplainer(LimeImageExplainer):
        def data_labels(self, image, fudged_image, segments, classifier_fn, num_samples, batch_size=10):
            n_features = np.unique(segments).shape[0]
            data = self.random_state.randint(0, 2, num_samples * n_features).reshape((num_samples, n_features))
            data[0, :] = 1
            labels = []
            for start in range(0, num_samples, batch_size):
                rows = data[start:start + batch_size].astype(bool)
                keep = rows[:, segments]  # (b, H, W): True where the superpixel is on
                imgs = np.where(keep[..., None], image[None], fudged_image[None])
                labels.extend(classifier_fn(imgs))
            return data, np.array(labels)

    return FastLimeImageExplainer


class LimeExplainer(Explainer):
    """Ribeiro et al. 2016, via `lime.lime_image.LimeImageExplainer` on the model-resolution image."""

    name = "lime"
    Params = LimeParams
    stochastic = True
    slow = True

    def _attribute(self, image, target):
        import lime.lime_image as lime_image

        lime_image.tqdm = _no_bar  # lime 0.2 always draws a tqdm bar on stderr; we report progress ourselves
        p = self.params  # checked on construction (checked_params)
        work = self.work_image(image)
        segments = segment(work, p)
        hide = None if p.hide_color == "mean" else baseline_image(work, p.hide_color)
        done = [0]
        batch = int(p.batch_size or 4 * getattr(self.classifier, "batch_size", 32))

        def tick(n: int) -> None:
            done[0] += n
            self.report(0.95 * done[0] / p.num_samples)

        classifier_fn = self.predict_fn(done=tick)

        explainer = _fast_explainer_class()(kernel_width=p.kernel_width, random_state=p.random_seed)
        exp = explainer.explain_instance(
            work, classifier_fn, labels=(target,), top_labels=None, hide_color=hide, num_features=100000,
            num_samples=int(p.num_samples), batch_size=batch, segmentation_fn=lambda _img: segments,
            random_seed=p.random_seed)
        weights = dict(exp.local_exp[target])
        ranked = sorted(weights.items(), key=lambda kv: -abs(kv[1]))
        if p.positive_only:
            ranked = [kv for kv in ranked if kv[1] > 0]
        keep = dict(ranked[: int(p.num_features)])
        lut = np.zeros(int(segments.max()) + 1, np.float32)
        for seg_id, w in keep.items():
            lut[seg_id] = w
        full_segments = upsample(segments, image.shape[:2], nearest=True)
        attribution = lut[full_segments]  # piecewise constant per superpixel at the input resolution
        return attribution, {
            "segments": full_segments, "segment_weights": {int(k): float(v) for k, v in weights.items()},
            "n_segments_found": int(segments.max()) + 1, "score": float(exp.score),
            "intercept": float(exp.intercept[target]), "local_pred": float(np.ravel(exp.local_pred)[0]),
            "resolved": {"batch_size": batch}}
