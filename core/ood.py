"""Out-of-distribution warning: Mahalanobis distance of pooled backbone features (Lee et al. 2018).

Fitted on the training split's pooled features (PCA to <= 64 dims, class means, Ledoit-Wolf shared
covariance); the threshold is the validation split's (1 - false-alarm rate) quantile, so about 5% of
in-distribution images are flagged by construction. Stored as `ood.npz` in the bundle.

The images the detector was fitted on score higher than new images of the same source (the PCA and covariance fitted
to 472 images in 2112 dimensions stretch along those very images: on busi_densenet121 the training scans' median
distance is 47.5, the validation scans' 33.3, and 19.7% of the training scans were above the threshold against 5.3%
of the validation ones). So an image whose projection lies within `copy_radius` of a training image's, half the
smallest distance from any validation image to its nearest training image, counts as a copy of a training image and
is never flagged (`training_copy`): a user who uploads an image from the public dataset the checkpoint was trained
on gets a verdict. No validation image lies that close, so the false-alarm rate on new images is unchanged.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Collection, Iterable, Mapping, Optional, Sequence

import numpy as np

from core.errors import BreastXAIError

#: head_concat: every scale of a multi-scale model; lesion_pool: the encoder map averaged over the predicted lesion
#: (core.models.LesionPool)
FEATURE_LAYERS = ("head_concat", "head_pool", "head_flatten", "lesion_pool")


#: A training copy lies within this share of the smallest validation-to-training distance of a training image.
COPY_RADIUS_SHARE = 0.5


@dataclass(frozen=True)
class OODDetector:
    mean: np.ndarray  # (D,)
    components: np.ndarray  # (d, D)
    class_means: np.ndarray  # (K, d)
    precision: np.ndarray  # (d, d)
    threshold: float
    false_alarm_rate: float
    train_points: Optional[np.ndarray] = None  # (N, d) float32: the training images' projections
    copy_radius: float = 0.0  # see the module docstring; 0: no image counts as a training copy

    def project(self, features: np.ndarray) -> np.ndarray:
        """Pooled features (N, D) -> their PCA projections (N, d)."""
        return (np.asarray(features, np.float64) - self.mean) @ self.components.T

    def score(self, features: np.ndarray) -> np.ndarray:
        """Min over classes of the squared Mahalanobis distance (N,); larger = less like the training data."""
        z = self.project(features)
        d = z[:, None, :] - self.class_means[None]
        return np.einsum("nkd,de,nke->nk", d, self.precision, d).min(axis=1)

    def copy_distance(self, features: np.ndarray) -> np.ndarray:
        """Euclidean distance (N,) of each projection to the nearest training image's (inf without them)."""
        z = self.project(features)
        if self.train_points is None or len(self.train_points) == 0:
            return np.full(len(z), np.inf)
        t = np.asarray(self.train_points, np.float64)
        sq = (z ** 2).sum(1)[:, None] - 2 * z @ t.T + (t ** 2).sum(1)[None]
        return np.sqrt(np.maximum(sq, 0.0).min(axis=1))

    def training_copy(self, features: np.ndarray) -> np.ndarray:
        """True where the image is a (near-)copy of a training image (within `copy_radius`)."""
        return self.copy_distance(features) <= self.copy_radius if self.copy_radius > 0 else \
            np.zeros(len(np.atleast_2d(features)), bool)

    def check(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, training copies, flagged) of pooled features (N, D): flagged = score above the threshold and
        not a copy of a training image."""
        scores, copies = self.score(features), self.training_copy(features)
        return scores, copies, (scores > self.threshold) & ~copies

    def flag(self, features: np.ndarray) -> np.ndarray:
        """Out of distribution (see `check`)."""
        return self.check(features)[2]

    def save(self, path: Path) -> None:
        extra = {} if self.train_points is None else {"train_points": np.asarray(self.train_points, np.float32),
                                                       "copy_radius": self.copy_radius}
        np.savez(path, mean=self.mean, components=self.components, class_means=self.class_means,
                 precision=self.precision, threshold=self.threshold, false_alarm_rate=self.false_alarm_rate, **extra)

    @classmethod
    def load(cls, path: Path) -> "OODDetector":
        with np.load(path) as z:
            copies = "train_points" in z.files  # detectors fitted before 2026-12-07 have none
            return cls(z["mean"], z["components"], z["class_means"], z["precision"], float(z["threshold"]),
                       float(z["false_alarm_rate"]), z["train_points"] if copies else None,
                       float(z["copy_radius"]) if copies else 0.0)


def fit(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
        false_alarm_rate: float = 0.05, max_dims: int = 64) -> OODDetector:
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    x = np.asarray(train_features, np.float64)
    y = np.asarray(train_labels)
    pca = PCA(n_components=int(min(max_dims, x.shape[0] - 1, x.shape[1])), random_state=0).fit(x)
    z = pca.transform(x)
    classes = np.unique(y)
    means = np.stack([z[y == c].mean(axis=0) for c in classes])
    centred = z - means[np.searchsorted(classes, y)]
    precision = LedoitWolf().fit(centred).precision_
    det = OODDetector(pca.mean_, pca.components_, means, precision, 0.0, false_alarm_rate, z.astype(np.float32))
    thr = float(np.quantile(det.score(val_features), 1 - false_alarm_rate))
    radius = COPY_RADIUS_SHARE * float(det.copy_distance(val_features).min())
    return replace(det, threshold=thr, copy_radius=radius)


def summary(det: OODDetector, layer: str, test_features: np.ndarray,
            train_features: Optional[np.ndarray] = None) -> dict:
    """The metadata.json entry describing a fitted detector, with its flag rate on the test split (and, given the
    training features, the share of training images that score above the threshold: copies, not flagged)."""
    out = {"method": "Mahalanobis distance of pooled backbone features (PCA, Ledoit-Wolf shared covariance, "
                     "class means from the training split); a copy of a training image is never flagged",
           "feature_layer": layer, "file": "ood.npz",
           "threshold": det.threshold, "false_alarm_rate_val": det.false_alarm_rate,
           "test_flagged_rate": float(det.flag(test_features).mean()), "dims": int(det.components.shape[0]),
           "copy_radius": det.copy_radius}
    if train_features is not None:  # the training images the copy rule keeps from being flagged
        out["train_above_threshold_rate"] = float((det.score(train_features) > det.threshold).mean())
    return out


def feature_layer(model) -> str:
    names = {l.name for l in model.layers}
    for n in FEATURE_LAYERS:
        if n in names:
            return n
    raise ValueError(f"model has no pooled feature layer ({' / '.join(FEATURE_LAYERS)})")


def fit_bundle(bundle: str | Path, data_dir: Optional[str] = None, false_alarm_rate: float = 0.05) -> dict:
    """Fit the detector for an existing bundle from its split (needs the dataset); adds ood.npz atomically."""
    from core.checkpoints import load_classifier, update_metadata
    from core.data.roots import bundle_splits

    bundle = Path(bundle)
    clf = load_classifier(bundle)
    splits = bundle_splits(bundle, clf.metadata, data_dir)
    feats = {s: clf.features([splits[s].read(p) for p in splits[s].samples]) for s in ("train", "val", "test")}
    det = fit(feats["train"], np.asarray(splits["train"].labels), feats["val"], false_alarm_rate)
    info = summary(det, feature_layer(clf.model), feats["test"], feats["train"])
    update_metadata(bundle, {"ood": info}, files={"ood.npz": det.save})
    return info


def checkpoints_that_fit(checks: Mapping[str, Optional[dict]], patch_models: Collection[str] = (),
                         modality: Optional[Mapping[str, str]] = None) -> list[str]:
    """Which checkpoints were trained on images like this one: the names whose detector accepts the image
    (`checks`: name -> `Classifier.ood_check` result, None for a checkpoint without a detector, which is left out).
    Whole-image models come before patch models (a patch model's detector scores the mean of its tiles, so it accepts
    most fields of its stain at any magnification, and now and then an ultrasound scan), each group nearest its
    training data first (score / threshold; a checkpoint the image is a training copy of, first). With `modality`
    (name -> imaging modality), only checkpoints of the first one's modality are kept.
    """
    fit = [n for n, r in checks.items() if r is not None and not r["out_of_distribution"]]
    fit.sort(key=lambda n: (n in patch_models, 0.0 if checks[n].get("training_copy") else  # its own training image
                            checks[n]["score"] / max(checks[n]["threshold"], 1e-12)))
    if modality is not None and fit:
        fit = [n for n in fit if modality.get(n) == modality.get(fit[0])]
    return fit


#: What a caller knows of one installed checkpoint, asked by name: (its `Classifier.ood_check` result for the image,
#: None without a detector; whether it is a patch model; its imaging modality). Raises BreastXAIError if it fails to
#: load.
CheckpointProbe = Callable[[str], tuple[Optional[dict], bool, Optional[str]]]


def find_fitting(names: Iterable[str], probe: CheckpointProbe) -> list[str]:
    """`checkpoints_that_fit` over the named checkpoints, each probed once; one that fails to load is left out."""
    checks, patch, modality = {}, set(), {}
    for name in names:
        try:
            checks[name], is_patch, modality[name] = probe(name)
        except BreastXAIError:
            continue
        if is_patch:
            patch.add(name)
    return checkpoints_that_fit(checks, patch, modality)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.ood", description="Fit the out-of-distribution detector "
                                 "of a checkpoint from its training and validation splits.")
    ap.add_argument("checkpoint")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--false-alarm-rate", type=float, default=0.05)
    args = ap.parse_args(argv)
    info = fit_bundle(args.checkpoint, args.data_dir, args.false_alarm_rate)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
