"""Classifier training: data -> model -> two-phase fit (head, then fine-tune) -> evaluated, atomic bundle.

The fast path caches the frozen trunk's activations (the original image plus `augment_copies`
augmented copies of each training image) and trains only the part of the network after the cut,
drawing one random copy per image per epoch. `cache=False` runs a plain `model.fit` on augmented
images, which is what the benchmark compares against.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from core.checkpoints import run_batched
from core.data import Manifest, load_dataset, read_split, split_manifest, write_split
from core.data.loaders import CITATIONS
from core.errors import ConfigError, DatasetError
from core.preprocessing import apply_clahe, model_input
from core.training.common import (available_memory, batch_spec, git_commit, joint_geometry, multiworker_strategy,
                                  quote_arg, resolve_precision, run_phase, run_record, set_seeds, weights_digest)

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
    head_units: tuple[int, ...] = (256, 128, 64)  # () : a linear head
    trunk_layer: Optional[str] = None  # cut the backbone here (core.models.ModelConfig.trunk_layer)
    scales: tuple[int, ...] = ()  # extra input sides for the trunk (core.models.ModelConfig.scales)
    logistic_c: Optional[float] = None  # fit the linear head by sklearn LogisticRegression(C) on cached features
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
    patches: int = 0  # >0: train on N random tissue crops per image per epoch; predict by grid-averaged tiles
    patch_size: int = 448  # crop side in original pixels (resized to input_size)
    patch_stride: Optional[int] = None  # prediction grid step in original pixels (default: patch_size)
    patch_scale_jitter: float = 0.0  # training crop side = patch_size * 2**U(-j, j), in octaves
    colour_jitter: float = 0.0  # >0: random hue (this factor) and saturation (2x) changes: stain variation
    stain_standardise: bool = False  # in-graph per-image optical-density standardisation (StainStandardise)
    flip: str = "horizontal_and_vertical"  # random flips: "horizontal" keeps ultrasound's skin-up geometry
    rotation: float = 0.1  # random rotation, ± this fraction of a full turn (0.1 = ±36°)
    precision: str = "float32"  # "bfloat16": oneDNN mixed precision in the fits (float32 weights) where the CPU has it
    cv_folds: int = 0  # >1: also report group-wise K-fold cross-validation over the whole dataset
    cv_scope: str = "all"  # "train+val": cross-validate over the split's training and validation patients only
    calibration: str = "val"  # temperature from: "val" split, "inner-cv" (out-of-fold on train+val groups), "none"
    distribute: str = "none"  # "multiworker": tf.distribute.MultiWorkerMirroredStrategy across the TF_CONFIG cluster
    external: tuple[str, ...] = ()  # KIND=DIR datasets predicted after training as an external check
    distil_from: Optional[str] = None  # teacher bundle: train on its softened probabilities (core.training.distil)
    distil_weight: float = 0.5  # share of the teacher's soft targets in the training targets (rest: true labels)
    distil_temperature: float = 2.0  # the teacher's logits are divided by this before the softmax
    mixup: float = 0.0  # >0: mixup (Zhang et al. 2018), each batch mixed with itself shuffled, lambda ~ Beta(a, a)
    aux_mask: float = 0.0  # >0: the lesion masks as a second training target, with this weight (see `with_mask_head`)
    seg_dice: str = "every_image"  # segmentation: the soft Dice term over every image or only "lesion_images"
    seg_decoder: str = "unet"  # segmentation: "unet" (skips concatenated) or "attention" (skips gated first)
    ema: float = 0.0  # segmentation: >0 keeps an exponential moving average of the weights (this momentum per step)
    deep_supervision: float = 0.0  # segmentation: >0 trains auxiliary maps of decoder steps 1-4, each weighted this
    seg_classify: float = 0.0  # segmentation: >0 also trains an image-class head on the encoder, loss weighted this
    elastic: float = 0.0  # segmentation: >0 random elastic deformation of image and mask, this magnitude
    verbose: int = 1

    @property
    def bundle_name(self) -> str:
        if self.name:
            return self.name
        return f"{self.dataset}_unet_{self.backbone}" if self.task == "segmentation" else f"{self.dataset}_{self.backbone}"

    @property
    def patch_config(self):
        """core.patches.PatchConfig for patch training, else None."""
        from core.patches import PatchConfig

        if self.patches <= 0:
            return None
        return PatchConfig(self.patch_size, self.input_size, self.patch_stride or self.patch_size,
                           scale_jitter=self.patch_scale_jitter)


#: Largest share of the free memory the activation cache may take before training falls back to plain fit.
CACHE_MEMORY_FRACTION = 0.6


def load_arrays(manifest: Manifest, size: int, clahe: bool = False,
                progress: Optional[Callable[[int, int], None]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image with `load_image`, resize to (size, size) -> uint8 (N, S, S, 3), labels (N,)."""
    x = np.zeros((len(manifest), size, size, 3), np.uint8)
    for i, s in enumerate(manifest.samples):
        x[i] = model_input(manifest.read(s), size, clahe)
        if progress:
            progress(i + 1, len(manifest))
    return x, np.asarray(manifest.labels, dtype=np.int64)


def make_augmenter(seed: int, colour_jitter: float = 0.0, flip: str = "horizontal_and_vertical",
                   rotation: float = 0.1):
    """Random flips (`flip`: "horizontal", "vertical", "horizontal_and_vertical" or "none"), rotation
    (± `rotation` of a full turn), zoom (±10%), brightness and contrast (±10%) on 0-255 floats;
    with `colour_jitter` > 0 also hue (± that fraction of the colour wheel) and saturation changes,
    the usual stand-in for H&E stain variation between labs.

    Returns `augment(x)`; `augment.pair(x, masks)` applies the same random geometry to images (B, S, S, 3) and
    their masks (B, S, S, 1) in {0, 1}, and the brightness/contrast/colour changes to the images only."""
    import keras
    from keras import layers

    geometry = [layers.RandomFlip(flip, seed=seed)] if flip != "none" else []
    if rotation > 0:
        geometry.append(layers.RandomRotation(rotation, fill_mode="reflect", seed=seed + 1))
    geometry.append(layers.RandomZoom(0.1, fill_mode="reflect", seed=seed + 2))
    photometric = [layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed + 3),
                   layers.RandomContrast(0.1, seed=seed + 4)]
    if colour_jitter > 0:
        photometric += [layers.RandomHue(colour_jitter, value_range=(0, 255), seed=seed + 5),
                        layers.RandomSaturation((max(0.0, 0.5 - 2 * colour_jitter), min(1.0, 0.5 + 2 * colour_jitter)),
                                                value_range=(0, 255), seed=seed + 6)]
    seq = keras.Sequential(geometry + photometric, name="augment")

    def augment(x, training: bool = True):
        # Keras 3.15's RandomSaturation can leave values below 0: clip back to the image range.
        return keras.ops.clip(seq(x, training=training), 0.0, 255.0)

    augment.pair = lambda x, masks: joint_geometry(geometry, photometric, x, masks)
    return augment


def class_weight_vector(y: np.ndarray, k: int) -> np.ndarray:
    """'balanced' weights n / (k * n_c) per class (sklearn's formula); classes absent get 1."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(y)
    w = np.ones(k)
    w[present] = compute_class_weight("balanced", classes=present, y=y)
    return w


def mix_batch(x, y, sw, alpha: float, rng: np.random.Generator) -> tuple:
    """Mixup of one batch with itself in a random order: x, target rows y (N, K) and sample weights sw (N,)
    each become lambda * own + (1 - lambda) * partner's, one lambda ~ Beta(alpha, alpha) per batch."""
    lam = float(rng.beta(alpha, alpha))
    perm = rng.permutation(len(y))
    return (lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm],
            (lam * sw + (1 - lam) * sw[perm]).astype(np.float32))


class _CachedSequence:
    """Keras PyDataset over cached activations: each epoch, one random copy per image, shuffled; with
    `mixup` > 0 each batch is mixed (`mix_batch`; y must then be target rows (N, K)). With `aux` (copies, N, P),
    each copy's mask targets (`mask_targets`) ride along: y becomes {OUTPUT_NAME: y, AUX_MASK_NAME: mask rows}."""

    def __new__(cls, *args, **kwargs):
        import keras

        class Seq(keras.utils.PyDataset):
            def __init__(self, cache, y, sw, batch_size, seed, mixup: float = 0.0, aux=None):
                super().__init__()
                self.cache, self.y, self.sw, self.bs, self.mixup = cache, y, sw, batch_size, mixup
                self.aux = aux
                self.seed, self.epoch = seed, 0
                self.rng = np.random.default_rng(seed)
                self.on_epoch_end()

            def __len__(self):
                return int(np.ceil(len(self.y) / self.bs))

            def on_epoch_end(self):
                self.epoch += 1
                self.order = self.rng.permutation(len(self.y))
                self.copy = self.rng.integers(0, self.cache.shape[0], len(self.y))

            def __getitem__(self, i):
                idx = self.order[i * self.bs:(i + 1) * self.bs]
                x, y, sw = self.cache[self.copy[idx], idx], self.y[idx], self.sw[idx]
                if self.mixup > 0:  # the batch's own generator: the same mix whatever order batches are asked in
                    x, y, sw = mix_batch(x, y, sw, self.mixup, np.random.default_rng((self.seed, self.epoch, i)))
                if self.aux is not None:
                    from core.models import OUTPUT_NAME

                    y = {OUTPUT_NAME: y, AUX_MASK_NAME: self.aux[self.copy[idx], idx]}
                return x, y, sw

            def batch_spec(self):  # build_before_fit: batch 0 draws nothing (mixup's generator is per batch)
                return batch_spec(self[0])

        return Seq(*args, **kwargs)


class _ResamplingSequence:
    """Keras PyDataset for patch training without the cache: a fresh random patch draw every epoch."""

    def __new__(cls, *args, **kwargs):
        import keras
        import tensorflow as tf

        class Seq(keras.utils.PyDataset):
            def __init__(self, sampler, y, sw, batch_size, seed, augmenter):
                super().__init__()
                self.sampler, self.y, self.sw, self.bs, self.aug = sampler, y, sw, batch_size, augmenter
                self.rng, self.draw = np.random.default_rng(seed), 0
                self.on_epoch_end()

            def __len__(self):
                return int(np.ceil(len(self.y) / self.bs))

            def on_epoch_end(self):
                self.x = self.sampler(self.draw)
                self.draw += 1
                self.order = self.rng.permutation(len(self.y))

            def __getitem__(self, i):
                idx = self.order[i * self.bs:(i + 1) * self.bs]
                x = tf.convert_to_tensor(self.x[idx], tf.float32)
                if self.aug is not None:
                    x = self.aug(x, training=True)
                return np.asarray(x), self.y[idx], self.sw[idx]

            def batch_spec(self):  # build_before_fit: the augmenter keeps the patch size; not called, so no draw
                return batch_spec((self.x[:1].astype(np.float32), self.y[:1], self.sw[:1]))

        return Seq(*args, **kwargs)


def fit_callbacks(cfg: TrainConfig, monitor: str = "val_loss"):
    """EarlyStopping (best weights restored) and ReduceLROnPlateau with the configured patience and factor."""
    import keras

    mode = "min" if monitor.endswith("loss") else "auto"  # Keras cannot tell for an output's own loss
    return [keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=cfg.patience, restore_best_weights=True,
                                          verbose=1),
            keras.callbacks.ReduceLROnPlateau(monitor=monitor, mode=mode, factor=cfg.lr_factor,
                                              patience=cfg.lr_patience, min_lr=1e-7, verbose=1)]


def _compile(model, lr: float, soft: bool = False) -> None:
    """Adam + cross-entropy on integer labels, or on (N, K) target distributions where `soft` (distillation)."""
    import keras

    if soft:
        model.compile(optimizer=keras.optimizers.Adam(lr), loss="categorical_crossentropy",
                      metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    else:
        model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])


#: Smallest input side each backbone can read (Keras applications need 32 px; the 16/32/64 CNN pools three times).
MIN_INPUT_SIZE = {"simple_cnn": 8}


#: TrainConfig options that only segmentation training reads -> what they are (for the refusal's message).
SEGMENTATION_ONLY = {"ema": "a moving average of the weights", "deep_supervision": "auxiliary maps of the decoder",
                     "elastic": "elastic deformation of image and mask",
                     "seg_classify": "an image-class head beside the lesion map"}


def check_inputs(cfg: TrainConfig, segmentation: bool = False) -> None:
    """Refuse an input size the network cannot read, or a weights file that is not there, before any image is
    decoded (instead of a Keras traceback or a minute of decoding)."""
    from core.models import SEGMENTER_MULTIPLE as M, segmenter_bundle, weights_file

    low = MIN_INPUT_SIZE.get(cfg.backbone, 32)
    if cfg.input_size < low:
        raise ConfigError(f"--input-size {cfg.input_size} is too small for {cfg.backbone}: use {low} px or more.")
    if segmentation and cfg.input_size % M:
        raise ConfigError(f"--input-size must be a multiple of {M} for the segmenter's five 2x steps, not "
                          f"{cfg.input_size} (try {max(M, round(cfg.input_size / M) * M)}).")
    for option, what in SEGMENTATION_ONLY.items():
        if getattr(cfg, option) and not segmentation:
            raise ConfigError(f"--{option.replace('_', '-')} ({what}) is for segmentation training "
                              "(--task segmentation).")
    if cfg.pooling == "lesion" and (segmentation or segmenter_bundle(cfg.weights) is None or not cfg.trunk_layer
                                    or cfg.backbone != "densenet121"):
        raise ConfigError("--pooling lesion averages an encoder map over a segmenter's predicted lesion: it needs a "
                          "classifier with --backbone densenet121, --weights SEGMENTER_BUNDLE (train.py --task "
                          "segmentation) and --trunk-layer (e.g. pool3_relu).")
    if cfg.weights not in ("imagenet", "none"):
        if segmenter_bundle(cfg.weights) is not None:
            check_encoder_source(cfg, segmentation)
        else:
            weights_file(cfg.weights)  # WeightsUnavailableError with what to pass instead


def check_encoder_source(cfg: TrainConfig, segmentation: bool = False) -> None:
    """A lesion segmenter's encoder (`--weights SEGMENTER_BUNDLE`) starts a classifier only. Its training images are
    guarded by `check_encoder_split`; cross-validation (and inner-CV calibration) retrain the segmenter's recipe in
    every fold (`core.training.segment.fold_encoder`), so no held-out image's mask trained the trunk that scores it."""
    if segmentation:
        raise ConfigError(f"--weights {cfg.weights} (a lesion segmenter's encoder) starts a classifier; a segmenter "
                          "starts from a trunk weights file.")


def check_encoder_split(cfg: TrainConfig, splits: dict, root: str | Path) -> None:
    """With a segmenter's encoder as the trunk: every image the segmenter's split.csv names must be in the same split
    here (a validation or test image it trained on, or chose its threshold on, would score too well)."""
    from core.checkpoints import read_csv
    from core.models import segmenter_bundle

    bundle = segmenter_bundle(cfg.weights)
    if bundle is None:
        return
    try:
        theirs = {r["path"]: r["split"] for r in read_csv(bundle / "split.csv")}
    except (OSError, KeyError) as exc:
        raise ConfigError(f"{bundle.name} has no readable split.csv ({exc}): its encoder's training images are "
                          "unknown, so it cannot start a classifier.") from exc
    moved = []
    for s in ("train", "val", "test"):
        for x in splits[s].samples:
            rel = os.path.relpath(x.path, root)
            if theirs.get(rel, s) != s:
                moved.append((rel, s, theirs[rel]))
    if moved:
        raise ConfigError(f"{len(moved)} images are in another split than for the segmenter {bundle.name} (e.g. "
                          f"{moved[0][0]}: {moved[0][1]} here, {moved[0][2]} there). Pass its split: --split-file "
                          f"{bundle / 'split.csv'}.")


def check_class_coverage(counts: dict[str, dict[str, int]], totals: dict[str, int]) -> list[str]:
    """Warn about classes a split lacks (a class with one image, or one patient when patients are kept together,
    lands in one split only): without training images the checkpoint cannot learn the class; without validation
    or test images its recall and ROC AUC there are undefined. `counts`: {split: {class: images}} (what metadata
    records as split.class_counts). Returns the warnings (metadata records them)."""
    notes = []
    missing = [c for c, n in counts["train"].items() if n == 0]
    if missing:
        notes.append("No training images of " + ", ".join(f"{c} ({totals.get(c, 0)} image(s) in all)" for c in missing)
                     + ": this checkpoint cannot learn " + ("it" if len(missing) == 1 else "them") + "; add images "
                     "(or patients) of it, or remove its folder.")
    for s in ("val", "test"):
        absent = [c for c, n in counts[s].items() if n == 0]
        if absent:
            notes.append(f"The {s} split has no images of {', '.join(absent)}: recall and ROC AUC of "
                         f"{'it' if len(absent) == 1 else 'them'} there are undefined.")
    for n in notes:
        log.warning(n)
    return notes


def check_mixup(cfg: TrainConfig) -> None:
    """Refuse --mixup settings it cannot honour (with --logistic-c, `plan_phases` refuses it)."""
    if cfg.mixup < 0:
        raise ConfigError(f"--mixup must be 0 (off) or above (got {cfg.mixup}).")
    if cfg.mixup > 0 and cfg.patches:
        raise ConfigError("--mixup mixes whole images: it does not combine with --patches.")


#: Output name of the auxiliary lesion-mask head that `with_mask_head` adds for training only.
AUX_MASK_NAME = "aux_mask"


def check_aux_mask(cfg: TrainConfig) -> None:
    """Refuse --aux-mask settings it cannot honour (before any image is decoded)."""
    if cfg.aux_mask < 0:
        raise ConfigError(f"--aux-mask must be 0 (off) or above (got {cfg.aux_mask}).")
    if cfg.aux_mask == 0:
        return
    problems = [msg for bad, msg in (
        (cfg.dataset not in ("busi", "folder"), "a dataset with lesion masks (busi, or a folder with *_mask files)"),
        (cfg.logistic_c is not None, "a network head (no --logistic-c)"),
        (bool(cfg.patches), "whole images (no --patches)"),
        (cfg.mixup > 0, "no --mixup"),
        (cfg.distil_from is not None, "no --distil-from"),
        (cfg.feedback is not None, "no --feedback (feedback images have no lesion mask)"),
        (cfg.distribute != "none", "a single process (no --distribute)")) if bad]
    if problems:
        raise ConfigError("A lesion-mask auxiliary target (--aux-mask) needs " + "; ".join(problems) + ".")


def with_mask_head(model):
    """The outputs of the training-only two-output network: `model`'s prediction and a lesion map read off its
    last feature map.

    A 1x1 convolution with a sigmoid on the last backbone feature map (h, w, C) gives each cell's lesion share,
    flattened to (h*w,) under AUX_MASK_NAME; trained with binary cross-entropy against `mask_targets`, it makes
    the features the classifier pools locate the lesion. The checkpoint keeps `model` alone (one output, the
    `Classifier` contract), so explanations and inference do not change.
    Returns ({OUTPUT_NAME: prediction tensor, AUX_MASK_NAME: (h*w,) tensor}, (h, w), feature layer name).
    """
    from keras import layers

    from core.models import OUTPUT_NAME, last_conv_layer

    fl = last_conv_layer(model)
    fmap = model.get_layer(fl).output
    aux = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name=f"{AUX_MASK_NAME}_conv")(fmap)
    aux = layers.Flatten(name=AUX_MASK_NAME)(aux)
    return {OUTPUT_NAME: model.output, AUX_MASK_NAME: aux}, (int(fmap.shape[1]), int(fmap.shape[2])), fl


def mask_targets(masks, grid: tuple[int, int]):
    """Masks (N, S, S, 1) in {0, 1} -> (N, h*w) float32 lesion share of each cell of the (h, w) feature grid."""
    import tensorflow as tf

    small = tf.image.resize(tf.cast(masks, tf.float32), grid, method="area")
    return tf.reshape(small, (-1, grid[0] * grid[1]))


def _compile_aux(target, lr: float, weight: float) -> None:
    """Adam + cross-entropy on the labels + `weight` x binary cross-entropy on the mask targets."""
    import keras

    from core.models import OUTPUT_NAME

    target.compile(optimizer=keras.optimizers.Adam(lr),
                   loss={OUTPUT_NAME: "sparse_categorical_crossentropy", AUX_MASK_NAME: "binary_crossentropy"},
                   loss_weights={OUTPUT_NAME: 1.0, AUX_MASK_NAME: weight}, metrics={OUTPUT_NAME: ["accuracy"]})


@dataclass
class Phase:
    name: str
    fine_tune_layers: int  # -1 all backbone layers, 0 head only
    epochs: int
    lr: float


def plan_phases(cfg: TrainConfig) -> list[Phase]:
    """Pretrained trunk: head, then fine-tune the last N layers. From scratch: one phase, all layers.

    A logistic head (`logistic_c`) is one closed-form 'head' phase on a frozen trunk.
    """
    if cfg.logistic_c is not None:
        problems = [msg for bad, msg in (
            (cfg.logistic_c <= 0, "--logistic-c must be above 0"),
            (bool(cfg.head_units), "--head-units 0 (a linear head)"),
            (cfg.weights == "none" or cfg.backbone == "simple_cnn", "a pretrained trunk (--weights)"),
            (cfg.fine_tune_epochs > 0 and cfg.fine_tune_layers != 0, "--fine-tune-epochs 0 (frozen trunk)"),
            (not cfg.cache, "the activation cache (drop --no-cache)"),
            (cfg.mixup > 0, "no --mixup (it mixes a network head's training batches)"),
            (cfg.distribute != "none", "a single process (no --distribute)")) if bad]
        if problems:
            raise ConfigError("A logistic-regression head (--logistic-c) needs " + "; ".join(problems) + ".")
        return [Phase("head", 0, 1, cfg.lr)]
    if cfg.weights == "none" or cfg.backbone == "simple_cnn":
        return [Phase("full", -1, cfg.head_epochs + cfg.fine_tune_epochs, cfg.lr)]
    phases = [Phase("head", 0, cfg.head_epochs, cfg.lr)] if cfg.head_epochs > 0 else []
    if cfg.fine_tune_layers != 0 and cfg.fine_tune_epochs > 0:
        phases.append(Phase("fine_tune", cfg.fine_tune_layers, cfg.fine_tune_epochs, cfg.fine_tune_lr))
    if not phases:
        raise ValueError("Nothing to train: set --head-epochs or --fine-tune-epochs above 0.")
    return phases


def fit_model(model, cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
              y_val: np.ndarray, num_classes: int,
              sampler: Optional[Callable[[int], np.ndarray]] = None,
              soft_targets: Optional[np.ndarray] = None,
              masks: Optional[tuple[np.ndarray, np.ndarray]] = None) -> tuple[list[dict], dict]:
    """Run every phase; returns (history rows, timing info). Mutates `model`'s weights only.

    x_train: uint8 (N, S, S, 3) aligned with y_train. `sampler(draw)` (patch training) returns a fresh
    random draw of the same shape: the cache holds one draw per copy, the plain path draws every epoch.
    soft_targets: float (N, K) rows summing to 1 (distillation): the training targets instead of y_train (every
    augmented copy of an image gets its row); validation and early stopping stay on the true labels.
    masks: (train, val) lesion masks float32 (N, S, S, 1) in {0, 1}, for `cfg.aux_mask` > 0: the network trains
    with `with_mask_head` (each augmented copy's mask transformed with its image); early stopping and the learning
    rate follow the validation classification loss alone.
    """
    import keras
    import tensorflow as tf

    from core.models import OUTPUT_NAME, backbone_layers, cut_point, set_trainable

    phases = plan_phases(cfg)  # refuses --mixup with --logistic-c
    check_mixup(cfg)  # patch training (a sampler) is cfg.patches
    check_aux_mask(cfg)
    aux = cfg.aux_mask > 0
    if aux and (masks is None or soft_targets is not None or sampler is not None):
        raise ConfigError("--aux-mask trains on whole images with their lesion masks and the true labels.")
    soft = soft_targets is not None or cfg.mixup > 0  # train_model refuses distillation with those too
    cw = class_weight_vector(y_train, num_classes) if cfg.class_weights else np.ones(num_classes)
    sw_train = cw[y_train].astype(np.float32)
    if soft:  # target rows from here on; the class weights use the labels
        y_train = (np.asarray(soft_targets, np.float32) if soft_targets is not None
                   else np.eye(num_classes, dtype=np.float32)[y_train])
        y_val = np.eye(num_classes, dtype=np.float32)[y_val]
    verbose = 0 if cfg.verbose == 0 else (1 if sys.stdout.isatty() else 2)  # bar on a terminal, lines in a log
    history: list[dict] = []
    timing: dict = {"phases": []}
    augmenter = make_augmenter(cfg.seed, cfg.colour_jitter, cfg.flip, cfg.rotation) if cfg.augment else None
    outputs, grid, fmap_layer = with_mask_head(model) if aux else (model.output, None, None)
    wrapper = keras.Model(model.input, outputs, name=f"{model.name}_aux") if aux else model
    if aux:
        aux_val = np.asarray(mask_targets(masks[1], grid))
        y_val = {OUTPUT_NAME: y_val, AUX_MASK_NAME: aux_val}
        timing["aux_mask"] = {"weight": cfg.aux_mask, "feature_layer": fmap_layer, "grid": list(grid)}

    # Where to cut: before the first layer that any phase trains (with the mask head, at its feature map at latest).
    cut = None
    if cfg.cache:
        deepest = max(p.fine_tune_layers if p.fine_tune_layers >= 0 else 10**9 for p in phases)
        set_trainable(model, deepest)
        names = [l.name for l in model.layers]
        first = next((l.name for l in model.layers if l.trainable and l.weights), None)
        if aux and first is not None and names.index(first) > names.index(fmap_layer):
            first = fmap_layer
        if first is not None and deepest < 10**9:
            cut = cut_point(model, first)
    if cut is not None:
        n_copies = 1 + (cfg.augment_copies if (augmenter is not None or sampler is not None) else 0)
        per_item = int(np.prod(model.get_layer(cut).output.shape[1:])) * 4
        need = per_item * (n_copies * len(x_train) + len(x_val))
        budget = CACHE_MEMORY_FRACTION * available_memory()
        if need > budget:
            log.warning("The activation cache at %r would take %.1f GB (%d images x %d copies), more than %.0f%% of "
                        "the %.1f GB of free memory: training without the cache instead (slower, same method). "
                        "Fewer --augment-copies or --fine-tune-layers make the cache fit.", cut, need / 2**30,
                        len(x_train), n_copies, 100 * CACHE_MEMORY_FRACTION, available_memory() / 2**30)
            timing["cache_skipped"] = {"cut_layer": cut, "bytes_needed": need, "bytes_budget": int(budget)}
            cut = None
    if cut is not None:
        t0 = time.time()
        trunk = keras.Model(model.input, model.get_layer(cut).output)
        tail = keras.Model(model.get_layer(cut).output, outputs)
        fwd = tf.function(lambda x: trunk(x, training=False), reduce_retracing=True, autograph=False)
        copies = [x_train.astype(np.float32)]
        aux_copies = [np.asarray(mask_targets(masks[0], grid))] if aux else None
        n_extra = cfg.augment_copies if (augmenter is not None or sampler is not None) else 0
        for c in range(n_extra):
            src = sampler(c + 1) if sampler is not None else x_train
            if aux and augmenter is not None:  # the same geometry on each image and its mask
                pairs = [augmenter.pair(tf.convert_to_tensor(src[i:i + 64], tf.float32),
                                        tf.convert_to_tensor(masks[0][i:i + 64], tf.float32))
                         for i in range(0, len(src), 64)]
                src = np.concatenate([np.asarray(a) for a, _ in pairs])
                aux_copies.append(np.concatenate([np.asarray(mask_targets(m, grid)) for _, m in pairs]))
            elif aux:
                aux_copies.append(aux_copies[0])
            elif augmenter is not None:
                src = np.concatenate([np.asarray(augmenter(tf.convert_to_tensor(
                    src[i:i + 64], tf.float32), training=True)) for i in range(0, len(src), 64)])
            copies.append(src.astype(np.float32))
        log.info("Caching trunk activations at %r for %d train images x %d copies and %d val images",
                 cut, len(x_train), len(copies), len(x_val))
        cache = np.stack([run_batched(fwd, c, cfg.batch_size) for c in copies])
        val_feats = run_batched(fwd, x_val.astype(np.float32), cfg.batch_size)
        timing["cache_seconds"] = time.time() - t0
        timing["cut_layer"] = cut
        log.info("Cached %s activations (%.0f MB) in %.1f s", cache.shape, cache.nbytes / 2**20,
                 timing["cache_seconds"])
        if cfg.logistic_c is not None:
            return fit_logistic_head(model, tail, cfg, cache, y_train, val_feats, y_val, num_classes, timing)
        train_data = _CachedSequence(cache, y_train, sw_train, cfg.batch_size, cfg.seed, cfg.mixup,
                                     aux=np.stack(aux_copies) if aux else None)
        val_data = (val_feats, y_val)
        target = tail
    elif cfg.logistic_c is not None:
        raise ConfigError("A logistic-regression head (--logistic-c) fits on cached trunk features, and the cache "
                          "does not fit in memory here: use fewer --augment-copies.")
    elif sampler is not None:
        train_data = _ResamplingSequence(sampler, y_train, sw_train, cfg.batch_size, cfg.seed, augmenter)
        val_data = (x_val.astype(np.float32), y_val)
        target = model
    elif aux:
        def with_targets(x, y, m, w):
            x = tf.cast(x, tf.float32)
            if augmenter is not None:
                x, m = augmenter.pair(x, m)
            return x, {OUTPUT_NAME: y, AUX_MASK_NAME: mask_targets(m, grid)}, w

        ds = tf.data.Dataset.from_tensor_slices((x_train, y_train, masks[0], sw_train)).shuffle(
            len(x_train), seed=cfg.seed, reshuffle_each_iteration=True).batch(cfg.batch_size)
        train_data = ds.map(with_targets, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
        val_data = (x_val.astype(np.float32), y_val)
        target = wrapper
    else:
        ds = tf.data.Dataset.from_tensor_slices((x_train, y_train, sw_train)).shuffle(
            len(x_train), seed=cfg.seed, reshuffle_each_iteration=True).batch(cfg.batch_size)
        if augmenter is not None:
            ds = ds.map(lambda x, y, w: (augmenter(tf.cast(x, tf.float32), training=True), y, w),
                        num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.map(lambda x, y, w: (tf.cast(x, tf.float32), y, w))
        if cfg.mixup > 0:
            mix_rng = np.random.default_rng(cfg.seed)

            def mix(x, y, w):
                out = tf.numpy_function(lambda *a: mix_batch(*a, cfg.mixup, mix_rng), [x, y, w],
                                        [tf.float32, tf.float32, tf.float32])
                for t, ref in zip(out, (x, y, w)):
                    t.set_shape(ref.shape)
                return tuple(out)

            ds = ds.map(mix)
        train_data = ds.prefetch(tf.data.AUTOTUNE)
        val_data = (x_val.astype(np.float32), y_val)
        target = model

    if tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1:
        if soft:
            raise ConfigError("Distillation (--distil-from) and --mixup run on one machine: drop --distribute.")
        # Keras 3's fit does not run under MultiWorkerMirroredStrategy (keras-team/keras#20585): a plain loop.
        history, timing = _fit_distributed(model, cfg, phases, x_train, y_train, sw_train, x_val, y_val, augmenter)
        return history, timing
    precision = resolve_precision(cfg.precision)
    timing["precision"] = precision
    epoch0 = 0
    for phase in phases:
        n_trainable = set_trainable(model, phase.fine_tune_layers)
        log.info("Phase %s: %d backbone layers trainable (of %d), lr %.1e, up to %d epochs", phase.name,
                 n_trainable, len(backbone_layers(model)), phase.lr, phase.epochs)
        if aux:
            _compile_aux(target, phase.lr, cfg.aux_mask)
        else:
            _compile(target, phase.lr, soft)
        monitor = f"val_{OUTPUT_NAME}_loss" if aux else "val_loss"
        rows, row = run_phase(target, phase.name, train_data, val_data, epoch0, phase.epochs,
                              fit_callbacks(cfg, monitor), precision, verbose)
        if aux:  # Keras logs <output>_accuracy: history.csv keeps the usual names
            rows = [{k.replace(f"{OUTPUT_NAME}_accuracy", "accuracy"): v for k, v in r.items()} for r in rows]
        history += rows
        timing["phases"].append(row)
        epoch0 += row["epochs"]
    return history, timing


def fit_logistic_head(model, tail, cfg: TrainConfig, cache: np.ndarray, y_train: np.ndarray, val_feats: np.ndarray,
                      y_val: np.ndarray, num_classes: int, timing: dict) -> tuple[list[dict], dict]:
    """Fit the linear head in closed form: scikit-learn LogisticRegression(C, lbfgs) on standardised pooled features.

    cache: (copies, N, F) pooled trunk features of the training images (every copy counts as a sample);
    val_feats: (M, F). The standardisation becomes `head_bn` (moving mean/variance = the training features'
    mean/variance, gamma 1, beta 0) and the coefficients the softmax layer, so the saved Keras model
    computes exactly the fitted regression; this is checked on the validation features.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, log_loss

    from core.models import HEAD_PREFIX, OUTPUT_NAME

    t0 = time.time()
    x = cache.reshape(-1, cache.shape[-1]).astype(np.float64)
    y = np.tile(y_train, cache.shape[0])
    bn = model.get_layer(HEAD_PREFIX + "bn")
    mean, var = x.mean(0), x.var(0)
    scale = np.sqrt(var + bn.epsilon)
    xs = (x - mean) / scale
    reg = LogisticRegression(C=cfg.logistic_c, max_iter=5000, class_weight="balanced" if cfg.class_weights else None)
    reg.fit(xs, y)
    coef, bias = reg.coef_, reg.intercept_
    if coef.shape[0] == 1:  # binary: softmax over (-z/2, z/2) is the sigmoid of z
        coef, bias = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
    gamma, beta = np.ones_like(mean), np.zeros_like(mean)
    bn.set_weights([w.astype(np.float32) for w in (gamma, beta, mean, var)])
    model.get_layer(OUTPUT_NAME).set_weights([coef.T.astype(np.float32), bias.astype(np.float32)])
    p_val = np.asarray(tail.predict(val_feats, batch_size=256, verbose=0), dtype=np.float64)
    p_val /= np.clip(p_val.sum(1, keepdims=True), 1e-12, None)  # float32 softmax rounding
    expected = reg.predict_proba((val_feats.astype(np.float64) - mean) / scale)
    gap = float(np.abs(p_val - expected).max()) if len(p_val) else 0.0
    if gap > 1e-3:
        raise RuntimeError(f"The Keras head does not reproduce the fitted regression (max gap {gap:.2e}).")
    p_train = reg.predict_proba(xs)
    labels = list(range(num_classes))
    row = {"epoch": 1, "phase": "head", "loss": float(log_loss(y, p_train, labels=labels)),
           "accuracy": float(accuracy_score(y, p_train.argmax(1)))}
    if len(y_val):
        row.update(val_loss=float(log_loss(y_val, p_val, labels=labels)),
                   val_accuracy=float(accuracy_score(y_val, p_val.argmax(1))))
    secs = time.time() - t0
    log.info("Logistic head: C %g, %d samples x %d features, %d lbfgs iterations, %.1f s; val accuracy %s",
             cfg.logistic_c, *x.shape, int(np.max(reg.n_iter_)), secs, row.get("val_accuracy"))
    timing["phases"].append({"phase": "head", "solver": "scikit-learn LogisticRegression (lbfgs)",
                             "C": cfg.logistic_c, "iterations": int(np.max(reg.n_iter_)), "epochs": 1,
                             "seconds": secs, "seconds_per_epoch": secs, "epoch_seconds": [secs]})
    timing["precision"] = "float32"
    return [row], timing


def _fit_distributed(model, cfg: TrainConfig, phases: list[Phase], x_train, y_train, sw_train, x_val, y_val,
                     augmenter) -> tuple[list[dict], dict]:
    """Synchronous data-parallel training under the current tf.distribute strategy (every worker runs this).

    Each replica takes its share of every global batch of `cfg.batch_size`; gradients are summed across workers
    before each Adam step, so all workers hold the same weights. Validation loss is computed on the whole
    validation split by every worker (same weights, same number), which drives the same early stopping (best
    weights restored) and learning-rate reduction as the single-machine path.
    """
    import keras
    import tensorflow as tf

    from core.models import set_trainable

    strategy = tf.distribute.get_strategy()
    n_rep = strategy.num_replicas_in_sync
    ds = tf.data.Dataset.from_tensor_slices((x_train, y_train, sw_train)).shuffle(
        len(x_train), seed=cfg.seed, reshuffle_each_iteration=True).batch(cfg.batch_size)
    ds = ds.map((lambda x, y, w: (augmenter(tf.cast(x, tf.float32), training=True), y, w)) if augmenter else
                (lambda x, y, w: (tf.cast(x, tf.float32), y, w)))
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dist = strategy.experimental_distribute_dataset(ds.with_options(opts))
    xv = x_val.astype(np.float32)
    history, timing, epoch0 = [], {"phases": [], "precision": "float32"}, 0
    for phase in phases:
        set_trainable(model, phase.fine_tune_layers)
        optimizer = keras.optimizers.Adam(phase.lr)
        variables = model.trainable_variables

        def step(x, y, w):
            with tf.GradientTape() as tape:
                p = model(x, training=True)
                per = keras.losses.sparse_categorical_crossentropy(y, p) * tf.cast(w, p.dtype)
                loss = tf.reduce_sum(per) / cfg.batch_size
                if model.losses:
                    loss += tf.add_n(model.losses) / n_rep
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return loss

        @tf.function
        def train_step(batch):
            return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step, args=batch), axis=None)

        best, best_w, wait, lr_wait, t0 = np.inf, model.get_weights(), 0, 0, time.time()
        n_ep = 0
        for epoch in range(phase.epochs):
            losses = [float(train_step(b)) for b in dist]
            pv = np.asarray(model.predict(xv, batch_size=cfg.batch_size, verbose=0))
            val_loss = float(np.mean(keras.losses.sparse_categorical_crossentropy(y_val, pv)))
            val_acc = float(np.mean(pv.argmax(1) == y_val))
            n_ep += 1
            history.append({"epoch": epoch0 + n_ep, "phase": phase.name, "loss": float(np.mean(losses)),
                            "val_loss": val_loss, "val_accuracy": val_acc,
                            "learning_rate": float(optimizer.learning_rate.numpy())})
            log.info("Epoch %d: loss %.4f, val_loss %.4f, val_accuracy %.3f", epoch0 + n_ep, history[-1]["loss"],
                     val_loss, val_acc)
            if val_loss < best:
                best, best_w, wait, lr_wait = val_loss, model.get_weights(), 0, 0
            else:
                wait, lr_wait = wait + 1, lr_wait + 1
                if lr_wait >= cfg.lr_patience:
                    optimizer.learning_rate.assign(max(float(optimizer.learning_rate.numpy()) * cfg.lr_factor, 1e-7))
                    lr_wait = 0
                if wait >= cfg.patience:
                    break
        model.set_weights(best_w)
        secs = time.time() - t0
        timing["phases"].append({"phase": phase.name, "epochs": n_ep, "seconds": secs,
                                 "seconds_per_epoch": secs / max(n_ep, 1), "replicas": n_rep})
        epoch0 += n_ep
    return history, timing


def prediction_rows(split: str, manifest: Manifest, probs: np.ndarray, class_names: Sequence[str]) -> list[list]:
    rows = []
    for s, p in zip(manifest.samples, probs):
        rows.append([split, os.path.relpath(s.path, manifest.root), s.class_name, class_names[int(np.argmax(p))],
                     *[f"{v:.6f}" for v in p]])
    return rows


def bundle_predictions(splits: dict, probs: dict, externals: list[dict], class_names: Sequence[str]
                       ) -> tuple[list[str], list[list]]:
    """(header, rows) of a bundle's predictions.csv: the validation and test images, then every external check's."""
    header = ["split", "path", "true", "predicted", *[f"p_{c}" for c in class_names]]
    rows = [r for s in ("val", "test") for r in prediction_rows(s, splits[s], probs[s], class_names)]
    rows += [[f"external:{e['name']}", e_row["path"], e_row["true"], e_row["predicted"],
              *[f"{e_row['probabilities'][c]:.6f}" for c in class_names]] for e in externals for e_row in e["images"]]
    return header, rows


def decode_split(manifest: Manifest, cfg: TrainConfig) -> tuple:
    """(images, labels): uint8 (N, S, S, 3) model inputs, or for patch training the full-size images (list)."""
    import keras

    bar = keras.utils.Progbar(len(manifest), verbose=1 if sys.stdout.isatty() and cfg.verbose else 0)
    if cfg.patches:
        images = []
        for i, s in enumerate(manifest.samples):
            images.append(manifest.read(s))
            bar.update(i + 1)
        out = (images, np.asarray(manifest.labels, dtype=np.int64))
    else:
        out = load_arrays(manifest, cfg.input_size, cfg.clahe, lambda i, n: bar.update(i))
    log.info("Decoded %d images of %s", len(manifest), manifest.name)
    return out


def in_memory_classifier(model, cfg: TrainConfig, class_names: Sequence[str]):
    """A Classifier (temperature 1) over `decode_split` outputs: model inputs, or full images for patch models."""
    from core.checkpoints import Classifier

    return Classifier(model=model, class_names=tuple(class_names), input_size=cfg.input_size, metadata={},
                      clahe=cfg.clahe and cfg.patches > 0, patches=cfg.patch_config, batch_size=cfg.batch_size)


def train_model(cfg: TrainConfig, num_classes: int, train_data: tuple, val_data: tuple,
                soft_targets: Optional[np.ndarray] = None, masks: Optional[tuple[np.ndarray, np.ndarray]] = None):
    """Build the model and fit it -> (model, weights provenance, history rows, timing).

    soft_targets: (N, K) distillation targets aligned with train_data (see `fit_model`); masks: (train, val)
    lesion masks for `cfg.aux_mask` (`split_masks`).

    Whole-image training fits the resized arrays. Patch training fits `cfg.patches` random tissue crops
    per image (fresh draws per cached copy / per epoch) and validates on every grid tile of the
    validation images (the tile-level loss drives early stopping).
    """
    from core.models import ModelConfig, build_model, stain_targets
    from core.patches import random_patches

    if soft_targets is not None and (cfg.logistic_c is not None or cfg.patches):
        raise ConfigError("Distillation (--distil-from) trains a network head on whole images: drop --logistic-c "
                          "and --patches.")
    targets = None
    if cfg.stain_standardise:
        x = train_data[0]
        sample = x[:256] if isinstance(x, np.ndarray) else np.stack([model_input(im, cfg.input_size) for im in x[:256]])
        targets = stain_targets(sample)
        log.info("Stain standardisation targets (optical density mean, std per channel): %s", targets)
    model, provenance = build_model(ModelConfig(
        backbone=cfg.backbone, num_classes=num_classes, input_size=cfg.input_size, pooling=cfg.pooling,
        head_units=tuple(cfg.head_units), dropout=cfg.dropout, l2=cfg.l2, weights=cfg.weights,
        stain_targets=targets, trunk_layer=cfg.trunk_layer, scales=tuple(cfg.scales)))
    log.info("Model %s: %d layers, %d parameters; weights: %s", model.name, len(model.layers),
             model.count_params(), provenance["source"])
    if not cfg.patches:
        history, timing = fit_model(model, cfg, *train_data, *val_data, num_classes=num_classes,
                                    soft_targets=soft_targets, masks=masks)
        return model, provenance, history, timing

    pc = cfg.patch_config
    images, labels = train_data

    def sampler(draw: int) -> np.ndarray:
        rng = np.random.default_rng([cfg.seed, draw])
        x = np.concatenate([random_patches(im, cfg.patches, pc, rng) for im in images])
        return np.stack([apply_clahe(t) for t in x]) if cfg.clahe else x

    y_train = np.repeat(labels, cfg.patches)
    tiler = in_memory_classifier(model, cfg, [str(i) for i in range(num_classes)])
    val_tiles = [tiler.tiles(tiler.work_image(im)) for im in val_data[0]]
    x_val = np.concatenate(val_tiles)
    y_val = np.repeat(val_data[1], [len(t) for t in val_tiles])
    log.info("Patch training: %d images x %d crops of %d px per epoch; validation on %d grid tiles of %d images",
             len(images), cfg.patches, cfg.patch_size, len(x_val), len(val_tiles))
    history, timing = fit_model(model, cfg, sampler(0), y_train, x_val, y_val, num_classes, sampler=sampler)
    return model, provenance, history, timing


def split_masks(cfg: TrainConfig, train: Manifest, val: Manifest) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(train, val) lesion masks float32 (N, S, S, 1) at the input size for `cfg.aux_mask` > 0, else None."""
    if cfg.aux_mask <= 0:
        return None
    from core.training.segment import check_masks, lesion_masks

    check_masks(train)
    return lesion_masks(train, cfg.input_size), lesion_masks(val, cfg.input_size)


def cross_validate(cfg: TrainConfig, manifest: Manifest, work_dir: Optional[Path] = None) -> dict:
    """Group-wise K-fold cross-validation with the same configuration (no group in two parts of a fold).

    Each fold holds out whole groups as its test part (StratifiedGroupKFold), carves a group-aware
    validation part out of the rest for early stopping, trains from the same initial weights and
    reports accuracy and ROC AUC on its held-out groups. Pooled over folds: accuracy, balanced accuracy,
    ROC AUC, per-class recall, and patient-level results where each patient has one class.

    With `--weights SEGMENTER_BUNDLE` each fold's trunk is that segmenter's recipe retrained on the fold's training
    masks (`core.training.segment.fold_encoder`; with `--pooling lesion` the whole segmenter, `fold_segmenter`),
    never the bundle's own, which learned from held-out masks.

    With `work_dir`, each finished fold's predictions are saved there (`fold_<k>.npz`) and a rerun with the same
    configuration and data resumes after the last finished fold; retrained encoders are kept in
    `<out_dir>/.fold-encoders`, where any later cross-validation of the same segmenter recipe on the same folds
    reuses them. Returns the metadata entry;
    its "predictions" list (path, group, fold, true label, probabilities) is written to `cv_predictions.csv`.
    """
    import json
    import tempfile

    from core.data.split import describe_groups
    from core.evaluation import classification_metrics
    from core.models import segmenter_bundle

    groups = np.asarray(manifest.groups)
    k = len(manifest.class_names)
    quiet = TrainConfig(**{**asdict(cfg), "verbose": 0, "cv_folds": 0, "external": ()})
    key = json.dumps({"config": config_json(quiet), "paths": [s.path for s in manifest.samples]}, sort_keys=True)
    if work_dir is not None:
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        if (work_dir / "key.json").is_file() and (work_dir / "key.json").read_text() != key:
            log.warning("Cross-validation work folder %s holds folds of other settings or data: starting afresh",
                        work_dir)
            for f in work_dir.glob("fold_*.npz"):
                f.unlink()
        (work_dir / "key.json").write_text(key)
    encoder = segmenter_bundle(cfg.weights)
    enc_dir = None
    if encoder is not None:  # kept beside the work folder: another head setting on the same folds reuses them
        enc_dir = (Path(cfg.out_dir) / ".fold-encoders" if work_dir is not None
                   else Path(tempfile.mkdtemp(prefix="cv-encoders-")))
        log.info("Cross-validation retrains %s's recipe in every fold; the encoders are kept in %s (delete it when "
                 "done choosing)", encoder.name, enc_dir)
    folds, pooled_idx, pooled_p, pooled_fold, t0 = [], [], [], [], time.time()
    for f, parts, held in group_folds(cfg, manifest):
        saved = work_dir / f"fold_{f + 1}.npz" if work_dir is not None else None
        if saved is not None and saved.is_file():
            z = np.load(saved, allow_pickle=False)
            p, row = z["probs"], json.loads(str(z["row"]))
            log.info("CV fold %d/%d: resumed from %s", f + 1, cfg.cv_folds, saved)
        else:
            t_fold = time.time()
            fold_cfg = quiet
            if encoder is not None:  # the segmenter's recipe on this fold's training masks: its encoder the
                # trunk, or (lesion pooling) the whole segmenter
                from core.training.segment import fold_encoder, fold_segmenter

                made = (fold_segmenter if cfg.pooling == "lesion" else fold_encoder)(encoder, parts, enc_dir, f + 1)
                fold_cfg = replace(quiet, weights=str(made))
            set_seeds(cfg.seed)
            data = {s: decode_split(parts[s], quiet) for s in parts}
            soft = None
            if cfg.distil_from:
                from core.training.distil import fold_soft_targets

                soft = fold_soft_targets(quiet, data["train"], data["val"], manifest.class_names)
                set_seeds(cfg.seed)
            model, _, hist, _ = train_model(fold_cfg, k, data["train"], data["val"], soft_targets=soft,
                                            masks=split_masks(quiet, parts["train"], parts["val"]))
            p = in_memory_classifier(model, quiet, manifest.class_names).raw_proba(data["test"][0])
            m = classification_metrics(data["test"][1], p, manifest.class_names, n_boot=0)
            row = {"fold": f + 1, "test_groups": sorted(set(parts["test"].groups)),
                   "n_train": len(parts["train"]), "n_val": len(parts["val"]), "n_test": len(held),
                   "epochs": len(hist), "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
                   "roc_auc": m.get("roc_auc_macro"), "seconds": round(time.time() - t_fold, 1)}
            if saved is not None:
                tmp = saved.with_suffix(".tmp.npz")
                np.savez(tmp, probs=p, held=held, row=json.dumps(row))
                os.replace(tmp, saved)
            import keras

            keras.backend.clear_session()
        folds.append(row)
        pooled_idx.append(held)
        pooled_p.append(p)
        pooled_fold.append(np.full(len(held), f + 1))
        log.info("CV fold %d/%d (held-out groups %s): accuracy %.3f, balanced accuracy %.3f", f + 1,
                 cfg.cv_folds, describe_groups(row["test_groups"]), row["accuracy"],
                 row.get("balanced_accuracy") or float("nan"))
    idx, probs, fold_of = np.concatenate(pooled_idx), np.concatenate(pooled_p), np.concatenate(pooled_fold)
    scope = (f"all {len(manifest)} images" if cfg.cv_scope == "all" else
             f"the {len(manifest)} training and validation images of the split (test patients kept out)")
    method = (f"group-wise {cfg.cv_folds}-fold cross-validation over {scope} ({len(set(groups.tolist()))} groups; "
              f"stratified, shuffled with seed {cfg.seed}); per fold a group-aware validation part for early "
              "stopping; same configuration; uncalibrated")
    if encoder is not None:
        from core.training.segment import encoder_recipe

        what = "the whole segmenter (its lesion map and encoder) is" if cfg.pooling == "lesion" else \
            "the trunk is a segmenter encoder"
        method += (f"; in every fold {what} retrained on that fold's training masks by {encoder.name}'s recipe "
                   f"({encoder_recipe(encoder)[1]}), so no held-out image's mask trained it")
    if encoder is not None and work_dir is None:
        shutil.rmtree(enc_dir, ignore_errors=True)
    out = summarise_cv(manifest, folds, idx, probs, fold_of, method, cfg.seed)
    out["scope"] = cfg.cv_scope
    out["seconds"] = round(sum(r.get("seconds", 0) for r in folds) or time.time() - t0, 1)
    return out


def summarise_cv(manifest: Manifest, folds: list[dict], idx: np.ndarray, probs: np.ndarray, fold_of: np.ndarray,
                 method: str, seed: int = 42) -> dict:
    """The metadata entry of a cross-validation from its out-of-fold predictions.

    folds: per-fold rows; idx (N,): manifest indices of the held-out images, probs (N, K) their probabilities,
    fold_of (N,) their 1-based fold. Pooled accuracy, balanced accuracy, ROC AUC, per-class recall, the confusion
    matrix, patient-level results where each patient has one class, and the per-image "predictions" list
    (path, group, fold, true label, probabilities) that `write_cv_predictions` writes.
    """
    from core.evaluation import classification_metrics, patient_level_metrics

    labels, groups = np.asarray(manifest.labels), np.asarray(manifest.groups)
    y, g = labels[idx], groups[idx]
    acc = np.array([r["accuracy"] for r in folds])
    pooled = classification_metrics(y, probs, manifest.class_names, seed=seed)
    patients = patient_level_metrics(y, probs, g, manifest.class_names, seed=seed)
    out = {"method": method, "folds": folds, "accuracy_mean": float(acc.mean()), "accuracy_min": float(acc.min()),
           "accuracy_max": float(acc.max()), "pooled_accuracy": pooled["accuracy"],
           "pooled_accuracy_ci95": pooled.get("accuracy_ci95"), "pooled_roc_auc": pooled.get("roc_auc_macro"),
           "pooled_balanced_accuracy": pooled.get("balanced_accuracy"),
           "pooled_recall": {r["class"]: r["recall"] for r in pooled["per_class"]},
           "pooled_support": {r["class"]: r["support"] for r in pooled["per_class"]},
           "pooled_confusion_matrix": pooled["confusion_matrix"],
           "predictions": [{"path": os.path.relpath(manifest.samples[i].path, manifest.root),
                            "group": str(groups[i]), "fold": int(fo), "true": int(labels[i]),
                            "probabilities": [float(v) for v in pr]}
                           for i, fo, pr in zip(idx, fold_of, probs)]}
    if patients is not None:
        out["patient_level"] = {
            "method": "each patient's probability is the mean over its images (Spanhol et al. 2016)",
            "n_patients": patients["n"], "accuracy": patients["accuracy"],
            "accuracy_ci95_exact": patients["accuracy_ci95_exact"],
            "balanced_accuracy": patients["balanced_accuracy"], "roc_auc": patients["roc_auc_macro"],
            "recall": {r["class"]: r["recall"] for r in patients["per_class"]},
            "support": {r["class"]: r["support"] for r in patients["per_class"]},
            "patient_recognition_rate": patients["patient_recognition_rate"], "patients": patients["patients"]}
    return out


def group_folds(cfg: TrainConfig, manifest: Manifest):
    """The group-wise K-fold split every cross-validation uses: yields (fold index, {"train", "val", "test"}
    manifests, held-out indices). StratifiedGroupKFold (shuffled with cfg.seed) holds out whole groups; a
    group-aware validation part for early stopping is carved out of the rest."""
    from sklearn.model_selection import StratifiedGroupKFold

    from core.data.split import _holdout

    labels, groups = np.asarray(manifest.labels), np.asarray(manifest.groups)
    cv = StratifiedGroupKFold(n_splits=cfg.cv_folds, shuffle=True, random_state=cfg.seed)
    for f, (rest, held) in enumerate(cv.split(np.zeros(len(labels)), labels, groups)):
        val_rel = _holdout(labels[rest], groups[rest], cfg.split[1] / (cfg.split[0] + cfg.split[1]), cfg.seed + 1)
        yield f, {"train": manifest.subset(rest[~val_rel]), "val": manifest.subset(rest[val_rel]),
                  "test": manifest.subset(held)}, held


def cv_work_dir(cfg: TrainConfig) -> Path:
    """Where cross-validation keeps its finished folds until they are recorded: `<out_dir>/.<name>.cv`."""
    return Path(cfg.out_dir) / f".{cfg.bundle_name}.cv"


def calibration_work_dir(cfg: TrainConfig) -> Path:
    """Where `--calibration inner-cv` keeps its finished folds until they are recorded (beside `cv_work_dir`)."""
    return cv_work_dir(cfg).with_name(f".{cfg.bundle_name}.cv-calibration")


def write_cv_predictions(cv: dict, path: Path, class_names: Sequence[str]) -> None:
    """`cv_predictions.csv`: one row per image of the cross-validation (fold, group, true, p_<class>)."""
    from core.checkpoints import write_csv

    write_csv(path, ["fold", "path", "group", "true", "predicted", *[f"p_{c}" for c in class_names]],
              [[r["fold"], r["path"], r["group"], class_names[r["true"]],
                class_names[int(np.argmax(r["probabilities"]))], *[f"{v:.6f}" for v in r["probabilities"]]]
               for r in cv["predictions"]])


def config_json(cfg: TrainConfig) -> dict:
    """`cfg` as recorded in metadata.json["config"] (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}


def config_from_json(recorded: dict) -> TrainConfig:
    """The TrainConfig recorded in a bundle's metadata["config"] (lists back to tuples; unknown keys dropped,
    options newer than the record at their defaults)."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in recorded.items() if k in known})


#: Settings that only name, place or report a run (folds, verbosity, output paths, external checks): what it trains
#: does not depend on them.
OUTPUT_ONLY = frozenset({"cv_folds", "cv_scope", "verbose", "out_dir", "name", "external", "distribute"})


def config_differences(recorded: dict, cfg: TrainConfig) -> dict:
    """{option: {"checkpoint": recorded value, "cross_validation": value in cfg}} for the settings that differ.

    Options newer than the checkpoint count at their default (the behaviour before they existed);
    output-only options (folds, verbosity, paths, external checks) are ignored.
    """
    was = {**config_json(TrainConfig()), **recorded}
    return {k: {"checkpoint": was[k], "cross_validation": v} for k, v in config_json(cfg).items()
            if k not in OUTPUT_ONLY and was[k] != v}


def add_cross_validation(cfg: TrainConfig, argv: Optional[Sequence[str]] = None) -> Path:
    """Cross-validate `cfg` and record it in the existing bundle `cfg.out_dir/cfg.bundle_name`.

    The bundle's model, split, predictions and test metrics stay as they are; only
    `metadata.json["cross_validation"]` is (re)written, atomically, with the command that produced it
    and every setting that differs from the checkpoint's recorded configuration.
    """
    from core.checkpoints import read_metadata, update_metadata

    if cfg.cv_folds < 2:
        raise DatasetError("--cv-only needs --cv-folds K with K >= 2.")
    check_inputs(cfg)  # e.g. a segmenter's encoder, whose training images cross-validation would hold out
    bundle = Path(cfg.out_dir) / cfg.bundle_name
    if not (bundle / "metadata.json").is_file():
        raise DatasetError(f"No checkpoint at {bundle} to add cross-validation to; pass the --out-dir and --name "
                           "of an existing bundle, or drop --cv-only to train one.")
    meta = read_metadata(bundle)
    t_start = time.time()
    set_seeds(cfg.seed)
    manifest = load_manifest(cfg)
    if list(manifest.class_names) != list(meta.get("class_names", [])):
        raise DatasetError(f"The data at {cfg.data_dir} has classes {list(manifest.class_names)}, the checkpoint "
                           f"{bundle.name} has {meta.get('class_names')}: not the same task.")
    work = cv_work_dir(cfg)
    if cfg.cv_scope == "train+val":
        from core.data.roots import bundle_splits

        parts = bundle_splits(bundle, meta, cfg.data_dir)
        keep = {s.path for k in ("train", "val") for s in parts[k].samples}
        manifest = manifest.subset([i for i, s in enumerate(manifest.samples) if s.path in keep])
    cv = cross_validate(cfg, manifest, work_dir=work)
    preds = cv.pop("predictions")
    cv["command"] = " ".join(["python", "train.py", *map(quote_arg, argv)]) if argv is not None else None
    cv["git_commit"] = git_commit()
    cv["differs_from_checkpoint"] = config_differences(meta.get("config", {}), cfg)
    dest = update_metadata(bundle, {"cross_validation": cv}, files={
        "cv_predictions.csv": lambda p: write_cv_predictions({"predictions": preds}, p, manifest.class_names)})
    shutil.rmtree(work, ignore_errors=True)  # recorded: the per-fold resume files are no longer needed
    log.info("Cross-validation (%d folds) added to %s in %.1f min: pooled accuracy %.3f", cfg.cv_folds, dest,
             (time.time() - t_start) / 60, cv["pooled_accuracy"])
    return dest


def external_check(clf, spec: str, training: Optional[Manifest] = None) -> dict:
    """Predict every image of another dataset (`KIND=DIR`, e.g. breakhis=../shared/data/breakhis_samples).

    Classes are matched by name; images of classes the model does not know are skipped. Returns the
    per-image predictions, accuracy and out-of-distribution flags for metadata.json. When `training` (the
    manifest the model learned from) is of the same dataset kind, images of its groups (patients) are
    marked `"external": False` and the headline counts only the truly external ones.
    """
    kind, _, root = spec.partition("=")
    if not root:
        raise DatasetError(f"--external takes KIND=DIR (e.g. breakhis=../shared/data/breakhis_samples), not {spec!r}")
    m = load_dataset(kind, root)
    keep = [i for i, s in enumerate(m.samples) if s.class_name in clf.class_names]
    m = m.subset(keep)
    images = [m.read(s) for s in m.samples]
    probs = clf.predict_proba(images)
    ood = clf.ood_check(images) or [{}] * len(images)
    rows = []
    for s, p, o in zip(m.samples, probs, ood):
        pred = clf.class_names[int(np.argmax(p))]
        rows.append({"path": os.path.relpath(s.path, m.root), "true": s.class_name, "predicted": pred,
                     "correct": pred == s.class_name, "subtype": s.subtype, "magnification": s.magnification,
                     "group": s.group, "probabilities": {c: float(v) for c, v in zip(clf.class_names, p)},
                     "out_of_distribution": o.get("out_of_distribution")})
    seen = set(training.groups) if training is not None and training.name == m.name else set()
    for r in rows:
        r["external"] = r["group"] not in seen
    ext = [r for r in rows if r["external"]]
    n_ok = sum(r["correct"] for r in ext)
    log.info("External check %s: %d/%d correct (%d image(s) of patients seen in training not counted)", kind, n_ok,
             len(ext), len(rows) - len(ext))
    label = ("EXTERNAL CHECK: never used for training or model selection"
             + (f"; {len(rows) - len(ext)} image(s) from patients in the training data are shown but not counted"
                if len(ext) < len(rows) else ""))
    return {"name": kind, "root": str(m.root), "label": label, "n_images": len(ext), "n_correct": n_ok,
            "accuracy": n_ok / max(len(ext), 1), "n_not_external": len(rows) - len(ext), "images": rows,
            "citation": CITATIONS.get(kind)}


def load_manifest(cfg: TrainConfig) -> Manifest:
    """The dataset `cfg` names (BreakHis task/magnification filter, optional seeded `--limit` subset)."""
    opts = {"task": cfg.task, "magnification": cfg.magnification} if cfg.dataset == "breakhis" else {}
    manifest = load_dataset(cfg.dataset, cfg.data_dir, **opts)
    if cfg.limit:
        rng = np.random.default_rng(cfg.seed)
        keep = np.sort(rng.permutation(len(manifest))[:cfg.limit])
        manifest = manifest.subset(keep)
    return manifest


CALIBRATIONS = ("val", "inner-cv", "none")


def calibrate(cfg: TrainConfig, y_val: np.ndarray, raw_val: np.ndarray, splits: dict
              ) -> tuple[float, dict, Optional[list[dict]]]:
    """The softmax temperature and how it was found -> (T, metadata entry, out-of-fold predictions or None).

    "val": fitted on the validation split (the default). "inner-cv": fitted on the out-of-fold predictions
    of a group-wise `cv_folds`-fold (5 if unset) cross-validation over the training and validation groups,
    for splits whose validation part holds too few patients to calibrate on; test groups stay out.
    "none": T = 1. The out-of-fold predictions (uncalibrated) go to `calibration_predictions.csv`, where an
    operating point can be chosen too (`python -m core.evaluation CKPT --operating-point C --choose-on calibration`).
    """
    from dataclasses import replace

    from core.checkpoints import apply_temperature
    from core.evaluation import expected_calibration_error, fit_temperature

    if cfg.calibration not in CALIBRATIONS:
        raise ConfigError(f"--calibration must be one of {', '.join(CALIBRATIONS)}, not {cfg.calibration!r}.")
    if cfg.calibration == "none":
        return 1.0, {"method": "none (temperature 1)"}, None
    if cfg.calibration == "val":
        return fit_temperature(y_val, raw_val), {"method": "temperature scaling on the validation split"}, None
    inner_cfg = replace(cfg, cv_folds=cfg.cv_folds if cfg.cv_folds > 1 else 5, cv_scope="train+val")
    inner = cross_validate(inner_cfg, splits["train"].extend(splits["val"].samples),
                           work_dir=calibration_work_dir(cfg))
    y = np.array([r["true"] for r in inner["predictions"]])
    p = np.array([r["probabilities"] for r in inner["predictions"]])
    t = fit_temperature(y, p)
    before = expected_calibration_error(y, p)
    after = expected_calibration_error(y, apply_temperature(p, t))
    log.info("Temperature %.3f from %d out-of-fold predictions (ECE %.3f -> %.3f)", t, len(y), before, after)
    return t, {"method": f"temperature scaling on the out-of-fold predictions of a group-wise {inner_cfg.cv_folds}-"
                         f"fold cross-validation over the {len(y)} training and validation images (test groups "
                         "kept out)", "n": len(y), "out_of_fold_ece_before": before, "out_of_fold_ece_after": after,
               "predictions": "calibration_predictions.csv"}, inner["predictions"]


def train(cfg: TrainConfig, argv: Optional[Sequence[str]] = None) -> Optional[Path]:
    """Train one checkpoint from `cfg` and write its bundle to `cfg.out_dir/cfg.bundle_name`.

    With `cfg.distribute == "multiworker"` every worker of the TF_CONFIG cluster runs this; they train in lockstep
    and only the chief evaluates and writes the bundle (other workers return None)."""
    import keras
    import tensorflow as tf

    from core.checkpoints import write_bundle, write_csv, write_json
    from core.evaluation import classification_metrics
    from core.checkpoints import apply_temperature
    from core.models import last_conv_layer, sha256_file

    t_start = time.time()
    strategy, chief, n_workers = None, True, 1
    if cfg.distribute == "multiworker":
        from dataclasses import replace

        strategy, chief, n_workers = multiworker_strategy()  # first: collective ops are set up at start-up
        if cfg.cv_folds > 1:
            raise DatasetError("--cv-folds runs on one machine: drop it with --distribute multiworker.")
        if cfg.cache:
            log.info("Multi-worker training runs a plain model.fit on images (no activation cache).")
            cfg = replace(cfg, cache=False)
    plan_phases(cfg)  # impossible settings are refused before any image is decoded
    check_inputs(cfg)
    check_mixup(cfg)
    check_aux_mask(cfg)
    set_seeds(cfg.seed)
    manifest = load_manifest(cfg)
    if cfg.split_file:
        splits = read_split(cfg.split_file, manifest.root, manifest.class_names, manifest.name,
                            manifest.patch_side)
    else:
        splits = split_manifest(manifest, cfg.split, cfg.seed)
    for s in ("train", "val", "test"):
        if len(splits[s]) == 0:
            raise DatasetError(f"The {s} split is empty; the dataset is too small for a {cfg.split} split.")
    check_encoder_split(cfg, splits, manifest.root)
    split_counts = {s: splits[s].class_counts() for s in ("train", "val", "test")}
    coverage_notes = check_class_coverage(split_counts, manifest.class_counts())
    k = len(manifest.class_names)
    log.info("Dataset %s at %s: %d images, classes %s", manifest.name, manifest.root, len(manifest),
             manifest.class_counts())
    log.info("Split (seed %d): train %d, val %d, test %d", cfg.seed, *(len(splits[s]) for s in ("train", "val", "test")))

    data = {s: decode_split(splits[s], cfg) for s in ("train", "val", "test")}

    n_feedback = 0
    if cfg.feedback:
        from core.feedback import FeedbackStore

        extra = FeedbackStore(cfg.feedback).consented_images(manifest.class_names)
        if extra:
            x, y = data["train"]
            xs = [img if cfg.patches else model_input(img, cfg.input_size, cfg.clahe) for img, _ in extra]
            x = [*x, *xs] if cfg.patches else np.concatenate([x, np.stack(xs)])
            data["train"] = (x, np.concatenate([y, [lab for _, lab in extra]]).astype(np.int64))
        n_feedback = len(extra)
        log.info("Added %d consented feedback image(s) from %s to the training split", n_feedback, cfg.feedback)

    soft, distillation = None, None
    if cfg.distil_from:
        from core.training.distil import bundle_soft_targets

        soft, distillation = bundle_soft_targets(cfg, data["train"], manifest.class_names)
        set_seeds(cfg.seed)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model, provenance, history, timing = train_model(cfg, k, data["train"], data["val"], soft_targets=soft,
                                                         masks=split_masks(cfg, splits["train"], splits["val"]))
    if strategy is not None:
        timing["distribute"] = {"strategy": "MultiWorkerMirroredStrategy", "workers": n_workers,
                                "trainable_weights_sha256": weights_digest(model),
                                "note": "trainable weights are identical on every worker; BatchNorm running "
                                        "statistics are the chief's own"}
        log.info("Multi-worker training done (%d workers); final trainable weights sha256 %s", n_workers,
                 timing["distribute"]["trainable_weights_sha256"])
        if not chief:
            log.info("This worker is not the chief: the chief evaluates and writes the bundle.")
            return None
    clf = in_memory_classifier(model, cfg, manifest.class_names)
    raw = {s: clf.raw_proba(data[s][0]) for s in ("val", "test")}
    temperature, calibration, calibration_preds = calibrate(cfg, data["val"][1], raw["val"], splits)
    clf.temperature = temperature
    probs = {s: apply_temperature(raw[s], temperature) for s in raw}
    metrics = {s: classification_metrics(data[s][1], probs[s], manifest.class_names, seed=cfg.seed)
               for s in ("val", "test")}
    uncal = classification_metrics(data["test"][1], raw["test"], manifest.class_names, n_boot=0)
    log.info("Temperature %.3f; validation accuracy %.3f, macro ROC AUC %s (choose settings on these); "
             "test ECE %.3f (uncalibrated %.3f)", temperature, metrics["val"]["accuracy"],
             metrics["val"]["roc_auc_macro"], metrics["test"]["ece"], uncal["ece"])

    from core import ood as ood_mod

    fl = ood_mod.feature_layer(model)
    feats = {s: clf.features(data[s][0]) for s in ("train", "val", "test")}
    detector = ood_mod.fit(feats["train"], data["train"][1], feats["val"])
    ood_info = ood_mod.summary(detector, fl, feats["test"], feats["train"])
    clf.ood = detector

    cv_data = manifest if cfg.cv_scope == "all" else splits["train"].extend(splits["val"].samples)
    cv = cross_validate(cfg, cv_data, work_dir=cv_work_dir(cfg)) if cfg.cv_folds > 1 else None
    cv_preds = cv.pop("predictions") if cv is not None else None
    externals = [external_check(clf, spec, manifest) for spec in cfg.external]

    argv = list(argv) if argv is not None else None
    name = cfg.bundle_name
    metadata = {
        **run_record(name, argv),
        "config": config_json(cfg),
        "dataset": {"kind": manifest.name, "root": str(manifest.root), "n_images": len(manifest),
                    "class_counts": manifest.class_counts(), "citation": CITATIONS.get(manifest.name),
                    "task": cfg.task if cfg.dataset == "breakhis" else None,
                    "magnification": cfg.magnification},
        "split": {"seed": cfg.seed, "fractions": list(cfg.split), "group_aware": True,
                  "file": "split.csv", "reused_from": cfg.split_file,
                  "feedback_images_added_to_train": n_feedback, "feedback_db": cfg.feedback,
                  "counts": {s: len(splits[s]) for s in ("train", "val", "test")},
                  "class_counts": split_counts,
                  **({"warnings": coverage_notes} if coverage_notes else {})},
        "class_names": list(manifest.class_names),
        "input_size": cfg.input_size,
        "backbone": cfg.backbone,
        "weights": provenance,
        "preprocessing": {"decoder": "core.preprocessing.load_image", "resize": "cv2 INTER_AREA/LINEAR to square",
                          "clahe": cfg.clahe, "normalisation": "in-graph BackbonePreprocess layer",
                          "stain_standardise": ("in-graph StainStandardise layer (per-image optical density "
                                                "mapped to training-set targets)") if cfg.stain_standardise else None,
                          "input_range": "RGB 0-255"},
        "head": {"pooling": cfg.pooling, "units": list(cfg.head_units), "dropout": cfg.dropout, "l2": cfg.l2,
                 **({"solver": "logistic regression (scikit-learn lbfgs)", "C": cfg.logistic_c}
                    if cfg.logistic_c is not None else {}),
                 **({"trunk_layer": cfg.trunk_layer} if cfg.trunk_layer else {}),
                 **({"scales": [cfg.input_size, *cfg.scales],
                     "multi_scale": "the trunk runs on the input and on copies resized to each smaller side "
                                    "(same weights); the pooled features of all scales are concatenated"}
                    if cfg.scales else {})},
        "gradcam_layer": last_conv_layer(model),
        "training": {"epochs": len(history), "phases": timing["phases"], "cache_seconds": timing.get("cache_seconds"),
                     "cut_layer": timing.get("cut_layer"), "cache_skipped": timing.get("cache_skipped"),
                     **({"auxiliary_mask": {
                         **timing["aux_mask"], "loss": "binary cross-entropy of a 1x1-convolution sigmoid map on the "
                                                       "feature layer against each grid cell's lesion share (union of "
                                                       "the image's masks; none: empty), augmented with its image",
                         "note": "training only: the saved model has no mask head"}}
                        if "aux_mask" in timing else {}),
                     "distribute": timing.get("distribute"),
                     "precision": timing.get("precision", "float32"), "wall_seconds": None, "platform": platform.platform(),
                     "tensorflow": tf.__version__, "keras": keras.__version__},
        "calibration": {**calibration, "temperature": temperature,
                        "test_ece_before": uncal["ece"], "test_ece_after": metrics["test"]["ece"]},
        "metrics": metrics,
        "ood": ood_info,
    }
    if cfg.patches:
        metadata["patches"] = {**cfg.patch_config.to_json(), "train_patches_per_image_per_epoch": cfg.patches,
                               "sampling": "tissue-aware random crops (darkest channel <= 215 on >= 50% of "
                                           "pixels, else the most tissue-rich of 20 tries); with the cache, "
                                           "each epoch draws one of 1 + augment_copies precomputed draws"}
    if distillation is not None:
        metadata["distillation"] = distillation
    if cv is not None:
        if cfg.distil_from:
            cv["method"] += ("; distillation: in every fold the teacher's recipe is retrained on the fold's training "
                             "part and its probabilities on those images are the soft targets (the held-out images "
                             "are unseen by teacher and student)")
        metadata["cross_validation"] = cv
    if externals:
        metadata["external_checks"] = externals
    hist_keys = sorted({k2 for row in history for k2 in row} - {"epoch", "phase"})
    pred_header, pred_rows = bundle_predictions(splits, probs, externals, manifest.class_names)

    def fill(tmp: Path) -> None:
        model.save(tmp / "model.keras")
        metadata["model_sha256"] = sha256_file(tmp / "model.keras")
        metadata["training"]["wall_seconds"] = round(time.time() - t_start, 1)
        write_csv(tmp / "history.csv", ["epoch", "phase", *hist_keys],
                  [[r["epoch"], r["phase"], *[r.get(k2, "") for k2 in hist_keys]] for r in history])
        write_csv(tmp / "predictions.csv", pred_header, pred_rows)
        write_split(splits, tmp / "split.csv")
        detector.save(tmp / "ood.npz")
        if cv_preds is not None:
            write_cv_predictions({"predictions": cv_preds}, tmp / "cv_predictions.csv", manifest.class_names)
        if calibration_preds is not None:
            write_cv_predictions({"predictions": calibration_preds}, tmp / "calibration_predictions.csv",
                                 manifest.class_names)
        write_json(tmp / "metadata.json", metadata)

    dest = write_bundle(Path(cfg.out_dir) / name, fill)
    for work in (cv_work_dir(cfg), calibration_work_dir(cfg)):
        shutil.rmtree(work, ignore_errors=True)  # recorded: the per-fold resume files are no longer needed
    log.info("Wrote %s in %.1f min", dest, (time.time() - t_start) / 60)
    return dest
