"""The dashboard's small cached service layer over `core` (the only module pages call for work)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `import core` also works without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import numpy as np
import streamlit as st

from core import gallery, tiles
from core.data.roots import bundle_splits, resolve_data_root
from core.checkpoints import (CHECKPOINTS_DIR, list_bundles, load_classifier, load_segmenter, read_csv,
                              read_metadata, verify_bundle)
from core.checkpoints import segmenter_for as find_segmenter
from core.errors import BreastXAIError, CheckpointError, InvalidImageError
from core.preprocessing import DecodedImage, decode_image, load_mask
from core.segmentation import MissedLesions, true_shape_rows


def _keep_keras_session() -> None:
    """Stop Streamlit from calling `keras.backend.clear_session()` after every script and fragment run
    (streamlit.runtime.scriptrunner.script_runner._clean_problem_modules). It frees nothing here, since the
    models live in `st.cache_resource`. With TensorFlow loaded, it and the full garbage collection of
    `runner.postScriptGC` (off in .streamlit/config.toml) held the server after each rerun: re-showing a cached
    explanation took 0.6-1.0 s with them and 0.1-0.3 s without."""
    try:
        from streamlit.runtime.scriptrunner import script_runner
    except ImportError:  # a Streamlit without that module: nothing to undo
        return
    if hasattr(script_runner, "_clean_problem_modules"):
        def _close_pyplot_only() -> None:
            plt = sys.modules.get("matplotlib.pyplot")
            if plt is not None:
                plt.close("all")

        script_runner._clean_problem_modules = _close_pyplot_only


_keep_keras_session()

DISCLAIMER = ("Research and teaching aid, **not a diagnostic device**. Predictions and explanations can be "
              "wrong and must never replace a pathologist's or radiologist's judgement.")


# ------------------------------------------------------------------------------------- checkpoints
def checkpoints_dir() -> Path:
    """checkpoints/ of the repository, or $BREASTXAI_CHECKPOINTS (tests, other installs)."""
    return Path(os.environ.get("BREASTXAI_CHECKPOINTS") or CHECKPOINTS_DIR)


@dataclass(frozen=True)
class BundleStatus:
    path: Path
    name: str
    ok: bool
    message: str = ""


def bundle_statuses() -> list[BundleStatus]:
    """Every bundle with whether it verifies (sha256, completeness); broken ones are listed, not served."""
    out = []
    for p in list_bundles(checkpoints_dir(), kind="classifier"):
        try:
            _verify_cached(str(p), _mtime(p))
            out.append(BundleStatus(p, p.name, True))
        except CheckpointError as exc:
            out.append(BundleStatus(p, p.name, False, str(exc)))
    return out


def _mtime(p: Path) -> float:
    f = p / "model.keras"
    return max(f.stat().st_mtime if f.exists() else 0.0, (p / "metadata.json").stat().st_mtime)


@st.cache_data(max_entries=32, show_spinner=False)
def _verify_cached(path: str, mtime: float) -> dict:
    return verify_bundle(path)


@st.cache_resource(max_entries=6, show_spinner="Loading the model…")
def _classifier(path: str, mtime: float):
    return load_classifier(path)


def classifier(path: Path):
    """The loaded Classifier, cached per checkpoint path and file time (a retrain is picked up)."""
    return _classifier(str(path), _mtime(Path(path)))


def warm_up(path: Path, methods: tuple[str, ...] = ("gradcam", "lime")) -> None:
    """Once per checkpoint version and method: load the Keras model (a warm start predicted without it) and prepare
    what the page's default `methods` need, while the user reads the prediction or picks methods, so the first real
    explanation pays for none of it: Grad-CAM (and Grad-CAM++) trace the gradient graph with one map of a blank
    image (busi_densenet121 on a 2-core AVX2 CPU: 13 s to load Keras, 16 s to trace); integrated gradients trace
    their input-gradient function (17 s there); LIME, SHAP and occlusion compile the perturbation forward pass
    (OpenVINO bfloat16 where the bundle allows it: 0.4 s) with one blank perturbed image, and LIME imports its package
    (with scikit-learn, about 1 s; the prediction itself needs neither)."""
    for m in methods:
        _warm_up(str(path), _mtime(Path(path)), WARM_UP_AS.get(m, m))


#: Methods whose warm-up is another's: they share its traced graph or its forward pass.
WARM_UP_AS = {"gradcam++": "gradcam", "shap": "occlusion"}


@st.cache_resource(max_entries=32, show_spinner="Preparing the explanation methods for this checkpoint (once per server "
                  "start; up to a minute on a slow CPU)…")
def _warm_up(path: str, mtime: float, method: str) -> bool:
    from core.explain import explain as core_explain

    clf = _classifier(path, mtime)
    blank = np.zeros((clf.input_size, clf.input_size, 3), np.uint8)
    if method == "gradcam":
        core_explain(clf, blank, "gradcam")
    elif method == "integrated_gradients":
        core_explain(clf, blank, "integrated_gradients", steps=1)
    elif method == "lime":
        import lime.lime_image  # noqa: F401

        _warm_up(path, mtime, "occlusion")
    elif method == "occlusion":  # and SHAP: the perturbation forward pass
        clf.predict_perturbed(blank[None])
    return True


def metadata(path: Path) -> dict:
    """A bundle's metadata.json, parsed once per version of the file (pages read it several times a rerun)."""
    try:
        version = (Path(path) / "metadata.json").stat().st_mtime_ns
    except OSError:
        version = 0
    return _metadata(str(path), version)


@st.cache_data(max_entries=32, show_spinner=False)
def _metadata(path: str, version: int) -> dict:
    return read_metadata(path)


def active_checkpoint() -> Optional[Path]:
    p = st.session_state.get("checkpoint")
    return Path(p) if p else None


def explanations_json(path: Path) -> Optional[dict]:
    f = Path(path) / "explanations.json"
    return json.loads(f.read_text()) if f.is_file() else None


@st.cache_data(max_entries=16, show_spinner="Computing metrics…")
def split_metrics(path: str, mtime: float, split: str):
    """(y_true, probs, rows, metrics) of one split of a bundle's predictions.csv (bootstrap 500)."""
    from core.evaluation import classification_metrics, predictions_from_bundle

    y, p, rows = predictions_from_bundle(path, split)
    return y, p, rows, classification_metrics(y, p, read_metadata(path)["class_names"], n_boot=500)


def exact_accuracy_ci(metrics: dict):
    """Clopper-Pearson 95% interval of a recorded accuracy (for metadata written before it was stored)."""
    from core.evaluation import binomial_ci

    n = int(metrics.get("n") or 0)
    return binomial_ci(int(round(metrics.get("accuracy", 0) * n)), n) if n else None


@st.cache_data(max_entries=16, show_spinner=False)
def _subtypes(path: str, mtime: float, split: str, at_operating_point: bool) -> Optional[list[dict]]:
    from core.evaluation import subtypes_from_bundle

    return subtypes_from_bundle(path, split, at_operating_point)


def subtypes_for(path: Path, split: str, at_operating_point: bool = False) -> Optional[list[dict]]:
    """Per-subtype rows (`core.evaluation.subtypes_from_bundle`) of a split, the cross-validation ("cv") or the
    out-of-fold predictions the operating point was chosen on ("calibration")."""
    return _subtypes(str(path), _mtime(Path(path)), split, at_operating_point)


def metrics_for(path: Path, split: str):
    return split_metrics(str(path), _mtime(Path(path)), split)


# ------------------------------------------------------------------------------------------ images
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@st.cache_data(max_entries=64, show_spinner=False)
def decode(data: bytes) -> DecodedImage:
    """Decode uploaded bytes (cached by content); raises InvalidImageError with a usable message."""
    return decode_image(data)


@st.cache_data(max_entries=64, show_spinner=False)
def read_file(path: str) -> bytes:
    return Path(path).read_bytes()


@st.cache_data(max_entries=64, show_spinner=False)
def mask_for(paths: tuple[str, ...], shape: tuple[int, int]) -> Optional[np.ndarray]:
    if not paths:
        return None
    m = load_mask(paths, shape)
    return m if m.any() else None


def data_dir() -> Optional[Path]:
    p = st.session_state.get("data_dir")
    if p:
        return Path(p)
    return gallery.default_data_dir()


@st.cache_data(max_entries=16, show_spinner=False)
def _examples(data_root: str, bundle: str, per_class: int) -> list:
    ex = gallery.test_split_examples(bundle, per_class) if bundle else []
    seen = {e.dataset for e in ex}
    kind = read_metadata(bundle).get("dataset", {}).get("kind") if bundle else None
    return ex + [e for e in gallery.find_examples(data_root or None, per_class)
                 if e.dataset not in seen and gallery.same_modality(e.dataset, kind)]


def examples(per_class: int = 6) -> list:
    d, ck = data_dir(), active_checkpoint()
    return _examples(str(d) if d and d.is_dir() else "", str(ck) if ck else "", per_class)


# ------------------------------------------------------------------------------------- predictions
@st.cache_data(max_entries=256, show_spinner=False)
def _predict(ckpt: str, mtime: float, image_sha: str, _image: np.ndarray) -> np.ndarray:
    return _classifier(ckpt, mtime).predict_proba(_image)[0]


def predict(path: Path, image: np.ndarray, image_sha: str) -> np.ndarray:
    """Calibrated probabilities (K,), cached by checkpoint and image hash."""
    return _predict(str(path), _mtime(Path(path)), image_sha, image)


@st.cache_data(max_entries=256, show_spinner=False)
def _ood(ckpt: str, mtime: float, image_sha: str, _image: np.ndarray) -> Optional[dict]:
    res = _classifier(ckpt, mtime).ood_check([_image])
    return res[0] if res else None


def ood_check(path: Path, image: np.ndarray, image_sha: str) -> Optional[dict]:
    """{'score', 'threshold', 'out_of_distribution'} or None when the checkpoint has no detector."""
    return _ood(str(path), _mtime(Path(path)), image_sha, image)


def fitting_checkpoints(path: Path, image: np.ndarray, image_sha: str) -> list[Path]:
    """The other usable checkpoints made for images like this one (their out-of-distribution detector accepts it),
    best fit first, only of the best fit's imaging modality (see core.ood.find_fitting). Loads each
    checkpoint once (cached like the active one); each check is cached per image."""
    from core.ood import find_fitting

    others = {s.name: s.path for s in bundle_statuses() if s.ok and s.path != Path(path)}

    def probe(name: str):
        p = others[name]
        return ood_check(p, image, image_sha), classifier(p).patches is not None, gallery.modality_of(metadata(p))

    return [others[n] for n in find_fitting(others, probe)]


# ------------------------------------------------------------------------------------- lesion segmentation
@dataclass(frozen=True)
class PredictedLesion:
    mask: np.ndarray  # bool (H, W): the segmenter's predicted lesion (may be empty)
    measurements: Optional[dict]  # core.segmentation.lesion_measurements (None: nothing predicted)
    segmenter: str  # bundle name
    test_dice: Optional[float]  # the segmenter's test Dice on lesion images
    test_missed: Optional[MissedLesions] = None  # how often it missed a test lesion almost entirely


def segmenter_for(ckpt: Path) -> Optional[Path]:
    """A verified segmenter bundle of the same imaging modality as the checkpoint (ultrasound: BUSI), or None."""
    seg = find_segmenter(metadata(ckpt), checkpoints_dir())
    if seg is None:
        return None
    try:
        _verify_cached(str(seg), _mtime(seg))
    except CheckpointError:
        return None
    return seg


@st.cache_resource(max_entries=2, show_spinner="Loading the lesion segmenter…")
def _segmenter(path: str, mtime: float):
    return load_segmenter(path)


@st.cache_data(max_entries=64, show_spinner="Outlining the lesion…")
def _lesion(seg: str, mtime: float, image_sha: str, _image: np.ndarray) -> PredictedLesion:
    from core.segmentation import lesion_measurements

    model = _segmenter(seg, mtime)
    mask = model.predict_mask(_image)
    dice = (model.metadata.get("metrics", {}).get("test", {}).get("dice") or {}).get("mean")
    return PredictedLesion(mask, lesion_measurements(mask), Path(seg).name, dice, missed_lesions(Path(seg)))


def missed_lesions(seg: Path, split: str = "test"):
    """core.segmentation.MissedLesions of a segmenter bundle (cached on its metadata's mtime), or None."""
    return _missed(str(seg), _mtime(seg), split)


@st.cache_data(max_entries=8, show_spinner=False)
def _missed(seg: str, mtime: float, split: str):
    from core.segmentation import read_missed_lesions

    return read_missed_lesions(seg, split)


def outline_on_negative(ckpt: Path):
    """core.segmentation.OutlineOnNegative of the checkpoint and its modality's segmenter (what an outline meant on
    scans the classifier called normal; cached on both bundles' file times), or None."""
    seg = segmenter_for(ckpt)
    return None if seg is None else _on_negative(str(ckpt), _mtime(Path(ckpt)), str(seg), _mtime(seg))


@st.cache_data(max_entries=8, show_spinner=False)
def _on_negative(ckpt: str, ckpt_mtime: float, seg: str, seg_mtime: float):
    from core.segmentation import read_outline_on_negative

    return read_outline_on_negative(ckpt, seg)


def segmenter_rows(seg: Path, split: str) -> list[dict]:
    """The rows of a segmenter bundle's `predictions.csv` for `split` ("test" or "val"; cached on its mtime)."""
    return _seg_rows(str(seg), _mtime(seg), split)


@st.cache_data(max_entries=8, show_spinner=False)
def _seg_rows(seg: str, mtime: float, split: str) -> list[dict]:
    path = Path(seg) / "predictions.csv"
    return [r for r in read_csv(path) if r.get("split") == split] if path.is_file() else []


def true_shapes(seg: Path, split: str) -> Optional[list[dict]]:
    """`core.segmentation.true_shape_rows` of the split's images (the radiologists' outlines measured like the
    predicted ones), or None when the dataset or a mask file is not here."""
    return _true_shapes(str(seg), _mtime(seg), split)


@st.cache_data(max_entries=8, show_spinner="Measuring the radiologists' outlines…")
def _true_shapes(seg: str, mtime: float, split: str) -> Optional[list[dict]]:
    root = resolve_data_root(metadata(Path(seg)), Path(seg))
    rows = [r for r in read_csv(Path(seg) / "split.csv") if r.get("split") == split]
    if not root.is_dir() or not rows:
        return None
    try:
        return true_shape_rows(rows, root)
    except (OSError, ValueError):  # a mask file missing or unreadable here
        return None


def predicted_lesion(ckpt: Path, image: np.ndarray, image_sha: str) -> Optional[PredictedLesion]:
    """The lesion the modality's segmenter predicts on this image (cached), or None when no segmenter suits it."""
    seg = segmenter_for(ckpt)
    return None if seg is None else _lesion(str(seg), _mtime(seg), image_sha, image)


# ------------------------------------------------------------------------------------- case report
def case_report(ckpt: Path, image: np.ndarray, image_sha: str, results: dict, lesion: Optional[PredictedLesion] = None,
                mask: Optional[np.ndarray] = None, true_class: Optional[str] = None, name: Optional[str] = None,
                png_pages: bool = False) -> bytes:
    """The case report of what the page shows (core.report): PDF bytes, or a zip of its pages as PNG.
    `name` (the file name) is printed only when the user has ticked the box that allows it."""
    import zipfile

    from core.report import Case, ReportOptions, make_report, pdf_pages_png
    from core.segmentation import describe_lesion, lesion_caveat
    from core.training.common import git_commit

    probs = predict(ckpt, image, image_sha)
    case = Case(image=image, probabilities=probs, explanations=list(results.values()),
                name=name, true_class=true_class, mask=mask, ood=ood_check(ckpt, image, image_sha),
                predicted_lesion=lesion.mask if lesion is not None else None,
                lesion_text=describe_lesion(lesion.measurements) if lesion is not None else None,
                lesion_caveat=lesion_caveat(lesion.test_missed, outline_on_negative(ckpt),
                                            classifier(ckpt).class_names[int(np.argmax(probs))], lesion.mask)
                if lesion is not None else None)
    seg = segmenter_for(ckpt)
    pdf = make_report(classifier(ckpt), [case], ReportOptions(include_names=name is not None), explanations_json(ckpt),
                      git_commit(), read_metadata(seg) if seg is not None and lesion is not None else None)
    if not png_pages:
        return pdf
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, png in enumerate(pdf_pages_png(pdf), start=1):
            z.writestr(f"breastxai_report_page{k}.png", png)
    return buf.getvalue()


@st.cache_resource
def feedback_store():
    from core.feedback import FeedbackStore

    return FeedbackStore()


class ResultCache:
    """A bounded LRU of explanations keyed by (checkpoint, mtime, image sha256, method, params, target)."""

    def __init__(self, max_entries: int = 96):
        self.max_entries = max_entries
        self._d: OrderedDict = OrderedDict()

    def get(self, key):
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        return None

    def put(self, key, value) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)


@st.cache_resource
def _results() -> ResultCache:
    return ResultCache()


def explanation_key(path: Path, image_sha: str, method: str, params: dict, target: Optional[int]) -> tuple:
    return (str(path), _mtime(Path(path)), image_sha, method, json.dumps(params, sort_keys=True, default=str),
            target)


def cached_explanation(path: Path, image_sha: str, method: str, params: dict, target: Optional[int] = None):
    return _results().get(explanation_key(path, image_sha, method, params, target))


def explain(path: Path, image: np.ndarray, image_sha: str, method: str, params: dict,
            target: Optional[int] = None, progress: Optional[Callable[[float], None]] = None):
    """Explanation of one method, computed once per (checkpoint, image hash, method, params, target)."""
    from core.explain import explain as core_explain

    key = explanation_key(path, image_sha, method, params, target)
    hit = _results().get(key)
    if hit is not None:
        return hit
    e = core_explain(classifier(path), image, method, target=target, progress=progress, **params)
    _results().put(key, e)
    return e



@st.cache_resource(max_entries=1, show_spinner="Randomising every weight of a copy of the network…")
def _randomised(path: str, mtime: float):
    from core.explain.sanity import fully_randomised

    return fully_randomised(_classifier(path, mtime), seed=0)


@st.cache_data(max_entries=32, show_spinner=False)
def _randomised_explanation(path: str, mtime: float, image_sha: str, method: str, params_json: str,
                            target: int, _image: np.ndarray):
    from core.explain import explain as core_explain

    return core_explain(_randomised(path, mtime), _image, method, target=target, **json.loads(params_json))


def randomised_explanation(path: Path, image: np.ndarray, image_sha: str, method: str, params: dict, target: int):
    """The method's map for `target` on a copy of the checkpoint whose weights are all random (sanity check)."""
    return _randomised_explanation(str(path), _mtime(Path(path)), image_sha, method,
                                   json.dumps(params, sort_keys=True), int(target), image)


USER_ERRORS = (BreastXAIError, InvalidImageError)


# ------------------------------------------------------------------------------------- where in the tissue
@st.cache_data(max_entries=32, show_spinner="Classifying every tile of the field…")
def _tile_map(ckpt: str, mtime: float, image_sha: str, _image: np.ndarray):
    return tiles.tile_probability_map(_classifier(ckpt, mtime), _image, min_tissue=0.2)


def tile_map(path: Path, image: np.ndarray, image_sha: str):
    """core.tiles.TileMap of a field larger than one tile of a patch model (glass tiles left out), else None."""
    return _tile_map(str(path), _mtime(Path(path)), image_sha, image)


@st.cache_data(max_entries=8, show_spinner=False)
def _mosaic_patients(ckpt: str, mtime: float) -> list[dict]:
    try:
        test = bundle_splits(Path(ckpt), read_metadata(ckpt))["test"]
    except Exception:  # no data here: no mosaics
        return []
    by: dict[str, list] = {}
    for s in test.samples:
        if s.position is not None and Path(s.path).is_file():
            by.setdefault(s.group, []).append(s)
    rows = [{"patient": g, "patches": len(v), "positive": sum(x.label == 1 for x in v)} for g, v in by.items()]
    return sorted(rows, key=lambda r: (-min(r["positive"], r["patches"] - r["positive"]), -r["patches"], r["patient"]))


def mosaic_patients(path: Path) -> list[dict]:
    """Test patients of a patch-set checkpoint (IDC) whose patches carry slide positions: patient, patches,
    positive (label-1 patches); patients with both classes and many patches first."""
    return _mosaic_patients(str(path), _mtime(Path(path)))


@st.cache_data(max_entries=8, show_spinner="Laying out the patient's patches and classifying each…")
def _mosaic(ckpt: str, mtime: float, patient: str, width: int):
    from core.data.loaders import PATCH_SIDES

    meta = read_metadata(ckpt)
    test = bundle_splits(Path(ckpt), meta)["test"]
    samples = [s for s in test.samples if s.group == patient and s.position is not None]
    side = PATCH_SIDES.get(meta.get("dataset", {}).get("kind"), 50)
    xs = [s.position[0] for s in samples]
    scale = min(1.0, width / (max(xs) - min(xs) + side))
    mosaic = tiles.slide_mosaic(samples, test.read, side, scale)
    probs = _classifier(ckpt, mtime).predict_proba([test.read(s) for s in samples])
    return mosaic, probs


def mosaic(path: Path, patient: str, width: int = 900):
    """(core.tiles.Mosaic, calibrated probabilities (N, K)) for one test patient, at most `width` px wide."""
    return _mosaic(str(path), _mtime(Path(path)), patient, width)


def tile_count(path: Path, image: np.ndarray) -> int:
    """How many model inputs one prediction of `image` takes (Classifier.n_tiles)."""
    return classifier(path).n_tiles(image)


@st.cache_data(max_entries=32, show_spinner="Timing two short LIME runs on this image…")
def _lime_cost(ckpt: str, mtime: float, image_sha: str, params_json: str, _image: np.ndarray) -> tuple[float, float]:
    from core.explain import explain as core_explain

    clf = _classifier(ckpt, mtime)
    clf.model  # noqa: B018  (a warm start defers loading Keras: load it before timing anything)
    params = json.loads(params_json)
    core_explain(clf, _image, "lime", **{**params, "num_samples": 16})  # warm-up: tracing, compiled forward
    times = {}
    for n in (16, 64):  # the faster of two runs each: a busy machine only ever adds time
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            core_explain(clf, _image, "lime", **{**params, "num_samples": n})
            runs.append(time.perf_counter() - t0)
        times[n] = min(runs)
    per = max((times[64] - times[16]) / 48, 1e-5)
    return max(times[16] - 16 * per, 0.0), per


def lime_estimate(path: Path, image: np.ndarray, image_sha: str, params: dict) -> float:
    """Seconds LIME with `params` will take on this image: fixed cost + samples x cost per sample, both measured
    on this image with these settings (short runs of 16 and 64 samples, cached), so segmentation, the
    perturbed images and the backend's real speed are all counted."""
    fixed, per = _lime_cost(str(path), _mtime(Path(path)), image_sha,
                            json.dumps({k: v for k, v in params.items() if k != "num_samples"}, sort_keys=True), image)
    return fixed + per * int(params.get("num_samples", 1000))
