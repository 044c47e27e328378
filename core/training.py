"""Training loop: data -> model -> two-phase fit (head, then fine-tune) -> evaluated, atomic bundle.

The fast path caches the frozen trunk's activations (the original image plus `augment_copies`
augmented copies of each training image) and trains only the part of the network after the cut,
drawing one random copy per image per epoch. `cache=False` runs a plain `model.fit` on augmented
images, which is what the benchmark compares against.
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from core.data import Manifest, load_dataset, read_split, split_manifest, write_split
from core.data.loaders import CITATIONS
from core.errors import DatasetError
from core.checkpoints import run_batched
from core.preprocessing import load_image, model_input

log = logging.getLogger("breastxai.train")


@dataclass(frozen=True)
class TrainConfig:
    """Every option of `train.py`; defaults follow the seeds (Adam 1e-4, patience 10, LR x0.2)."""

    dataset: str = "busi"
    data_dir: str = "../shared/data/busi/Dataset_BUSI_with_GT"
    name: Optional[str] = None
    out_dir: str = "checkpoints"
    task: str = "binary"
    magnification: Optional[int] = None
    backbone: str = "densenet121"
    input_size: int = 224
    weights: str = "none"
    pooling: str = "avg"
    head_units: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.5
    l2: float = 0.01
    fine_tune_layers: int = 10
    head_epochs: int = 30
    fine_tune_epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-4
    fine_tune_lr: float = 1e-5
    patience: int = 10
    lr_factor: float = 0.2
    lr_patience: int = 4
    seed: int = 42
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_file: Optional[str] = None
    clahe: bool = False
    class_weights: bool = True
    augment: bool = True
    augment_copies: int = 4
    cache: bool = True
    limit: Optional[int] = None
    feedback: Optional[str] = None  # SQLite feedback DB: consented, relabelled images join the training split
    verbose: int = 1

    @property
    def bundle_name(self) -> str:
        return self.name or f"{self.dataset}_{self.backbone}"


def set_seeds(seed: int) -> None:
    import keras

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent.parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent.parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def load_arrays(manifest: Manifest, size: int, clahe: bool = False,
                progress: Optional[Callable[[int, int], None]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image with `load_image`, resize to (size, size) -> uint8 (N, S, S, 3), labels (N,)."""
    x = np.zeros((len(manifest), size, size, 3), np.uint8)
    for i, s in enumerate(manifest.samples):
        x[i] = model_input(load_image(s.path), size, clahe)
        if progress:
            progress(i + 1, len(manifest))
    return x, np.asarray(manifest.labels, dtype=np.int64)


def make_augmenter(seed: int):
    """Random flips, rotation (±36°), zoom (±10%), brightness and contrast (±10%) on 0-255 floats."""
    import keras
    from keras import layers

    return keras.Sequential([
        layers.RandomFlip("horizontal_and_vertical", seed=seed),
        layers.RandomRotation(0.1, fill_mode="reflect", seed=seed + 1),
        layers.RandomZoom(0.1, fill_mode="reflect", seed=seed + 2),
        layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed + 3),
        layers.RandomContrast(0.1, seed=seed + 4),
    ], name="augment")


def class_weight_vector(y: np.ndarray, k: int) -> np.ndarray:
    """'balanced' weights n / (k * n_c) per class (sklearn's formula); classes absent get 1."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y)
    w = np.ones(k)
    w[present] = compute_class_weight("balanced", classes=present, y=y)
    return w


class _CachedSequence:
    """Keras PyDataset over cached activations: each epoch, one random copy per image, shuffled."""

    def __new__(cls, *args, **kwargs):
        import keras

        class Seq(keras.utils.PyDataset):
            def __init__(self, cache, y, sw, batch_size, seed):
                super().__init__()
                self.cache, self.y, self.sw, self.bs = cache, y, sw, batch_size
                self.rng = np.random.default_rng(seed)
                self.on_epoch_end()

            def __len__(self):
                return int(np.ceil(len(self.y) / self.bs))

            def on_epoch_end(self):
                self.order = self.rng.permutation(len(self.y))
                self.copy = self.rng.integers(0, self.cache.shape[0], len(self.y))

            def __getitem__(self, i):
                idx = self.order[i * self.bs:(i + 1) * self.bs]
                return self.cache[self.copy[idx], idx], self.y[idx], self.sw[idx]

        return Seq(*args, **kwargs)


def _epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t)

    return EpochTimer()


def _callbacks(cfg: TrainConfig, monitor: str = "val_loss"):
    import keras

    return [keras.callbacks.EarlyStopping(monitor=monitor, patience=cfg.patience, restore_best_weights=True,
                                          verbose=1),
            keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=cfg.lr_factor, patience=cfg.lr_patience,
                                              min_lr=1e-7, verbose=1)]


def _compile(model, lr: float) -> None:
    import keras

    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])


@dataclass
class Phase:
    name: str
    fine_tune_layers: int  # -1 all backbone layers, 0 head only
    epochs: int
    lr: float


def plan_phases(cfg: TrainConfig) -> list[Phase]:
    """Pretrained trunk: head, then fine-tune the last N layers. From scratch: one phase, all layers."""
    if cfg.weights == "none" or cfg.backbone == "simple_cnn":
        return [Phase("full", -1, cfg.head_epochs + cfg.fine_tune_epochs, cfg.lr)]
    phases = [Phase("head", 0, cfg.head_epochs, cfg.lr)] if cfg.head_epochs > 0 else []
    if cfg.fine_tune_layers != 0 and cfg.fine_tune_epochs > 0:
        phases.append(Phase("fine_tune", cfg.fine_tune_layers, cfg.fine_tune_epochs, cfg.fine_tune_lr))
    if not phases:
        raise ValueError("Nothing to train: set --head-epochs or --fine-tune-epochs above 0.")
    return phases


def fit_model(model, cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
              y_val: np.ndarray, num_classes: int) -> tuple[list[dict], dict]:
    """Run every phase; returns (history rows, timing info). Mutates `model`'s weights only."""
    import keras
    import tensorflow as tf

    from core.models import backbone_layers, cut_point, set_trainable

    phases = plan_phases(cfg)
    cw = class_weight_vector(y_train, num_classes) if cfg.class_weights else np.ones(num_classes)
    sw_train = cw[y_train].astype(np.float32)
    verbose = 0 if cfg.verbose == 0 else (1 if sys.stdout.isatty() else 2)  # bar on a terminal, lines in a log
    history: list[dict] = []
    timing: dict = {"phases": []}
    augmenter = make_augmenter(cfg.seed) if cfg.augment else None

    # Where to cut: before the first layer that any phase trains.
    cut = None
    if cfg.cache:
        deepest = max(p.fine_tune_layers if p.fine_tune_layers >= 0 else 10**9 for p in phases)
        set_trainable(model, deepest)
        first = next((l.name for l in model.layers if l.trainable and l.weights), None)
        if first is not None and deepest < 10**9:
            cut = cut_point(model, first)
    if cut is not None:
        t0 = time.time()
        trunk = keras.Model(model.input, model.get_layer(cut).output)
        tail = keras.Model(model.get_layer(cut).output, model.output)
        fwd = tf.function(lambda x: trunk(x, training=False), reduce_retracing=True, autograph=False)
        copies = [x_train.astype(np.float32)]
        for c in range(cfg.augment_copies if augmenter is not None else 0):
            aug = np.concatenate([np.asarray(augmenter(tf.convert_to_tensor(
                x_train[i:i + 64], tf.float32), training=True)) for i in range(0, len(x_train), 64)])
            copies.append(aug)
        log.info("Caching trunk activations at %r for %d train images x %d copies and %d val images",
                 cut, len(x_train), len(copies), len(x_val))
        cache = np.stack([run_batched(fwd, c, cfg.batch_size) for c in copies])
        val_feats = run_batched(fwd, x_val.astype(np.float32), cfg.batch_size)
        timing["cache_seconds"] = time.time() - t0
        timing["cut_layer"] = cut
        log.info("Cached %s activations (%.0f MB) in %.1f s", cache.shape, cache.nbytes / 2**20,
                 timing["cache_seconds"])
        train_data = _CachedSequence(cache, y_train, sw_train, cfg.batch_size, cfg.seed)
        val_data = (val_feats, y_val)
        target = tail
    else:
        ds = tf.data.Dataset.from_tensor_slices((x_train, y_train, sw_train)).shuffle(
            len(x_train), seed=cfg.seed, reshuffle_each_iteration=True).batch(cfg.batch_size)
        if augmenter is not None:
            ds = ds.map(lambda x, y, w: (augmenter(tf.cast(x, tf.float32), training=True), y, w),
                        num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.map(lambda x, y, w: (tf.cast(x, tf.float32), y, w))
        train_data = ds.prefetch(tf.data.AUTOTUNE)
        val_data = (x_val.astype(np.float32), y_val)
        target = model

    epoch0 = 0
    for phase in phases:
        n_trainable = set_trainable(model, phase.fine_tune_layers)
        log.info("Phase %s: %d backbone layers trainable (of %d), lr %.1e, up to %d epochs", phase.name,
                 n_trainable, len(backbone_layers(model)), phase.lr, phase.epochs)
        _compile(target, phase.lr)
        t0, timer = time.time(), _epoch_timer()
        h = target.fit(train_data, validation_data=val_data, epochs=epoch0 + phase.epochs,
                       initial_epoch=epoch0, callbacks=[*_callbacks(cfg), timer], verbose=verbose)
        secs = time.time() - t0
        n_ep = len(h.history.get("loss", []))
        timing["phases"].append({"phase": phase.name, "epochs": n_ep, "seconds": secs,
                                 "seconds_per_epoch": secs / max(n_ep, 1), "epoch_seconds": timer.seconds})
        for j in range(n_ep):
            history.append({"epoch": epoch0 + j + 1, "phase": phase.name,
                            **{k: float(v[j]) for k, v in h.history.items()}})
        epoch0 += n_ep
    return history, timing


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


def prediction_rows(split: str, manifest: Manifest, probs: np.ndarray, class_names: Sequence[str]) -> list[list]:
    rows = []
    for s, p in zip(manifest.samples, probs):
        rows.append([split, os.path.relpath(s.path, manifest.root), s.class_name, class_names[int(np.argmax(p))],
                     *[f"{v:.6f}" for v in p]])
    return rows


def train(cfg: TrainConfig, argv: Optional[Sequence[str]] = None) -> Path:
    """Train one checkpoint from `cfg` and write its bundle to `cfg.out_dir/cfg.bundle_name`."""
    import keras
    import tensorflow as tf

    from core.checkpoints import write_bundle, write_csv, write_json
    from core.evaluation import classification_metrics, fit_temperature
    from core.checkpoints import apply_temperature
    from core.models import ModelConfig, build_model, last_conv_layer, sha256_file

    t_start = time.time()
    set_seeds(cfg.seed)
    opts = {"task": cfg.task, "magnification": cfg.magnification} if cfg.dataset == "breakhis" else {}
    manifest = load_dataset(cfg.dataset, cfg.data_dir, **opts)
    if cfg.limit:
        rng = np.random.default_rng(cfg.seed)
        keep = np.sort(rng.permutation(len(manifest))[:cfg.limit])
        manifest = manifest.subset(keep)
    if cfg.split_file:
        splits = read_split(cfg.split_file, manifest.root, manifest.class_names, manifest.name)
    else:
        splits = split_manifest(manifest, cfg.split, cfg.seed)
    for s in ("train", "val", "test"):
        if len(splits[s]) == 0:
            raise DatasetError(f"The {s} split is empty; the dataset is too small for a {cfg.split} split.")
    k = len(manifest.class_names)
    log.info("Dataset %s at %s: %d images, classes %s", manifest.name, manifest.root, len(manifest),
             manifest.class_counts())
    log.info("Split (seed %d): train %d, val %d, test %d", cfg.seed, *(len(splits[s]) for s in ("train", "val", "test")))

    arrays = {}
    for s in ("train", "val", "test"):
        bar = keras.utils.Progbar(len(splits[s]), verbose=1 if sys.stdout.isatty() else 0)
        arrays[s] = load_arrays(splits[s], cfg.input_size, cfg.clahe, lambda i, n: bar.update(i))
        log.info("Decoded %d %s images", len(splits[s]), s)

    n_feedback = 0
    if cfg.feedback:
        from core.feedback import FeedbackStore

        extra = FeedbackStore(cfg.feedback).consented_images(manifest.class_names)
        if extra:
            xs = np.stack([model_input(img, cfg.input_size, cfg.clahe) for img, _ in extra])
            arrays["train"] = (np.concatenate([arrays["train"][0], xs]),
                               np.concatenate([arrays["train"][1], [lab for _, lab in extra]]))
        n_feedback = len(extra)
        log.info("Added %d consented feedback image(s) from %s to the training split", n_feedback, cfg.feedback)

    model, provenance = build_model(ModelConfig(
        backbone=cfg.backbone, num_classes=k, input_size=cfg.input_size, pooling=cfg.pooling,
        head_units=tuple(cfg.head_units), dropout=cfg.dropout, l2=cfg.l2, weights=cfg.weights))
    log.info("Model %s: %d layers, %d parameters; weights: %s", model.name, len(model.layers),
             model.count_params(), provenance["source"])

    history, timing = fit_model(model, cfg, *arrays["train"], *arrays["val"], num_classes=k)

    fwd = tf.function(lambda x: model(x, training=False), reduce_retracing=True, autograph=False)
    raw = {s: run_batched(fwd, arrays[s][0].astype(np.float32), cfg.batch_size) for s in ("val", "test")}
    temperature = fit_temperature(arrays["val"][1], raw["val"])
    probs = {s: apply_temperature(raw[s], temperature) for s in raw}
    metrics = {s: classification_metrics(arrays[s][1], probs[s], manifest.class_names, seed=cfg.seed)
               for s in ("val", "test")}
    uncal = classification_metrics(arrays["test"][1], raw["test"], manifest.class_names, n_boot=0)
    log.info("Temperature %.3f; validation accuracy %.3f, macro ROC AUC %s (choose settings on these); "
             "test ECE %.3f (uncalibrated %.3f)", temperature, metrics["val"]["accuracy"],
             metrics["val"]["roc_auc_macro"], metrics["test"]["ece"], uncal["ece"])

    from core import ood as ood_mod

    fl = ood_mod.feature_layer(model)
    fmodel = keras.Model(model.inputs, model.get_layer(fl).output)
    ffn = tf.function(lambda x: fmodel(x, training=False), reduce_retracing=True, autograph=False)
    feats = {s: run_batched(ffn, arrays[s][0].astype(np.float32), cfg.batch_size) for s in ("train", "val", "test")}
    detector = ood_mod.fit(feats["train"], arrays["train"][1], feats["val"])
    ood_info = ood_mod.summary(detector, fl, feats["test"])

    argv = list(argv) if argv is not None else None
    name = cfg.bundle_name
    metadata = {
        "name": name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "train.py", *map(_quote, argv)]) if argv is not None else None,
        "argv": argv,
        "git_commit": git_commit(),
        "config": {k2: (list(v) if isinstance(v, tuple) else v) for k2, v in asdict(cfg).items()},
        "dataset": {"kind": manifest.name, "root": str(cfg.data_dir), "n_images": len(manifest),
                    "class_counts": manifest.class_counts(), "citation": CITATIONS.get(manifest.name),
                    "task": cfg.task if cfg.dataset == "breakhis" else None,
                    "magnification": cfg.magnification},
        "split": {"seed": cfg.seed, "fractions": list(cfg.split), "group_aware": True,
                  "file": "split.csv", "reused_from": cfg.split_file,
                  "feedback_images_added_to_train": n_feedback, "feedback_db": cfg.feedback,
                  "counts": {s: len(splits[s]) for s in ("train", "val", "test")},
                  "class_counts": {s: splits[s].class_counts() for s in ("train", "val", "test")}},
        "class_names": list(manifest.class_names),
        "input_size": cfg.input_size,
        "backbone": cfg.backbone,
        "weights": provenance,
        "preprocessing": {"decoder": "core.preprocessing.load_image", "resize": "cv2 INTER_AREA/LINEAR to square",
                          "clahe": cfg.clahe, "normalisation": "in-graph BackbonePreprocess layer",
                          "input_range": "RGB 0-255"},
        "head": {"pooling": cfg.pooling, "units": list(cfg.head_units), "dropout": cfg.dropout, "l2": cfg.l2},
        "gradcam_layer": last_conv_layer(model),
        "training": {"epochs": len(history), "phases": timing["phases"], "cache_seconds": timing.get("cache_seconds"),
                     "cut_layer": timing.get("cut_layer"),
                     "wall_seconds": None, "platform": platform.platform(),
                     "tensorflow": tf.__version__, "keras": keras.__version__},
        "calibration": {"method": "temperature scaling on the validation split", "temperature": temperature,
                        "test_ece_before": uncal["ece"], "test_ece_after": metrics["test"]["ece"]},
        "metrics": metrics,
        "ood": ood_info,
    }
    hist_keys = sorted({k2 for row in history for k2 in row} - {"epoch", "phase"})
    pred_header = ["split", "path", "true", "predicted", *[f"p_{c}" for c in manifest.class_names]]
    pred_rows = [r for s in ("val", "test") for r in prediction_rows(s, splits[s], probs[s], manifest.class_names)]

    def fill(tmp: Path) -> None:
        model.save(tmp / "model.keras")
        metadata["model_sha256"] = sha256_file(tmp / "model.keras")
        metadata["training"]["wall_seconds"] = round(time.time() - t_start, 1)
        write_csv(tmp / "history.csv", ["epoch", "phase", *hist_keys],
                  [[r["epoch"], r["phase"], *[r.get(k2, "") for k2 in hist_keys]] for r in history])
        write_csv(tmp / "predictions.csv", pred_header, pred_rows)
        write_split(splits, tmp / "split.csv")
        detector.save(tmp / "ood.npz")
        write_json(tmp / "metadata.json", metadata)

    dest = write_bundle(Path(cfg.out_dir) / name, fill)
    log.info("Wrote %s in %.1f min", dest, (time.time() - t_start) / 60)
    return dest
