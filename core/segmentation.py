"""Lesion segmentation at inference: the `Segmenter` contract and the lesion's size and shape.

`core.checkpoints.load_segmenter(path)` returns a `Segmenter`: `predict_proba_map(image)` gives the lesion
probability of every pixel of a uint8 RGB image of any size (float32 (H, W) in [0, 1]) and
`predict_mask(image)` the predicted lesion (bool (H, W)) after the bundle's validation-chosen threshold
and post-processing. `lesion_measurements(mask)` describes a mask the way a breast-imaging report does.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from core.data.split import mask_paths
from core.preprocessing import ensure_rgb_uint8, load_mask, model_input


def largest_region(mask: np.ndarray) -> np.ndarray:
    """Only the largest 8-connected region of a bool mask (all False stays all False)."""
    import cv2

    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask.astype(bool)
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return lab == k


def dice_iou(pred: np.ndarray, true: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    """Dice 2|P∩T|/(|P|+|T|) and IoU |P∩T|/|P∪T| of two bool masks of one shape; (None, None) when both
    are empty (nothing to find and nothing found: the score is undefined, not perfect)."""
    pred, true = np.asarray(pred, bool), np.asarray(true, bool)
    if pred.shape != true.shape:
        raise ValueError(f"Mask shapes differ: {pred.shape} vs {true.shape}")
    inter = np.logical_and(pred, true).sum()
    total = pred.sum() + true.sum()
    if total == 0:
        return None, None
    union = np.logical_or(pred, true).sum()
    return float(2 * inter / total), float(inter / union)


def postprocess(proba: np.ndarray, threshold: float = 0.5, largest_region_only: bool = False) -> np.ndarray:
    """Lesion probability map (H, W) -> bool mask: pixels >= threshold, optionally only the largest region."""
    mask = np.asarray(proba) >= threshold
    return largest_region(mask) if largest_region_only and mask.any() else mask


@dataclass
class Segmenter:
    """A trained lesion segmenter: uint8 RGB images of any size -> lesion probability maps and masks.

    `backend`: the forward pass, "keras" (in-memory models during training) or, for checkpoints, "auto" / "openvino"
    (OpenVINO float32 where it agrees with Keras, see `core.backends.choose_forward`). `model` is the Keras model or,
    on a warm OpenVINO start, a `core.checkpoints.DeferredModel` loaded only if the Keras graph is needed.
    """

    model: object
    input_size: int
    clahe: bool = False
    threshold: float = 0.5
    largest_region_only: bool = False
    metadata: dict = field(default_factory=dict)
    path: Optional[Path] = None
    batch_size: int = 8
    backend: str = "keras"
    backend_info: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _fwd: Optional[object] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name if self.path else "in-memory segmenter"

    def keras_model(self):
        """The Keras model (a warm start's deferred model is loaded here, once)."""
        from core.checkpoints import DeferredModel

        with self._lock:
            if isinstance(self.model, DeferredModel):
                self.model = self.model.result()
            return self.model

    def _keras_forward(self, x: np.ndarray) -> np.ndarray:
        model = self.keras_model()
        with self._lock:
            return np.asarray(model(x, training=False), np.float32)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) float32 0-255 -> (N, S, S) lesion probabilities."""
        if self._fwd is None:  # choose_forward returns _keras_forward itself for backend "keras"
            from core.backends import choose_forward

            self._fwd, self.backend_info = choose_forward(
                self.keras_model, self.input_size, self._keras_forward, self.metadata.get("model_sha256"), self.backend)
        if len(x) == 0:
            return np.zeros((0, self.input_size, self.input_size), np.float32)
        out = [np.asarray(self._fwd(x[i:i + self.batch_size]), np.float32) for i in range(0, len(x), self.batch_size)]
        return np.concatenate(out)[..., 0]

    def proba_maps_from_inputs(self, x: np.ndarray, shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Maps for prepared inputs uint8 (N, S, S, 3), each resized (bilinear) to its image's (H, W)."""
        import cv2

        probs = self._forward(np.asarray(x, np.float32))
        return [np.clip(cv2.resize(p, (int(w), int(h)), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
                for p, (h, w) in zip(probs, shapes)]

    def predict_proba_map(self, image: np.ndarray) -> np.ndarray:
        """Lesion probability per pixel, float32 (H, W) in [0, 1], for a uint8 RGB image (H, W, 3); a grey,
        one-channel, RGBA or 16-bit scan is converted by `ensure_rgb_uint8` (InvalidImageError if unusable)."""
        image = ensure_rgb_uint8(image)
        x = model_input(image, self.input_size, self.clahe)[None]
        return self.proba_maps_from_inputs(x, [image.shape[:2]])[0]

    def postprocess(self, proba: np.ndarray) -> np.ndarray:
        return postprocess(proba, self.threshold, self.largest_region_only)

    def predict_mask(self, image: np.ndarray) -> np.ndarray:
        """Predicted lesion, bool (H, W), with the bundle's threshold and post-processing."""
        return self.postprocess(self.predict_proba_map(image))


def outline(mask: np.ndarray) -> list[np.ndarray]:
    """Outer contours of a bool mask as (K, 2) int arrays of (x, y) points, largest first."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c[:, 0, :] for c in sorted(contours, key=cv2.contourArea, reverse=True)]


#: Width and depth within this share of each other: "about as wide as tall". A predicted outline's extents are not
#: that precise (test Dice 0.76), and taller-than-wide is a suspicious sign not to call on a few pixels' difference.
ORIENTATION_TOLERANCE = 0.1

#: Margin irregularity below SMOOTH_MARGIN reads "smooth" in `describe_lesion`, from IRREGULAR_MARGIN "irregular".
SMOOTH_MARGIN, IRREGULAR_MARGIN = 0.05, 0.15


def orientation(width: float, depth: float) -> str:
    """"wider than tall" / "taller than wide" when one extent exceeds the other by more than ORIENTATION_TOLERANCE,
    else "about as wide as tall"."""
    if width > depth * (1 + ORIENTATION_TOLERANCE):
        return "wider than tall"
    if depth > width * (1 + ORIENTATION_TOLERANCE):
        return "taller than wide"
    return "about as wide as tall"


def lesion_measurements(mask: np.ndarray, mm_per_pixel: Optional[float] = None) -> Optional[dict]:
    """Size and shape of the largest region of a lesion mask (None when the mask is empty).

    area_px and area_fraction (of the image); width_px (horizontal extent) and depth_px (vertical extent,
    skin at the top of an ultrasound); orientation "wider than tall" (parallel to the skin: the usual benign
    pattern), "taller than wide" (a BI-RADS suspicious feature) or, with the two extents within 10% of each other,
    "about as wide as tall" (`orientation`); and margin
    irregularity = 1 - solidity (area / convex-hull area): 0 for a smooth convex outline, larger for lobulated,
    angular or spiculated margins. With `mm_per_pixel`, lengths and area also in mm and mm^2.
    """
    import cv2

    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    region = largest_region(mask)
    contour = outline(region)[0]
    x, y, w, h = cv2.boundingRect(contour.reshape(-1, 1, 2))
    area = int(region.sum())
    hull = cv2.convexHull(contour.reshape(-1, 1, 2))
    hull_area = max(float(cv2.contourArea(hull)), float(area))
    perimeter = float(cv2.arcLength(contour.reshape(-1, 1, 2), True))
    out = {"area_px": area, "area_fraction": area / mask.size, "width_px": int(w), "depth_px": int(h),
           "width_to_depth": w / max(h, 1),
           "orientation": orientation(w, h),
           "margin_irregularity": float(1.0 - area / hull_area) if hull_area > 0 else 0.0,
           "circularity": float(4 * np.pi * area / perimeter ** 2) if perimeter > 0 else 0.0,
           "n_regions": int(cv2.connectedComponents(mask.astype(np.uint8))[0] - 1),
           "bbox": [int(x), int(y), int(w), int(h)]}
    if mm_per_pixel:
        out.update({"area_mm2": area * mm_per_pixel ** 2, "width_mm": w * mm_per_pixel, "depth_mm": h * mm_per_pixel})
    return out


def describe_lesion(m: Optional[dict]) -> str:
    """One plain sentence on a `lesion_measurements` result, for the dashboard and the case report."""
    if m is None:
        return "No lesion predicted in this image."
    size = (f"{m['width_mm']:.1f} x {m['depth_mm']:.1f} mm" if "width_mm" in m
            else f"{m['width_px']} x {m['depth_px']} px (width x depth)")
    margin = ("smooth" if m["margin_irregularity"] < SMOOTH_MARGIN
              else "slightly irregular" if m["margin_irregularity"] < IRREGULAR_MARGIN else "irregular")
    extra = f"; {m['n_regions']} separate regions, the largest described" if m["n_regions"] > 1 else ""
    return (f"Predicted lesion: {m['area_fraction']:.1%} of the image, {size}, {m['orientation']}, "
            f"{margin} margin (irregularity {m['margin_irregularity']:.2f}){extra}.")


#: A lesion whose predicted outline overlaps the true one this little counts as missed.
MISSED_DICE = 0.1


@dataclass(frozen=True)
class MissedLesions:
    """How often a segmenter misses a lesion almost entirely on one split of its bundle."""

    split: str
    lesions: int  # images of the split with a true lesion
    missed: int  # of them, Dice < MISSED_DICE
    outlined_elsewhere: int  # of the missed, those where the segmenter outlined something (not nothing)

    def sentence(self, subject: str = "It") -> str:
        """e.g. 'It missed 5 of 79 test lesions almost entirely (Dice < 0.1), 5 of them by outlining something else.'"""
        where = {"val": "validation"}.get(self.split, self.split)
        if self.missed == 0:
            return f"{subject} found all {self.lesions} {where} lesions (Dice ≥ {MISSED_DICE} on each)."
        return (f"{subject} missed {self.missed} of {self.lesions} {where} lesions almost entirely (Dice < {MISSED_DICE})"
                + (f", {self.outlined_elsewhere} of them by outlining something else" if self.outlined_elsewhere else "")
                + ".")


def missed_lesions(rows: Sequence[dict], split: str = "test") -> Optional[MissedLesions]:
    """Count near-total misses among a segmenter bundle's `predictions.csv` rows (dicts with split, dice,
    true_area, pred_area) of `split`; None when the split has no lesion image with a Dice."""
    scored = [r for r in rows if r.get("split") == split and float(r.get("true_area") or 0) > 0
              and r.get("dice") not in (None, "")]
    if not scored:
        return None
    missed = [r for r in scored if float(r["dice"]) < MISSED_DICE]
    return MissedLesions(split, len(scored), len(missed), sum(float(r.get("pred_area") or 0) > 0 for r in missed))


def read_missed_lesions(bundle: str | Path, split: str = "test") -> Optional[MissedLesions]:
    """`missed_lesions` of a segmenter bundle's predictions.csv; None when it has none."""
    from core.checkpoints import read_csv

    path = Path(bundle) / "predictions.csv"
    return missed_lesions(read_csv(path), split) if path.is_file() else None


@dataclass(frozen=True)
class OutlineOnNegative:
    """What a predicted outline meant on scans the classifier called `negative` (e.g. normal), counted over images
    neither model trained on: both bundles' cross-validation on the same folds, else their validation split."""

    negative: str  # the classifier's no-lesion class, e.g. "normal"
    positive: str  # e.g. "malignant"
    source: str  # "5-fold cross-validation" or "validation"
    outlined: int  # scans called `negative` that got an outline
    on_lesion: int  # of them, outline on a true lesion (Dice >= MISSED_DICE)
    on_positive: int  # of those, lesions of the `positive` class
    no_lesion: int  # scans called `negative` with an outline and no true lesion at all

    def summary(self) -> str:
        """e.g. 'In the 5-fold cross-validation on both model cards, 113 scans the classifier called normal got an
        outline: it marked a real lesion in 24 (10 malignant), and in 89 it marked no lesion (84 of these scans had
        none).'"""
        where = (f"In the {self.source} on both model cards" if "cross" in self.source
                 else f"On both checkpoints' {self.source} images")
        return (f"{where}, {self.outlined} scans the classifier called {self.negative} got an outline: it marked a "
                f"real lesion in {self.on_lesion} ({self.on_positive} {self.positive}), and in "
                f"{self.outlined - self.on_lesion} it marked no lesion ({self.no_lesion} of these scans had none).")

    def sentence(self) -> str:
        """For one scan called `negative` with an outline: `summary` between a statement and advice."""
        return (f"The classifier calls this scan {self.negative}, yet the segmenter outlines a region. "
                f"{self.summary()} Look at the region before trusting either.")


def outline_on_negative(classifier_rows: Sequence[dict], segmenter_rows: Sequence[dict], negative: str = "normal",
                        positive: str = "malignant", source: str = "validation") -> Optional[OutlineOnNegative]:
    """Join a classifier's per-image rows (dicts with path, predicted) with a segmenter's (path, class, dice,
    true_area, pred_area) by path and count the scans called `negative` that got an outline; None when none did."""
    called = {r["path"] for r in classifier_rows if r.get("predicted") == negative}
    rows = [r for r in segmenter_rows if r.get("path") in called and float(r.get("pred_area") or 0) > 0]
    if not rows:
        return None
    hits = [r for r in rows if float(r.get("true_area") or 0) > 0 and r.get("dice") not in (None, "")
            and float(r["dice"]) >= MISSED_DICE]
    return OutlineOnNegative(negative, positive, source, len(rows), len(hits),
                             sum(r.get("class") == positive for r in hits),
                             sum(float(r.get("true_area") or 0) == 0 for r in rows))


def read_outline_on_negative(classifier_bundle: str | Path, segmenter_bundle: str | Path, negative: str = "normal",
                             positive: str = "malignant") -> Optional[OutlineOnNegative]:
    """`outline_on_negative` from two bundles' files: their `cv_predictions.csv` when both hold one on the same folds
    (every image in the same fold), else the `val` rows of their `predictions.csv`; None when neither pair is there,
    the classifier has no `negative` class, or no scan called `negative` got an outline."""
    from core.checkpoints import read_csv

    def rows(bundle, name: str) -> list[dict]:
        path = Path(bundle) / name
        return read_csv(path) if path.is_file() else []

    c_cv, s_cv = rows(classifier_bundle, "cv_predictions.csv"), rows(segmenter_bundle, "cv_predictions.csv")
    folds = {r["path"]: r.get("fold") for r in c_cv}
    if c_cv and s_cv and all(r.get("fold") and folds.get(r["path"]) == r["fold"] for r in s_cv):
        k = len({r.get("fold") for r in c_cv})
        return outline_on_negative(c_cv, s_cv, negative, positive, f"{k}-fold cross-validation")
    c_val = [r for r in rows(classifier_bundle, "predictions.csv") if r.get("split") == "val"]
    s_val = [r for r in rows(segmenter_bundle, "predictions.csv") if r.get("split") == "val"]
    return outline_on_negative(c_val, s_val, negative, positive, "validation") if c_val and s_val else None


def lesion_caveat(missed: Optional[MissedLesions], on_negative: Optional[OutlineOnNegative], predicted_class: str,
                  mask: Optional[np.ndarray]) -> Optional[str]:
    """What a reader of a predicted outline should keep in mind: the segmenter's misses and, when the classifier
    called the scan `on_negative.negative` and an outline is drawn (`mask` bool (H, W)), what such outlines meant."""
    parts = []
    if on_negative is not None and predicted_class == on_negative.negative and mask is not None and mask.any():
        parts.append(on_negative.sentence())
    if missed is not None:
        parts.append(missed.sentence("The segmenter"))
    return " ".join(parts) or None


#: The predicted lesion's shape in a segmenter's per-image rows (`predictions.csv`, `cv_predictions.csv`) -> its key
#: in `lesion_measurements` of the predicted mask (the number of regions; the others describe the largest; empty
#: when nothing is predicted): what a classifier or a reader could take from the outline.
_SHAPE_KEYS = {"pred_regions": "n_regions", "pred_width_to_depth": "width_to_depth",
               "pred_margin_irregularity": "margin_irregularity", "pred_circularity": "circularity"}
SHAPE_COLUMNS = tuple(_SHAPE_KEYS)
#: The shape columns `shape_by_class` summarises -> what they are called.
SHAPE_DESCRIPTORS = {c: _SHAPE_KEYS[c].replace("_", " ") for c in SHAPE_COLUMNS[1:]}


def predicted_shape(mask: np.ndarray) -> dict:
    """`SHAPE_COLUMNS` of one bool lesion mask (None for each where the mask is empty; 0 regions)."""
    m = lesion_measurements(mask)
    if m is None:
        return {"pred_regions": 0, **{c: None for c in SHAPE_COLUMNS[1:]}}
    return {c: m[k] for c, k in _SHAPE_KEYS.items()}


def true_shape_rows(split_rows: Sequence[dict], root: str | Path) -> list[dict]:
    """The same shape columns measured on the radiologists' masks: for each row of a bundle's `split.csv` (dicts with
    path, class_name, mask_paths separated by ';' relative to `root`), {path, class, true_area, *SHAPE_COLUMNS}; rows
    without a mask file get true_area 0. Compare with `shape_by_class` of the predicted rows."""
    out = []
    for r in split_rows:
        paths = mask_paths(r, root)
        mask = load_mask(paths) if paths else np.zeros((1, 1), bool)
        out.append({"path": r["path"], "class": r.get("class_name"), "true_area": float(mask.mean()),
                    **predicted_shape(mask)})
    return out


def _float(v) -> Optional[float]:
    return None if v in (None, "") else float(v)


def shape_by_class(rows: Sequence[dict], class_names: Sequence[str], positive: str = "malignant") -> Optional[dict]:
    """The segmenter's predicted lesion shape by true class, over rows of its `predictions.csv` or
    `cv_predictions.csv` (dicts with class, true_area, pred_regions and the `SHAPE_DESCRIPTORS` columns) of images
    with a true lesion: what the outlines Explain describes look like, class by class.

    Returns None when no row has the shape columns; else {"n_lesions", "n_outlined", "classes": [{class, lesions,
    outlined (a lesion predicted), median of each descriptor, taller_than_wide and irregular (shares of the
    outlined, by `orientation` and IRREGULAR_MARGIN)}], "separation": {descriptor: ROC AUC of it for `positive`
    against the other lesion classes (above 0.5: higher values mean `positive`), or None where undefined}}.
    """
    lesions = [r for r in rows if (_float(r.get("true_area")) or 0) > 0 and r.get("pred_regions") not in (None, "")]
    if not lesions:
        return None
    outlined = [r for r in lesions if int(float(r["pred_regions"])) > 0]
    classes = []
    for c in class_names:
        rc = [r for r in outlined if r.get("class") == c]
        n_les = sum(r.get("class") == c for r in lesions)
        if not n_les:
            continue
        wd = [_float(r["pred_width_to_depth"]) for r in rc]
        irr = [_float(r["pred_margin_irregularity"]) for r in rc]
        row = {"class": c, "lesions": n_les, "outlined": len(rc)}
        for col, name in SHAPE_DESCRIPTORS.items():
            vals = [_float(r[col]) for r in rc]
            row[f"median {name}"] = float(np.median(vals)) if vals else None
        if rc:
            row["taller_than_wide"] = float(np.mean([orientation(w, 1.0) == "taller than wide" for w in wd]))
            row["irregular"] = float(np.mean([v >= IRREGULAR_MARGIN for v in irr]))
        else:
            row["taller_than_wide"] = row["irregular"] = None
        classes.append(row)
    from sklearn.metrics import roc_auc_score  # here, not at the top: scikit-learn stays off the path to a prediction

    y = np.array([r.get("class") == positive for r in outlined])
    separation = {name: None if y.all() or not y.any() else float(roc_auc_score(y, [_float(r[col]) for r in outlined]))
                  for col, name in SHAPE_DESCRIPTORS.items()}
    return {"n_lesions": len(lesions), "n_outlined": len(outlined), "positive": positive, "classes": classes,
            "separation": separation}
