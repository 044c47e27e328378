"""Checkpoint bundles: atomic writes, integrity checks, and the public classifier contract.

A bundle `checkpoints/<name>/` holds model.keras, metadata.json, history.csv, predictions.csv and
split.csv. `load_classifier(path)` returns a `Classifier` whose `predict_proba(images)` takes uint8
RGB images of any size and returns calibrated float32 probabilities [N, K].
"""
from __future__ import annotations

import csv
import ctypes
import ctypes.util
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from core.errors import CheckpointError, CheckpointNotFoundError
from core.data.loaders import PATCH_SIDES
from core.patches import PatchConfig, tiles
from core.patches import work_image as patch_work_image
from core.preprocessing import apply_clahe, ensure_rgb_uint8, model_input, resize

BUNDLE_FILES = ("model.keras", "metadata.json", "history.csv", "predictions.csv", "split.csv")  # an ensemble: no history
CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


# ----------------------------------------------------------------------------------------- writing
def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE)
    return rc == 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bundle(dest: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create or replace the bundle folder `dest` atomically.

    `fill(tmpdir)` writes every file into a temporary sibling folder; only once it returns is the
    folder swapped into place (renameat2 exchange, else two renames with recovery). A crash at any
    moment leaves either the old bundle or the new one, never a mix.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-{os.getpid()}-", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a bundle is meant to be shared
    try:
        fill(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if dest.exists():
            if not _rename_exchange(tmp, dest):
                old = dest.parent / f".old-{dest.name}-{uuid.uuid4().hex[:8]}"
                os.rename(dest, old)
                os.rename(tmp, dest)
                tmp = old
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous bundle
        else:
            os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        if tmp.exists() and tmp.name.startswith(".tmp-"):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _remove_stale_temporaries(dest: Path) -> None:
    """Delete temporary folders of `dest` left by writers that were killed (their process is gone)."""
    for p in dest.parent.glob(f".tmp-{dest.name}-*-*"):
        try:
            pid = int(p.name[len(f".tmp-{dest.name}-"):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def update_metadata(bundle: str | Path, updates: dict,
                    files: Optional[dict[str, Callable[[Path], None]]] = None) -> Path:
    """Set top-level `updates` in a bundle's metadata.json, atomically.

    `files` maps a file name to a writer `fn(path)` that (re)creates it; every other file is copied unchanged.
    """
    bundle = Path(bundle)
    meta = read_metadata(bundle)
    meta.update(updates)
    files = files or {}

    def fill(tmp: Path) -> None:
        for f in bundle.iterdir():
            if f.is_file() and f.name != "metadata.json" and f.name not in files:
                shutil.copy2(f, tmp / f.name)
        for name, write in files.items():
            write(tmp / name)
        write_json(tmp / "metadata.json", meta)

    return write_bundle(bundle, fill)


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


# ----------------------------------------------------------------------------------------- reading
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=64)
def _bundle_summary(meta_path: str, mtime_ns: int) -> tuple[str, str]:
    """(kind, dataset kind) of one metadata.json version; keyed on its mtime, so a rewritten file is read again."""
    try:
        meta = json.loads(Path(meta_path).read_text())
    except (OSError, json.JSONDecodeError):
        return "classifier", ""
    return str(meta.get("kind", "classifier")), str((meta.get("dataset") or {}).get("kind", ""))


def bundle_summary(path: str | Path) -> tuple[str, str]:
    """(kind, dataset kind) of a bundle, cached until its metadata.json changes: listing bundles per request
    (REST `/checkpoints`, every dashboard rerun) does not re-parse every metadata.json."""
    meta_path = Path(path) / "metadata.json"
    try:
        mtime = meta_path.stat().st_mtime_ns
    except OSError:
        return "classifier", ""
    return _bundle_summary(str(meta_path), mtime)


def bundle_kind(path: str | Path) -> str:
    """"classifier" or "segmenter" (metadata.json's `kind`; bundles without one are classifiers)."""
    return bundle_summary(path)[0]


def list_bundles(root: str | Path = CHECKPOINTS_DIR, kind: Optional[str] = None) -> list[Path]:
    """Every folder under `root` that has a metadata.json (hidden temporary folders excluded); with `kind`
    ("classifier" or "segmenter") only bundles of that kind."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and (p / "metadata.json").is_file())
    return found if kind is None else [p for p in found if bundle_kind(p) == kind]


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / "metadata.json" if path.is_dir() else path
    try:
        return json.loads(meta_path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{meta_path.parent} is not a checkpoint: metadata.json is missing.") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is damaged (invalid JSON): {exc}") from exc


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def verify_bundle(path: str | Path) -> dict:
    """Check that a bundle is complete and its model file matches the recorded sha256; returns metadata."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint folder not found: {path}")
    meta = read_metadata(path)
    model_file = path / "model.keras"
    if not model_file.is_file():
        raise CheckpointError(f"{path.name}: model.keras is missing; retrain with `python train.py`.")
    expected = meta.get("model_sha256")
    if not expected:
        raise CheckpointError(f"{path.name}: metadata.json records no model_sha256; the bundle cannot be verified.")
    actual = sha256_file(model_file)
    if actual != expected:
        raise CheckpointError(
            f"{path.name}: model.keras does not match the sha256 recorded in metadata.json (file changed, "
            "truncated or corrupted). Restore it from git or retrain with `python train.py`.")
    for key in ("class_names", "input_size", "backbone"):
        if key not in meta:
            raise CheckpointError(f"{path.name}: metadata.json lacks {key!r}.")
    return meta


def check_model_shape(name: str, outputs: int, side: int, class_names: Sequence[str], size: int) -> None:
    """Raise CheckpointError unless a model with `outputs` classes and input `side` fits metadata (classes, size)."""
    if outputs != len(class_names):
        raise CheckpointError(f"{name}: the model predicts {outputs} classes but metadata.json names "
                              f"{len(class_names)} ({', '.join(class_names)}).")
    if side != size:
        raise CheckpointError(f"{name}: model input {side} differs from metadata {size}.")


def _lazy_keras_forward(build: Callable[[], object]) -> Callable[[np.ndarray], np.ndarray]:
    """f(float32 batch) -> np.ndarray through a compiled Keras model that `build()` returns; TensorFlow is imported and
    the graph traced on the first call only (a warm OpenVINO start may never need it)."""
    state: dict = {}

    def forward(batch: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        if "fn" not in state:
            model = build()
            state["fn"] = tf.function(lambda x: model(x, training=False), reduce_retracing=True, autograph=False)
        return np.asarray(state["fn"](tf.convert_to_tensor(batch, tf.float32)))

    return forward


@dataclass
class Classifier:
    """A trained model behind the LIME-style contract: uint8 RGB images of any size -> probabilities.

    Attributes: class_names (K names), input_size (side S in pixels), metadata (the bundle's JSON).
    """

    model: "object"  # keras.Model: float32 (N, S, S, 3) in 0-255 -> softmax (N, K) (a DeferredModel until first use)
    class_names: tuple[str, ...]
    input_size: int
    metadata: dict = field(default_factory=dict)
    path: Optional[Path] = None
    temperature: float = 1.0
    clahe: bool = False
    batch_size: int = 32
    ood: Optional[object] = None  # core.ood.OODDetector when the bundle has ood.npz
    patches: Optional[PatchConfig] = None  # patch checkpoints: grid-averaged tiles of the whole image
    backend: str = "keras"  # forward pass of predict_proba: keras | openvino | auto (see core.backends)
    backend_info: dict = field(default_factory=dict)
    perturbation: str = "float32"  # forward of perturbation explainers: float32 (the same as predictions) |
    # openvino-bf16 (only where the bundle's fast_forward.json records that explanations agree; see core.backends)
    perturbation_methods: Optional[tuple[str, ...]] = None  # the methods that use it (None: every one)
    _forward: Optional[Callable] = field(default=None, repr=False)
    _perturb_forward: Optional[Callable] = field(default=None, repr=False)
    _features: Optional[Callable] = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def name(self) -> str:
        return self.path.name if self.path else self.metadata.get("name", "model")

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """One image (H, W[, C]) -> float32 (S, S, 3) in 0-255: the model's exact input (whole-image models)."""
        return model_input(image, self.input_size, self.clahe).astype(np.float32)

    def prepare_batch(self, images) -> np.ndarray:
        """uint8 images (N, H, W, 3) or a list of arrays of any sizes -> float32 (N, S, S, 3)."""
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):  # one image
            images = [images]
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (
                self.input_size, self.input_size, 3) and not self.clahe:
            return images.astype(np.float32, copy=False)
        return np.stack([self.prepare(im) for im in images]) if len(images) else np.zeros(
            (0, self.input_size, self.input_size, 3), np.float32)

    # -- the whole image as the model sees it: one resized image, or a grid of tiles
    def work_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> the image at the resolution the model reads it: (S, S, 3) for whole-image
        models; scaled by input_size / patch_size (tiles of S x S) for patch models."""
        if self.patches is None:
            return resize(image, (self.input_size, self.input_size))
        return patch_work_image(image, self.patches)

    @property
    def tile_stride(self) -> int:
        return self.patches.work_stride if self.patches else self.input_size

    def tiles(self, work: np.ndarray, stride: Optional[int] = None) -> np.ndarray:
        """Work image(s) (H, W, 3) or (N, H, W, 3) -> float32 model inputs (N * T, S, S, 3).

        `stride` (work pixels) defaults to the prediction grid's; explainers may ask for a finer grid.
        """
        if self.patches is None:
            return self.prepare_batch(work)
        t = tiles(np.asarray(work), self.input_size, stride or self.tile_stride)
        if self.clahe:
            t = np.stack([apply_clahe(im.astype(np.uint8)) for im in t])
        return t.astype(np.float32, copy=False)

    def n_tiles(self, image: np.ndarray) -> int:
        """Model inputs one prediction of `image` takes: 1 for whole-image models, the grid size for patch models
        (a large field on the 50 px IDC model is hundreds)."""
        if self.patches is None:
            return 1
        from core.patches import grid_boxes

        return len(grid_boxes(self.work_image(image).shape[:2], self.input_size, self.tile_stride))

    @staticmethod
    def _as_images(images):
        """Images as the caller passed them where each is already (H, W, 3); any other single image or list entry
        (grey, one channel, RGBA, bool) through `ensure_rgb_uint8`, which names what is wrong with an unusable one."""
        def one(im):
            arr = np.asarray(im)
            ready = arr.ndim == 3 and arr.shape[2] == 3 and arr.size and (arr.dtype == np.uint8 or arr.dtype.kind == "f")
            return arr if ready else ensure_rgb_uint8(arr)

        if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3 and images.dtype.kind in "uf":
            return images
        if isinstance(images, np.ndarray) and images.ndim != 4:
            return one(images)
        return [one(im) for im in images]

    def _tile_batches(self, images, work: bool) -> tuple[np.ndarray, list[int]]:
        images = images if work else self._as_images(images)
        if self.patches is None:
            x = self.prepare_batch(images)
            return x, [1] * len(x)
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        if work and isinstance(images, np.ndarray) and images.ndim == 4:
            x = self.tiles(images)
            return x, [len(x) // max(len(images), 1)] * len(images)
        parts = [self.tiles(im if work else self.work_image(np.asarray(im))) for im in images]
        if not parts:
            return np.zeros((0, self.input_size, self.input_size, 3), np.float32), []
        return np.concatenate(parts), [len(p) for p in parts]

    @staticmethod
    def _mean_per_image(out: np.ndarray, counts: list[int]) -> np.ndarray:
        if all(c == 1 for c in counts):
            return out
        ends = np.cumsum(counts)
        return np.stack([out[e - c:e].mean(axis=0) for c, e in zip(counts, ends)])

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Raw model softmax for prepared float32 inputs (N, S, S, 3), compiled, in chunks of `batch_size`.

        OpenVINO reads its converted model from the on-disk cache when there is one, so a warm start predicts without
        TensorFlow and the Keras model (loaded on first use of `model`)."""
        if self._forward is None:  # choose_forward returns the Keras forward itself for backend "keras"
            from core.backends import choose_forward

            self._forward, self.backend_info = choose_forward(
                lambda: self.model, self.input_size, _lazy_keras_forward(lambda: self.model),
                self.metadata.get("model_sha256"), self.backend)
        out = self._chunked(self._forward, batch)
        if len(out):
            check_model_shape(self.name, out.shape[-1], self.input_size, self.class_names, self.input_size)
        return out

    def _chunked(self, fwd: Callable, batch: np.ndarray, width: Optional[int] = None) -> np.ndarray:
        """fwd over `batch` in chunks of `batch_size` -> float32 (N, width), width defaulting to the class count."""
        if len(batch) == 0:
            return np.zeros((0, self.num_classes if width is None else width), np.float32)
        return np.concatenate([np.asarray(fwd(batch[i:i + self.batch_size]), np.float32)
                               for i in range(0, len(batch), self.batch_size)])

    def features(self, images) -> np.ndarray:
        """Pooled backbone features (N, D) of uint8 images of any size (for the OOD detector; tile mean), on OpenVINO
        float32 where predictions use it and the converted feature model agrees with Keras (core.backends)."""
        if self._features is None:
            def feature_model():
                import keras

                from core.ood import feature_layer

                return keras.Model(self.model.inputs, self.model.get_layer(feature_layer(self.model)).output)

            keras_features = _lazy_keras_forward(feature_model)
            key = self.metadata.get("model_sha256")
            self._features = keras_features
            if self.backend != "keras" and key and (self._forward is None or self.backend_info.get(
                    "backend", "").startswith("openvino")):
                from core.backends import choose_forward

                fwd, info = choose_forward(feature_model, self.input_size, keras_features, f"{key}-features", "auto")
                if info["backend"].startswith("openvino"):
                    self._features = fwd
        x, counts = self._tile_batches(images, work=False)
        return self._mean_per_image(self._chunked(self._features, x, width=0), counts)

    def ood_check(self, images) -> Optional[list[dict]]:
        """Per image: {'score', 'threshold', 'out_of_distribution', 'training_copy'} (a copy of a training image is
        never out of distribution, see core.ood); None if the bundle has no detector."""
        if self.ood is None:
            return None
        scores, copies, flagged = self.ood.check(self.features(images))
        return [{"score": float(s), "threshold": self.ood.threshold, "out_of_distribution": bool(f),
                 "training_copy": bool(c)} for s, c, f in zip(scores, copies, flagged)]

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        return apply_temperature(probs, self.temperature)

    def raw_proba(self, images, work: bool = False, progress: Optional[Callable[[float], None]] = None
                  ) -> np.ndarray:
        """Uncalibrated probabilities [N, K]; patch models average their tiles' softmax per image."""
        x, counts = self._tile_batches(images, work)
        if progress is None:
            out = self.forward(x)
        else:
            outs, step = [], max(self.batch_size, 1) * 4
            for i in range(0, len(x), step):
                outs.append(self.forward(x[i:i + step]))
                progress(min(1.0, (i + step) / max(len(x), 1)))
            out = np.concatenate(outs) if outs else self.forward(x)
        return self._mean_per_image(out, counts)

    def predict_proba(self, images, batch_size: Optional[int] = None,
                      progress: Optional[Callable[[float], None]] = None) -> np.ndarray:
        """Calibrated class probabilities float32 [N, K] for uint8 RGB images of any size (one image (H, W, 3),
        a batch (N, H, W, 3) or a list; grey, RGBA, bool and 16-bit arrays are converted by `ensure_rgb_uint8`)."""
        if batch_size:
            self.batch_size = int(batch_size)
        return self.calibrate(self.raw_proba(images, work=False, progress=progress)).astype(np.float32)

    def predict_work(self, images, progress: Optional[Callable[[float], None]] = None) -> np.ndarray:
        """Calibrated probabilities [N, K] for images already at work resolution (see `work_image`);
        perturbation explainers use this on their perturbed copies of the work image."""
        return self.calibrate(self.raw_proba(images, work=True, progress=progress)).astype(np.float32)

    def perturbation_forward(self) -> Callable[[np.ndarray], np.ndarray]:
        """The forward pass for perturbed copies: `forward` (float32), or OpenVINO bfloat16 when
        `perturbation == "openvino-bf16"` (falls back to float32 if it cannot be compiled)."""
        if self.perturbation == "float32":
            return self.forward
        if self._perturb_forward is None:
            try:
                from core.backends import BATCH_HINT, openvino_forward

                fast = openvino_forward(lambda: self.model, self.input_size, self.metadata.get("model_sha256"), "bf16",
                                        BATCH_HINT)
                self._perturb_forward = lambda x: self._chunked(fast, x)  # noqa: E731
            except Exception:  # OpenVINO unavailable here: keep float32
                self.perturbation = "float32"
                return self.forward
        return self._perturb_forward

    def fast_perturbation_allowed(self, method: str) -> bool:
        """False for a perturbation method whose agreement check failed on this bundle (it perturbs on float32)."""
        return self.perturbation_methods is None or method in self.perturbation_methods

    def predict_perturbed(self, images, progress: Optional[Callable[[float], None]] = None) -> np.ndarray:
        """Like `predict_work` (work-resolution images -> calibrated [N, K]) on the perturbation forward pass;
        LIME, SHAP and occlusion use it where `fast_perturbation_allowed`. Displayed predictions and metrics stay on
        `predict_proba` / `predict_work`."""
        fwd = self.perturbation_forward()
        if fwd is self.forward:
            return self.predict_work(images, progress)
        x, counts = self._tile_batches(images, True)
        out = fwd(x)
        if progress is not None:
            progress(1.0)
        return self.calibrate(self._mean_per_image(out, counts)).astype(np.float32)

    __call__ = predict_proba


class DeferredModel:
    """The Keras model of a warm start, loaded (TensorFlow imported) by the first caller that needs it; concurrent
    callers wait for that one load. Predictions go ahead on OpenVINO without it."""

    def __init__(self, load: Callable[[], object]):
        self._load = load
        self._lock = threading.Lock()
        self._model: Optional[object] = None

    def result(self):
        with self._lock:
            if self._model is None:
                self._model = self._load()
            return self._model


def _get_model(self: Classifier):
    """The Keras model; a warm start's deferred model is loaded on first use (a load error is raised here)."""
    m = self.__dict__["_model"]
    if isinstance(m, DeferredModel):
        m = m.result()
        self.__dict__["_model"] = m
    return m


def _set_model(self: Classifier, value) -> None:
    self.__dict__["_model"] = value


Classifier.model = property(_get_model, _set_model, doc="The Keras model (a warm start loads it on first use).")


def run_batched(fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Concatenated outputs of a compiled `fn` over float32 chunks of `x` (the traced batch dim becomes None)."""
    import tensorflow as tf

    return np.concatenate([np.asarray(fn(tf.convert_to_tensor(x[i:i + batch_size], tf.float32)))
                           for i in range(0, len(x), batch_size)])


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) row-wise: temperature scaling of probabilities, float32 [N, K]."""
    p = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0:
        return p.astype(np.float32)
    logits = np.log(np.clip(p, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def load_classifier(path: str | Path, backend: Optional[str] = None) -> Classifier:
    """Load and verify a checkpoint bundle (sha256, class count) with Keras safe_mode=True.

    backend: forward pass of predict_proba, 'auto' (default, or $BREASTXAI_BACKEND): OpenVINO float32
    where it agrees with Keras (see core.backends), else Keras; 'keras'; 'openvino'; 'openvino-bf16'.
    A warm start ('auto' / 'openvino' with this model's converted copy cached) returns at once and predicts on
    OpenVINO; TensorFlow and the Keras model load on the first use of `Classifier.model` (explainers, training), in
    the caller's thread (importing TensorFlow from two threads at once can deadlock), and a model.keras that fails
    to load raises CheckpointError there.
    """
    from core.backends import requested_backend, warm

    path = Path(path)
    meta = verify_bundle(path)
    class_names = tuple(meta["class_names"])
    size = int(meta["input_size"])
    backend = requested_backend(backend)
    cached = warm(meta.get("model_sha256")) if backend in ("auto", "openvino") else None
    if cached is not None:
        check_model_shape(path.name, cached[1], cached[0], class_names, size)
        model: object = DeferredModel(lambda: _load_keras(path, class_names, size))
    else:
        model = _load_keras(path, class_names, size)
    prep = meta.get("preprocessing", {})
    ood = None
    if (path / "ood.npz").is_file():
        from core.ood import OODDetector

        try:
            ood = OODDetector.load(path / "ood.npz")
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path.name}: ood.npz is damaged ({exc}); refit with `python -m core.ood`.") from exc
    patches = PatchConfig.from_json(meta["patches"], size) if meta.get("patches") else None
    side = PATCH_SIDES.get(meta.get("dataset", {}).get("kind"))
    if patches is None and side:  # a patch-set model (IDC): a larger field is read as a grid of its patches
        patches = PatchConfig(side, size, side, min_tissue=0.0)
    perturbation, fast_methods = perturbation_backend(path, meta, backend)
    return Classifier(model=model, class_names=class_names, input_size=size, metadata=meta, path=path,
                      temperature=float(meta.get("calibration", {}).get("temperature", 1.0)),
                      clahe=bool(prep.get("clahe", False)), ood=ood, patches=patches, backend=backend,
                      perturbation=perturbation, perturbation_methods=fast_methods)


class InstalledBundles:
    """The bundles of one kind in one folder (checkpoints/ by default), each loaded on first use and kept;
    thread-safe. `InstalledClassifiers` and `InstalledSegmenters` name the kind and its loader."""

    kind = "classifier"
    #: how `python train.py` makes one, for the message when the folder has none
    how_to_train = "`python train.py`"

    def __init__(self, root: str | Path = CHECKPOINTS_DIR):
        self.root = Path(root)
        self._loaded: dict[str, object] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # Ray Serve ships the app to its replicas: models load there
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

    def _load(self, path: Path):
        raise NotImplementedError

    def names(self) -> list[str]:
        return [p.name for p in list_bundles(self.root, kind=self.kind)]

    def get(self, name: Optional[str]):
        """The named bundle loaded (default: the first by name); CheckpointNotFoundError if there is none such."""
        names = self.names()
        what = "checkpoint" if self.kind == "classifier" else f"{self.kind} checkpoint"
        if not names:
            raise CheckpointNotFoundError(f"No {what} in {self.root.name}/: train one with {self.how_to_train}.")
        name = name or names[0]
        if name not in names:
            raise CheckpointNotFoundError(f"Unknown {what} {name!r}; available: {', '.join(names)}.")
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = self._load(self.root / name)
            return self._loaded[name]


class InstalledClassifiers(InstalledBundles):
    """The classifier bundles of one folder. Used by the REST app and batch runs to name the checkpoint made for
    an out-of-distribution image."""

    def _load(self, path: Path):
        return load_classifier(path)

    def fitting(self, image: np.ndarray, exclude: Optional[str] = None) -> list[str]:
        """The checkpoints (but `exclude`) whose out-of-distribution detector accepts `image`, best fit first (see
        `core.ood.find_fitting`); a checkpoint that fails to load is left out."""
        from core.gallery import modality_of
        from core.ood import find_fitting

        def probe(name: str):
            clf = self.get(name)
            return (clf.ood_check([image]) or [None])[0], clf.patches is not None, modality_of(clf.metadata)

        return find_fitting((n for n in self.names() if n != exclude), probe)


def _load_keras(path: Path, class_names: tuple[str, ...], size: int):
    """model.keras of a verified bundle (safe_mode), checked against its metadata's classes and input size."""
    import keras

    import core.models  # noqa: F401  (registers BackbonePreprocess for deserialisation)

    try:
        model = keras.saving.load_model(path / "model.keras", compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for damaged archives
        raise CheckpointError(f"{path.name}: model.keras cannot be loaded ({type(exc).__name__}: {exc}).") from exc
    check_model_shape(path.name, int(model.output_shape[-1]), model.input_shape[1], class_names, size)
    if model.input_shape[1] != model.input_shape[2]:
        raise CheckpointError(f"{path.name}: model input {model.input_shape[1:3]} is not square.")
    return model


def perturbation_backend(path: Path, meta: dict, backend: str) -> tuple[str, Optional[tuple[str, ...]]]:
    """("openvino-bf16", methods) when the bundle's fast_forward.json says explanations on it agree with float32
    for this very model (sha256): methods None where every checked method agrees, else the methods that do; this CPU
    must compute bfloat16 natively (`core.backends.cpu_has_bf16`) and neither the backend nor
    $BREASTXAI_PERTURBATION may ask for float32; else ("float32", None). Without native bfloat16 OpenVINO emulates it
    on AVX512 CPUs, slower than float32 (busi_densenet121: 182 against 67 ms per image on a 2-core Xeon without
    AVX512-BF16)."""
    from core.backends import cpu_has_bf16

    if (backend == "keras" or os.environ.get("BREASTXAI_PERTURBATION", "").lower() == "float32"
            or not cpu_has_bf16()):
        return "float32", None
    f = Path(path) / "fast_forward.json"
    try:
        rec = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return "float32", None
    if rec.get("model_sha256") != meta.get("model_sha256") or not (rec.get("passed") or rec.get("passed_methods")):
        return "float32", None
    return rec.get("backend", "openvino-bf16"), None if rec.get("passed") else tuple(rec["passed_methods"])


def segmenter_for(classifier_meta: dict, root: str | Path = CHECKPOINTS_DIR) -> Optional[Path]:
    """The segmenter bundle under `root` whose training data has the same imaging modality as the classifier's
    (ultrasound: BUSI), or None."""
    from core.gallery import MODALITY, modality_of

    want = modality_of(classifier_meta)
    if want is None:
        return None
    return next((p for p in list_bundles(root, kind="segmenter") if MODALITY.get(bundle_summary(p)[1]) == want), None)


class InstalledSegmenters(InstalledBundles):
    """The lesion segmenter bundles of one folder (the REST app's /segment)."""

    kind = "segmenter"
    how_to_train = "`python train.py --task segmentation`"

    def _load(self, path: Path):
        return load_segmenter(path)


def load_segmenter(path: str | Path, backend: Optional[str] = None):
    """Load and verify a segmenter bundle (`train.py --task segmentation`) -> `core.segmentation.Segmenter`.

    `predict_proba_map(uint8 image of any size)` -> float32 (H, W); `predict_mask(image)` -> bool (H, W).
    backend as for `load_classifier`: 'auto' (default) runs the maps on OpenVINO float32 where it agrees with Keras
    within `core.backends.MAX_DP` per pixel ('openvino-bf16' too: lesion maps stay float32); 'keras'; 'openvino'.
    A warm start (converted model cached and checked on this runtime and CPU) returns without TensorFlow.
    """
    from core.backends import cache_dir, requested_backend, verified_earlier
    from core.segmentation import Segmenter

    path = Path(path)
    meta = verify_bundle(path)
    if meta.get("kind") != "segmenter":
        raise CheckpointError(f"{path.name} is a classifier, not a lesion segmenter: load it with load_classifier.")
    size = int(meta["input_size"])
    backend = requested_backend(backend)
    backend = "auto" if backend == "openvino-bf16" else backend
    key = meta.get("model_sha256")
    # A warm start: this model's converted copy is cached and passed its check against Keras on this runtime and CPU
    if backend in ("auto", "openvino") and key and (cache_dir() / f"{key}.xml").is_file() \
            and verified_earlier(key, "f32") is not None:
        model: object = DeferredModel(lambda: _load_segmenter_keras(path, size))
    else:
        model = _load_segmenter_keras(path, size)
    post = meta.get("postprocessing", {})
    return Segmenter(model=model, input_size=size, clahe=bool(meta.get("preprocessing", {}).get("clahe", False)),
                     threshold=float(post.get("threshold", 0.5)),
                     largest_region_only=bool(post.get("largest_region_only", False)), metadata=meta, path=path,
                     backend=backend)


def _load_segmenter_keras(path: Path, size: int):
    """model.keras of a verified segmenter bundle (safe_mode), checked to be a `size` px one-channel segmenter."""
    import keras

    import core.models  # noqa: F401  (registers BackbonePreprocess for deserialisation)

    try:
        model = keras.saving.load_model(path / "model.keras", compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for damaged archives
        raise CheckpointError(f"{path.name}: model.keras cannot be loaded ({type(exc).__name__}: {exc}).") from exc
    if tuple(model.input_shape[1:3]) != (size, size) or model.output_shape[-1] != 1:
        raise CheckpointError(f"{path.name}: the model ({model.input_shape} -> {model.output_shape}) is not a "
                              f"{size} px one-channel segmenter.")
    return model
