"""The one result type (`Explanation`) and the base class every explainer shares."""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, ClassVar, Optional

import cv2
import numpy as np

from core.preprocessing import ensure_rgb_uint8, resize

EPS = 1e-7
Progress = Optional[Callable[[float], None]]
#: A perturbation method whose perturbed images all keep p(target) within this much of each other found only weak
#: effects: hiding parts of the image barely moves the prediction (1 percentage point).
WEAK_EFFECT = 0.01
#: What a weak effect means, for pages, reports and explanations.json (worded for WEAK_EFFECT).
WEAK_EFFECT_MEANING = "hiding parts of the image moved the explained probability by under one percentage point"


@dataclass(frozen=True, eq=False)
class Explanation:
    """What every method returns.

    attribution: float32 (H, W) at the input image's resolution; positive supports `target`.
    params: every parameter actually used (seeds included). extras: method-specific (e.g. LIME segments).
    """

    method: str
    target: int
    probability: float
    attribution: np.ndarray
    params: dict
    seconds: float
    class_name: str = ""
    probabilities: Optional[np.ndarray] = None  # (K,) calibrated probabilities of the image
    extras: dict = field(default_factory=dict)

    def heatmap(self) -> np.ndarray:
        """(H, W) float32 in [0, 1]: 1 = most supportive of the target; negative evidence -> 0.

        A constant or all-negative map gives all zeros (never NaN).
        """
        return normalise_positive(self.attribution)

    @property
    def segments(self) -> Optional[np.ndarray]:
        return self.extras.get("segments")

    @property
    def perturbed_range(self) -> Optional[tuple[float, float]]:
        """(lowest, highest) p(target) over the perturbed images a perturbation method evaluated; None for others."""
        r = self.extras.get("perturbed_probability")
        return (float(r[0]), float(r[1])) if r is not None else None

    @property
    def weak_effect(self) -> bool:
        """True when no perturbation moved p(target) by WEAK_EFFECT or more: the map ranks very small effects."""
        r = self.perturbed_range
        return r is not None and r[1] - r[0] < WEAK_EFFECT

    @property
    def has_positive_evidence(self) -> bool:
        """False when nothing in the image supports `target` (the heatmap would be blank)."""
        return float(np.nan_to_num(self.attribution).max(initial=0.0)) > EPS

    def against(self) -> "Explanation":
        """The signed view's other half: the same explanation with the sign flipped, so its heatmap shows the
        evidence *against* `target` (what pulls the prediction away from it)."""
        from dataclasses import replace

        return replace(self, attribution=-np.asarray(self.attribution, np.float32),
                       extras={**self.extras, "segment_weights": {k: -v for k, v in
                                                                   self.extras["segment_weights"].items()}}
                       if "segment_weights" in self.extras else self.extras)


def normalise_positive(attribution: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(np.asarray(attribution, dtype=np.float32))
    a = np.maximum(a, 0.0)
    top = float(a.max(initial=0.0))
    if top <= EPS:
        return np.zeros_like(a, dtype=np.float32)
    return (a / (top + EPS)).astype(np.float32)


def upsample(attribution: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize a 2-D map to (H, W) = shape (bilinear, or nearest for label maps)."""
    a = np.asarray(attribution)
    if a.shape == tuple(shape):
        return a
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(a.astype(np.float32 if not nearest else a.dtype), (shape[1], shape[0]), interpolation=interp)


@dataclass(frozen=True)
class NoParams:
    pass


SEED_MAX = 2 ** 32 - 1  # numpy RandomState seeds
BATCH_MAX = 4096


def bounded(default: Any, lo: float, hi: float, kind: type = int, *, above: bool = False):
    """A parameter field whose value must be a `kind` (int or float) number from `lo` to `hi` (above `lo` with
    `above=True`); None stays allowed where it is the default. Checked by `checked_params`."""
    return field(default=default, metadata={"kind": kind, "range": (lo, hi), "above": above})


def one_of(default: str, *others: str):
    """A parameter field whose value must be `default` or one of `others`."""
    return field(default=default, metadata={"choices": (default, *others)})


def param_choices(params_cls: type, name: str) -> tuple[str, ...]:
    """The values a `one_of` field of a Params dataclass accepts (what a UI offers)."""
    return next(f for f in fields(params_cls) if f.name == name).metadata["choices"]


def checked_params(method: str, params: Any) -> Any:
    """`params` (a frozen Params dataclass) with every `bounded` / `one_of` / bool field checked and whole-number
    floats of int fields made ints. Raises ValueError naming the method, the parameter and what it accepts, so a
    bad value (from the REST API or Python) fails at once instead of deep inside lime or shap."""
    whole: dict[str, int] = {}
    for f in fields(params):
        v, meta = getattr(params, f.name), f.metadata
        if v is None and f.default is None:
            continue
        if "choices" in meta:
            if not isinstance(v, str) or v not in meta["choices"]:
                raise ValueError(f"{method}: {f.name} must be one of {', '.join(map(repr, meta['choices']))}, "
                                 f"not {v!r}.")
        elif "kind" in meta:
            kind, (lo, hi), above = meta["kind"], meta["range"], meta["above"]
            ok = isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)
            ok = ok and (kind is not int or float(v).is_integer()) and (v > lo if above else v >= lo) and v <= hi
            if not ok:
                what = "a whole number" if kind is int else "a number"
                span = f"above {lo:g} and at most {hi:g}" if above else f"from {lo:g} to {hi:g}"
                raise ValueError(f"{method}: {f.name} must be {what} {span}, not {v!r}.")
            if kind is int and type(v) is not int:
                whole[f.name] = int(v)
        elif isinstance(f.default, bool) and not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"{method}: {f.name} must be true or false, not {v!r}.")
    return replace(params, **whole) if whole else params


class Explainer:
    """Base class: subclasses set `name`, `Params` (a frozen dataclass) and implement `_attribute`.

    `Explainer(classifier, progress=None, **params).explain(image, target=None) -> Explanation`.
    The classifier is any object with `predict_proba`, `class_names`, `input_size` (see core.checkpoints).
    """

    name: ClassVar[str] = "base"
    Params: ClassVar[type] = NoParams
    stochastic: ClassVar[bool] = False
    slow: ClassVar[bool] = False

    def __init__(self, classifier, progress: Progress = None, **params: Any):
        self.classifier = classifier
        self.progress = progress
        names = {f.name for f in fields(self.Params)}
        unknown = set(params) - names
        if unknown:
            raise TypeError(f"{self.name} does not take parameter(s) {sorted(unknown)}; it takes {sorted(names)}")
        self.params = checked_params(self.name, self.Params(**params))
        self._seen: Optional[tuple[np.ndarray, np.ndarray]] = None  # per-class (lowest, highest) perturbed p

    # -- helpers for subclasses
    def work_image(self, image: np.ndarray) -> np.ndarray:
        """The uint8 image at the resolution the model reads it; perturbation methods work on it.

        (S, S, 3) for a whole-image model; for a patch model the whole image scaled so that its grid
        tiles are S x S (see core.patches), so the attribution covers the whole image.
        """
        if hasattr(self.classifier, "work_image"):
            return self.classifier.work_image(image)
        s = self.classifier.input_size
        return resize(image, (s, s))

    def predict_fn(self, done: Optional[Callable[[int], None]] = None) -> Callable[[np.ndarray], np.ndarray]:
        """Batch of work images (N, H, W, 3) -> calibrated probabilities (N, K) through the perturbation forward pass
        (float32, or bfloat16 where the bundle records that this method's explanations agree; see core.backends).

        Every batch's per-class lowest and highest probabilities are kept, so the explanation can say how far its
        perturbations moved the prediction (`Explanation.perturbed_range`). With `done`, a large batch goes through
        in chunks of the classifier's batch size (the chunks its forward pass runs anyway, so the same answer at the
        same speed) and `done(n)` is called after each with the images it held, so progress moves every 32 images
        (1-3 s for busi_densenet121 on a 2-core CPU) instead of once per LIME or SHAP batch of 128."""
        if (hasattr(self.classifier, "predict_perturbed")
                and getattr(self.classifier, "fast_perturbation_allowed", lambda _: True)(self.name)):
            fn = self.classifier.predict_perturbed
        elif hasattr(self.classifier, "predict_work"):
            fn = self.classifier.predict_work
        else:
            fn = self.classifier.predict_proba
        step = max(1, int(getattr(self.classifier, "batch_size", 32) or 32))

        def predict(x):
            x = np.asarray(x)
            if done is None:
                out = np.asarray(fn(x))
            else:
                outs = []
                for i in range(0, len(x), step):
                    outs.append(np.asarray(fn(x[i:i + step])))
                    done(len(outs[-1]))
                out = np.concatenate(outs) if outs else np.asarray(fn(x))
            self.observe(out)
            return out

        return predict

    def observe(self, probs: np.ndarray) -> None:
        """Fold a batch of perturbed images' probabilities (N, K) into the per-class range seen so far."""
        if len(probs) == 0:
            return
        lo, hi = probs.min(axis=0), probs.max(axis=0)
        seen = self._seen
        self._seen = (lo, hi) if seen is None else (np.minimum(seen[0], lo), np.maximum(seen[1], hi))

    def tiled(self) -> bool:
        """True for patch models: gradient methods then attribute each grid tile and stitch the maps."""
        return getattr(self.classifier, "patches", None) is not None

    def report(self, fraction: float) -> None:
        if self.progress is not None:
            self.progress(float(min(max(fraction, 0.0), 1.0)))

    def _resolve_target(self, probs: np.ndarray, target: Optional[int]) -> int:
        if target is None:
            return int(np.argmax(probs))
        target = int(target)
        if not 0 <= target < len(probs):
            raise ValueError(f"target must be a class index in [0, {len(probs) - 1}], got {target}")
        return target

    def _forward_and_attribute(self, image: np.ndarray, target: Optional[int]):
        """(probabilities (K,), target, attribution, extras); gradient methods override this to share one pass."""
        probs = np.asarray(self.classifier.predict_proba(image)[0], dtype=np.float32)
        target = self._resolve_target(probs, target)
        attribution, extras = self._attribute(image, target)
        return probs, target, attribution, extras

    def _attribute(self, image: np.ndarray, target: int) -> tuple[np.ndarray, dict]:
        """Return (attribution at any resolution, extras). Subclasses implement this."""
        raise NotImplementedError

    def explain(self, image: np.ndarray, target: Optional[int] = None) -> Explanation:
        """Explain the classifier's output for `target` (default: predicted class) on a uint8 RGB image."""
        image = ensure_rgb_uint8(image)
        t0 = time.perf_counter()
        self.report(0.0)
        self._seen = None
        probs, target, attribution, extras = self._forward_and_attribute(image, target)
        if self._seen is not None and "perturbed_probability" not in extras:
            extras["perturbed_probability"] = [float(self._seen[0][target]), float(self._seen[1][target])]
        attribution = upsample(np.asarray(attribution, dtype=np.float32), image.shape[:2])
        attribution = np.nan_to_num(attribution).astype(np.float32)
        self.report(1.0)
        params = {**asdict(self.params), **extras.pop("resolved", {})}
        return Explanation(
            method=self.name, target=target, probability=float(probs[target]), attribution=attribution,
            params=params, seconds=time.perf_counter() - t0,
            class_name=str(self.classifier.class_names[target]), probabilities=probs, extras=extras)


def baseline_image(image: np.ndarray, kind: str, blur_sigma: float = 10.0) -> np.ndarray:
    """A uint8 reference image: 'black', 'mean' (per-channel mean colour) or 'blur' (Gaussian)."""
    if kind == "black":
        return np.zeros_like(image)
    if kind == "mean":
        return np.broadcast_to(image.reshape(-1, 3).mean(0).round().astype(np.uint8), image.shape).copy()
    if kind == "blur":
        return cv2.GaussianBlur(image, (0, 0), blur_sigma)
    raise ValueError(f"baseline must be 'black', 'mean' or 'blur', not {kind!r}")
