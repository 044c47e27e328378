"""Lesion segmentation training (`train.py --task segmentation`): a U-Net on the DenseNet121 encoder.

Same data, split and bundle conventions as the classifiers: the dataset's near-duplicate-grouped split
(so one lesion's repeated scans never straddle it), two phases (decoder with the encoder frozen, then
the encoder fine-tuned), early stopping on validation loss, and an atomic bundle whose metadata holds
per-image Dice / IoU with bootstrap intervals by class, false-positive area on normal images, and,
with `--cv-folds`, a group-wise K-fold cross-validation of the recipe.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from core.data import Manifest, read_split, split_manifest, write_split
from core.data.loaders import CITATIONS
from core.errors import ConfigError, DatasetError
from core.evaluation import mean_ci
from core.preprocessing import load_mask, model_input
from core.segmentation import SHAPE_COLUMNS, dice_iou, predicted_shape
from core.training.classify import (OUTPUT_ONLY, TrainConfig, check_inputs, config_differences, config_json,
                                    cv_work_dir, fit_callbacks, group_folds, load_manifest)
from core.training.common import (git_commit, joint_geometry, quote_arg, resolve_precision, run_phase, run_record,
                                  set_seeds)

log = logging.getLogger("breastxai.train")

#: Thresholds on the lesion probability tried on the validation split (the best mean Dice is kept).
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def load_seg_arrays(manifest: Manifest, size: int, clahe: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, S, S, 3) and lesion masks float32 (N, S, S, 1) in {0, 1} (union of the mask files;
    empty for images without one, e.g. BUSI's normal scans), both resized to S x S."""
    import cv2

    x = np.zeros((len(manifest), size, size, 3), np.uint8)
    y = np.zeros((len(manifest), size, size, 1), np.float32)
    for i, s in enumerate(manifest.samples):
        img = manifest.read(s)
        x[i] = model_input(img, size, clahe)
        if s.mask_paths:
            m = load_mask(s.mask_paths, img.shape[:2]).astype(np.float32)
            y[i, ..., 0] = cv2.resize(m, (size, size), interpolation=cv2.INTER_AREA) >= 0.5
    return x, y


def true_masks(manifest: Manifest) -> list[np.ndarray]:
    """Each image's lesion mask at its own resolution, bool (H, W) (all False without mask files)."""
    from PIL import Image

    out = []
    for s in manifest.samples:
        with Image.open(s.path) as im:
            shape = (im.height, im.width)
        out.append(load_mask(s.mask_paths, shape))
    return out


def lesion_masks(manifest: Manifest, size: int) -> np.ndarray:
    """Lesion masks float32 (N, S, S, 1) in {0, 1} at S x S (union of the mask files; empty without one)."""
    import cv2

    out = np.zeros((len(manifest), size, size, 1), np.float32)
    for i, m in enumerate(true_masks(manifest)):
        out[i, ..., 0] = cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) >= 0.5
    return out


def make_joint_augmenter(seed: int, flip: str = "horizontal", rotation: float = 0.05, elastic: float = 0.0):
    """Random geometry applied identically to image and mask (flip, rotation, zoom, shift; black fill; with
    `elastic` in (0, 1] an elastic deformation as in the original U-Net, Ronneberger et al. 2015: Keras's
    RandomElasticTransform, a smooth random displacement field growing with `elastic`, at 0.5 a mean 1.6% and a
    95th percentile 4% of the image side, on about half the images), then brightness and contrast on the image
    only. Input: image (B, S, S, 3) 0-255, mask (B, S, S, 1)."""
    from keras import layers

    geo = [layers.RandomFlip(flip, seed=seed)] if flip != "none" else []
    if rotation > 0:
        geo.append(layers.RandomRotation(rotation, fill_mode="constant", seed=seed + 1))
    geo += [layers.RandomZoom((-0.15, 0.15), fill_mode="constant", seed=seed + 2),
            layers.RandomTranslation(0.08, 0.08, fill_mode="constant", seed=seed + 3)]
    if elastic > 0:
        geo.append(layers.RandomElasticTransform(factor=1.0, scale=(elastic, elastic), fill_mode="constant",
                                                 seed=seed + 6))
    photometric = [layers.RandomBrightness(0.15, value_range=(0, 255), seed=seed + 4),
                   layers.RandomContrast(0.2, seed=seed + 5)]

    def augment(image, mask):
        return joint_geometry(geo, photometric, image, mask)

    return augment


def dice_loss(y_true, y_pred, smooth: float = 1.0, lesion_images_only: bool = False):
    """1 - soft Dice over each image, averaged over the batch (an empty mask and empty prediction give 0).

    `lesion_images_only`: average over the images whose mask is not empty (0 for a batch without one), so
    an empty scan's stray pixels cost only their cross-entropy, not a whole image's Dice."""
    import keras

    ops = keras.ops
    axes = (1, 2, 3)
    inter = ops.sum(y_true * y_pred, axis=axes)
    truth = ops.sum(y_true, axis=axes)
    loss = 1.0 - (2.0 * inter + smooth) / (truth + ops.sum(y_pred, axis=axes) + smooth)
    if not lesion_images_only:
        return ops.mean(loss)
    has = ops.cast(truth > 0, loss.dtype)
    return ops.sum(loss * has) / ops.maximum(ops.sum(has), 1.0)


def tversky_loss(y_true, y_pred, fp_weight: float = 0.3, fn_weight: float = 0.7, smooth: float = 1.0):
    """1 - soft Tversky index (TP + s) / (TP + a FP + b FN + s) over each image, averaged over the batch
    (Salehi et al. 2017). With b > a a missed lesion pixel costs more than a stray one; a = b = 0.5 is Dice."""
    import keras

    ops = keras.ops
    axes = (1, 2, 3)
    tp = ops.sum(y_true * y_pred, axis=axes)
    fp = ops.sum((1.0 - y_true) * y_pred, axis=axes)
    fn = ops.sum(y_true * (1.0 - y_pred), axis=axes)
    return ops.mean(1.0 - (tp + smooth) / (tp + fp_weight * fp + fn_weight * fn + smooth))


#: The loss's overlap term (`TrainConfig.seg_dice`, `train.py --seg-dice`): soft Dice averaged over every image
#: or over the images with a lesion only, or the Tversky index weighting missed lesion pixels 0.7, stray ones 0.3.
SEG_DICE = {"every_image": "binary cross-entropy + soft Dice",
            "lesion_images": "binary cross-entropy + soft Dice over the images with a lesion",
            "tversky": "binary cross-entropy + soft Tversky (false positives weighted 0.3, false negatives 0.7)"}


_UNET = ("U-Net: DenseNet121 encoder (skips conv1_relu, pool2_relu, pool3_relu, pool4_relu, relu), 5 decoder steps of "
         "bilinear 2x upsampling + concatenation + 2 x (3x3 conv, BatchNorm, ReLU) with 256/128/64/32/16 filters, "
         "sigmoid output")

#: The decoder's skip connections (`TrainConfig.seg_decoder`, `train.py --seg-decoder`) -> metadata's architecture.
SEG_DECODERS = {"unet": _UNET,
                "attention": _UNET.replace("U-Net:", "Attention U-Net:").replace(
                    "upsampling + concatenation", "upsampling + concatenation with the encoder map times an "
                    "additive attention gate (Oktay et al. 2018; one 0-1 weight per pixel from the encoder and "
                    "decoder maps)")}


def check_seg_choices(cfg: TrainConfig) -> None:
    """ConfigError for an unknown `seg_dice` or `seg_decoder`, an `ema` momentum outside [0, 1), a negative
    `deep_supervision` or `seg_classify` weight, an `elastic` magnitude outside [0, 1] or `elastic` without
    augmentation, before any image is decoded."""
    segmentation_loss(cfg.seg_dice)
    if cfg.seg_decoder not in SEG_DECODERS:
        raise ConfigError(f"seg_decoder must be one of {', '.join(SEG_DECODERS)}, not {cfg.seg_decoder!r}.")
    if not 0.0 <= cfg.ema < 1.0:
        raise ConfigError(f"--ema is a momentum in [0, 1) (0: off), not {cfg.ema}.")
    if cfg.deep_supervision < 0:
        raise ConfigError(f"--deep-supervision is a loss weight (0: off), not {cfg.deep_supervision}.")
    if cfg.seg_classify < 0:
        raise ConfigError(f"--seg-classify is a loss weight (0: off), not {cfg.seg_classify}.")
    if not 0.0 <= cfg.elastic <= 1.0:
        raise ConfigError(f"--elastic is a deformation magnitude in [0, 1] (0: off), not {cfg.elastic}.")
    if cfg.elastic > 0 and not cfg.augment:
        raise ConfigError("--elastic is an augmentation: it cannot run with --no-augment.")


def segmentation_loss(seg_dice: str = "every_image"):
    """The training loss: binary cross-entropy (pixel mean) + an overlap term, the usual U-Net objective for small
    lesions; `seg_dice` (a key of `SEG_DICE`) picks the term: soft Dice over every image or over the images with a
    lesion, or the Tversky index."""
    import keras

    if seg_dice not in SEG_DICE:
        raise ConfigError(f"seg_dice must be one of {', '.join(SEG_DICE)}, not {seg_dice!r}.")
    overlap = tversky_loss if seg_dice == "tversky" else functools.partial(
        dice_loss, lesion_images_only=seg_dice == "lesion_images")

    def bce_dice_loss(y_true, y_pred):
        return keras.ops.mean(keras.losses.binary_crossentropy(y_true, y_pred)) + overlap(y_true, y_pred)

    return bce_dice_loss


#: Decoder steps that get an auxiliary output under deep supervision (`train.py --deep-supervision`): the first four
#: of the five, at 1/16, 1/8, 1/4 and 1/2 of the input side (the fifth is the checkpoint's own output).
DEEP_SUPERVISION_STEPS = (1, 2, 3, 4)


def deep_supervision_outputs(model) -> dict:
    """The outputs of the training-only network of deep supervision (Lee et al. 2015; as in UNet++ and nnU-Net):
    `model`'s lesion map under its own name and, for each decoder step in `DEEP_SUPERVISION_STEPS`, a 1x1-convolution
    sigmoid map of that step's features upsampled (bilinear) to the input side, named `ds<step>`, each trained
    against the full-size mask. The coarse steps see the whole lesion in a few cells, so they are taught to find
    it before the fine steps draw its edge. The checkpoint keeps `model` alone (one output, the same forward pass).
    Returns {output name: tensor}."""
    from keras import layers

    from core.models import SEG_OUTPUT_NAME, SEG_PREFIX

    side = int(model.output.shape[1])
    outs = {SEG_OUTPUT_NAME: model.output}
    for step in DEEP_SUPERVISION_STEPS:
        fmap = model.get_layer(f"{SEG_PREFIX}relu{step}_2").output
        aux = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name=f"ds{step}_conv")(fmap)
        outs[f"ds{step}"] = layers.UpSampling2D(side // int(fmap.shape[1]), interpolation="bilinear", dtype="float32",
                                                name=f"ds{step}")(aux)
    return outs


#: Name of the training-only image-class output of `train.py --seg-classify` (multi-task segmentation).
CLASS_OUTPUT_NAME = "cls"
#: Dropout before that head's softmax.
CLASS_HEAD_DROPOUT = 0.3


def has_training_outputs(cfg: TrainConfig) -> bool:
    """Whether `cfg` trains outputs beside the lesion map (deep supervision, the image-class head): then the
    training network is a wrapper with several outputs and early stopping follows the lesion map's own loss."""
    return cfg.deep_supervision > 0 or cfg.seg_classify > 0


def class_head_output(model, n_classes: int, dropout: float = CLASS_HEAD_DROPOUT):
    """The training-only image-class output of multi-task segmentation (`train.py --seg-classify`): the encoder's
    last feature map (DenseNet121's `relu`, 7 x 7 x 1024 at 224 px, the U-Net's bottleneck) averaged over space,
    dropout, and a softmax over `n_classes`, named `CLASS_OUTPUT_NAME`. Its cross-entropy reaches the lesion map
    only through the shared encoder, which learns what tells a lesion scan (and a malignant one) from a normal
    one; the checkpoint keeps `model` alone. Returns the tensor (N, n_classes)."""
    from keras import layers

    from core.models import DENSENET121_SKIPS

    x = layers.GlobalAveragePooling2D(name="cls_pool")(model.get_layer(DENSENET121_SKIPS[0]).output)
    x = layers.Dropout(dropout, name="cls_dropout")(x)
    return layers.Dense(n_classes, activation="softmax", dtype="float32", name=CLASS_OUTPUT_NAME)(x)


def _compile(model, lr: float, seg_dice: str = "every_image", ema: float = 0.0,
             deep_supervision: float = 0.0, seg_classify: float = 0.0) -> None:
    """Adam (with an exponential moving average of the weights where `ema` > 0) + `segmentation_loss`. For a
    training network with auxiliary outputs: the same loss on the maps of `deep_supervision_outputs`, each weighted
    `deep_supervision`; sparse categorical cross-entropy on the `class_head_output`, weighted `seg_classify`
    (and its accuracy); the IoU metric on the lesion map alone."""
    import keras

    from core.models import SEG_OUTPUT_NAME

    opt = keras.optimizers.Adam(lr, use_ema=True, ema_momentum=ema) if ema > 0 else keras.optimizers.Adam(lr)
    iou = keras.metrics.BinaryIoU(target_class_ids=[1], threshold=0.5, name="iou")
    names = list(getattr(model, "output_names", None) or [SEG_OUTPUT_NAME])  # a Sequential has one output
    if len(names) == 1:
        model.compile(optimizer=opt, loss=segmentation_loss(seg_dice), metrics=[iou])
        return
    loss = {n: keras.losses.SparseCategoricalCrossentropy() if n == CLASS_OUTPUT_NAME else segmentation_loss(seg_dice)
            for n in names}
    weights = {n: 1.0 if n == SEG_OUTPUT_NAME else seg_classify if n == CLASS_OUTPUT_NAME else deep_supervision
               for n in names}
    metrics = {SEG_OUTPUT_NAME: [iou], **({CLASS_OUTPUT_NAME: ["accuracy"]} if CLASS_OUTPUT_NAME in names else {})}
    model.compile(optimizer=opt, loss=loss, loss_weights=weights, metrics=metrics)


def phase_callbacks(cfg: TrainConfig) -> list:
    """`fit_callbacks` (early stopping with the best weights restored, LR reduction) on the validation loss, with
    `cfg.deep_supervision` or `cfg.seg_classify` on the lesion map's own loss (the auxiliary outputs are not the
    checkpoint); with `cfg.ema` first Keras's SwapEMAWeights, so that validation, early stopping and the restored
    best weights all use the weights' moving average (Polyak averaging) rather than the last step's weights."""
    import keras

    from core.models import SEG_OUTPUT_NAME

    swap = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if cfg.ema > 0 else []
    monitor = f"val_{SEG_OUTPUT_NAME}_loss" if has_training_outputs(cfg) else "val_loss"
    return swap + fit_callbacks(cfg, monitor)


def fit_segmenter(model, cfg: TrainConfig, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
                  y_val: np.ndarray, labels: Optional[tuple[np.ndarray, np.ndarray]] = None,
                  n_classes: int = 0) -> tuple[list[dict], dict]:
    """Phase "decoder" (encoder frozen, lr `cfg.lr`, `cfg.head_epochs`), then "fine_tune" (the encoder's last
    `cfg.fine_tune_layers` layers or all with -1, lr `cfg.fine_tune_lr`, `cfg.fine_tune_epochs`); each with
    early stopping on validation loss (best weights restored) and LR reduction. With `cfg.seg_classify` > 0,
    `labels` (train, val: int class indices, (N,)) and `n_classes` feed the training-only `class_head_output`.
    Returns (history, timing)."""
    import keras
    import tensorflow as tf

    from core.models import SEG_OUTPUT_NAME, encoder_layers, set_encoder_trainable

    classify = cfg.seg_classify > 0
    if classify and (labels is None or n_classes < 2):
        raise ValueError("--seg-classify needs each training and validation image's class (labels, n_classes >= 2).")
    augment = make_joint_augmenter(cfg.seed, cfg.flip, cfg.rotation, cfg.elastic) if cfg.augment else None
    l_train, l_val = (np.asarray(labels[0], np.int32), np.asarray(labels[1], np.int32)) if classify else (None, None)
    tensors = (x_train, y_train, l_train) if classify else (x_train, y_train)
    ds = tf.data.Dataset.from_tensor_slices(tensors).shuffle(
        len(x_train), seed=cfg.seed, reshuffle_each_iteration=True).batch(cfg.batch_size)

    def prepare(x, y, *label):
        x, y = augment(tf.cast(x, tf.float32), y) if augment else (tf.cast(x, tf.float32), y)
        return (x, y, *label)

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    val = (x_val.astype(np.float32), y_val)
    target = model
    if has_training_outputs(cfg):  # training-only outputs beside the lesion map; the saved model is `model` alone
        outs = deep_supervision_outputs(model) if cfg.deep_supervision > 0 else {SEG_OUTPUT_NAME: model.output}
        if classify:
            outs[CLASS_OUTPUT_NAME] = class_head_output(model, n_classes)
        target = keras.Model(model.input, outs, name=f"{model.name}_training")

        def targets(y, label=None):  # every map learns the same full-size mask; the class head the image's class
            return {n: label if n == CLASS_OUTPUT_NAME else y for n in outs}

        ds = ds.map(lambda x, y, *label: (x, targets(y, *label)))
        val = (val[0], targets(y_val, l_val))
    ds = ds.prefetch(tf.data.AUTOTUNE)
    enc = [l.name for l in encoder_layers(model)]
    phases = []
    if cfg.head_epochs > 0:
        phases.append(("decoder", None, cfg.head_epochs, cfg.lr))
    if cfg.fine_tune_layers != 0 and cfg.fine_tune_epochs > 0:
        first = "all" if cfg.fine_tune_layers < 0 or cfg.fine_tune_layers >= len(enc) else enc[-cfg.fine_tune_layers]
        phases.append(("fine_tune", first, cfg.fine_tune_epochs, cfg.fine_tune_lr))
    if not phases:
        raise ValueError("Nothing to train: set --head-epochs or --fine-tune-epochs above 0.")
    precision = resolve_precision(cfg.precision)
    verbose = 0 if cfg.verbose == 0 else (1 if sys.stdout.isatty() else 2)
    history, timing, epoch0 = [], {"phases": [], "precision": precision}, 0
    for name, first, epochs, lr in phases:
        n = set_encoder_trainable(model, first)
        log.info("Phase %s: %d encoder layers trainable (of %d), lr %.1e, up to %d epochs", name, n, len(enc), lr,
                 epochs)
        _compile(target, lr, cfg.seg_dice, cfg.ema, cfg.deep_supervision, cfg.seg_classify)
        rows, row = run_phase(target, name, ds, val, epoch0, epochs, phase_callbacks(cfg), precision, verbose,
                              batch_size=cfg.batch_size)
        if target is not model:  # Keras logs the lesion map's IoU as <output>_iou: history.csv keeps the usual name
            rows = [{k.replace(f"{SEG_OUTPUT_NAME}_iou", "iou"): v for k, v in r.items()} for r in rows]
        history += rows
        timing["phases"].append(row)
        epoch0 += row["epochs"]
    return history, timing


def segmentation_metrics(rows: Sequence[dict], class_names: Sequence[str], n_boot: int = 1000,
                         seed: int = 0) -> dict:
    """Summary of per-image rows (`class`, `dice`, `iou`, `true_area`, `pred_area` as fractions of the image).

    Dice / IoU: mean, median and percentile-bootstrap 95% interval over lesion images (true mask not empty),
    overall and per class. Images without a lesion: mean false-positive area (fraction of the image called
    lesion) and the share with no predicted lesion at all.
    """
    lesion = [r for r in rows if r["true_area"] > 0]
    empty = [r for r in rows if r["true_area"] == 0]
    out = {"n_images": len(rows), "n_lesion_images": len(lesion),
           "dice": mean_ci([r["dice"] for r in lesion], n_boot, seed),
           "iou": mean_ci([r["iou"] for r in lesion], n_boot, seed),
           "by_class": {}}
    for c in class_names:
        rc = [r for r in lesion if r["class"] == c]
        if rc:
            out["by_class"][c] = {"dice": mean_ci([r["dice"] for r in rc], n_boot, seed),
                                  "iou": mean_ci([r["iou"] for r in rc], n_boot, seed)}
    if empty:
        fp = np.array([r["pred_area"] for r in empty])
        out["no_lesion_images"] = {"n": len(empty), "false_positive_area_mean": float(fp.mean()),
                                   "false_positive_area_max": float(fp.max()),
                                   "share_with_no_predicted_lesion": float(np.mean(fp == 0))}
    return out


def score_masks(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], manifest: Manifest) -> list[dict]:
    """Per-image rows for `segmentation_metrics`: path, class, dice, iou, true/predicted area fractions, and the
    predicted lesion's shape (`SHAPE_COLUMNS`)."""
    rows = []
    for s, p, t in zip(manifest.samples, preds, truths):
        d, j = dice_iou(p, t)
        rows.append({"path": os.path.relpath(s.path, manifest.root), "class": s.class_name, "group": s.group,
                     "dice": d, "iou": j, "true_area": float(t.mean()), "pred_area": float(p.mean()),
                     **predicted_shape(p)})
    return rows


def choose_postprocessing(maps: Sequence[np.ndarray], truths: Sequence[np.ndarray]) -> dict:
    """Threshold (from THRESHOLDS) and largest-region-only (yes / no) with the best mean validation score:
    Dice on lesion images, and 1 - false-positive area on images without a lesion."""
    from core.segmentation import postprocess

    best = None
    for keep in (False, True):
        for t in THRESHOLDS:
            scores = []
            for m, tr in zip(maps, truths):
                p = postprocess(m, t, keep)
                d, _ = dice_iou(p, tr)
                scores.append(d if tr.any() else 1.0 - float(p.mean()))
            s = float(np.mean(scores))
            if best is None or s > best["validation_score"] + 1e-9:
                best = {"threshold": t, "largest_region_only": keep, "validation_score": s}
    return best


def _segment_split(seg, manifest: Manifest, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Probability maps at each image's own resolution, and the true masks."""
    truths = true_masks(manifest)
    maps = seg.proba_maps_from_inputs(x, [t.shape for t in truths])
    return maps, truths


def train_fold_model(cfg: TrainConfig, train_xy: tuple, val_xy: tuple, parts: Optional[dict] = None):
    """Build the U-Net from `cfg` and fit it -> (model, weights provenance, history, timing). `parts` (the "train"
    and "val" manifests) gives the image classes `cfg.seg_classify` trains on."""
    from core.models import SegmenterConfig, build_segmenter

    model, provenance = build_segmenter(SegmenterConfig(input_size=cfg.input_size, weights=cfg.weights,
                                                        dropout=cfg.dropout, attention=cfg.seg_decoder == "attention"))
    log.info("Segmenter %s: %d layers, %d parameters; weights: %s", model.name, len(model.layers),
             model.count_params(), provenance["source"])
    labels = (parts["train"].labels, parts["val"].labels) if parts is not None else None
    n_classes = len(parts["train"].class_names) if parts is not None else 0
    history, timing = fit_segmenter(model, cfg, *train_xy, *val_xy, labels=labels, n_classes=n_classes)
    return model, provenance, history, timing


#: Recorded settings that name or place a run without changing what it trains (left out of `fold_encoder`'s key):
#: the output-only ones and where the data and split were read from (the key holds the fold's images themselves).
RECIPE_NAMING = OUTPUT_ONLY | {"data_dir", "split_file"}


def encoder_recipe(bundle: Path) -> tuple[TrainConfig, str]:
    """The recipe that retrains a segmenter bundle's encoder in a classifier's cross-validation -> (config, what it
    is): the bundle's recorded configuration with the schedule its own card's cross-validation used (where that
    differs from the checkpoint's: a shorter schedule, so the check fits the time), else the configuration itself."""
    from core.checkpoints import read_metadata
    from core.training.classify import config_from_json

    meta = read_metadata(bundle)
    if not meta.get("config"):
        raise ConfigError(f"{bundle}: its metadata records no training configuration, so its encoder cannot be "
                          "retrained in each cross-validation fold.")
    diffs = (meta.get("cross_validation") or {}).get("differs_from_checkpoint") or {}
    changes = {k: v["cross_validation"] for k, v in diffs.items() if isinstance(v, dict) and "cross_validation" in v}
    recipe = replace(config_from_json(meta["config"]), **changes, verbose=0, cv_folds=0, external=())
    what = ("the schedule of its card's cross-validation: " + ", ".join(f"{k} {v}" for k, v in sorted(
        changes.items())) if changes else "its checkpoint's configuration")
    return recipe, what


def _fold_key(recipe: TrainConfig, parts: dict) -> str:
    """What a fold's segmenter depends on: the recipe's training settings and the fold's train / val images."""
    import hashlib

    training = {k: v for k, v in config_json(recipe).items() if k not in RECIPE_NAMING}
    key = json.dumps({"recipe": training, **{s: [os.path.relpath(x.path, parts[s].root) for x in parts[s].samples]
                                             for s in ("train", "val")}}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def fold_segmenter(bundle: Path, parts: dict, folder: Path, fold: int) -> Path:
    """Train `bundle`'s segmenter recipe (`encoder_recipe`) on a cross-validation fold's "train" masks (early stopping
    on its "val" part) and write the whole segmenter (`.keras`, no optimizer) in `folder` -> that file. The file is
    named by the fold, the recipe and the fold's images, so a resumed cross-validation reuses it."""
    import keras

    recipe, _ = encoder_recipe(bundle)
    dest = Path(folder) / f"fold_{fold}_{_fold_key(recipe, parts)}.keras"
    if dest.is_file():
        log.info("CV fold %d: segmenter reused from %s", fold, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    set_seeds(recipe.seed)
    data = {s: load_seg_arrays(parts[s], recipe.input_size, recipe.clahe) for s in ("train", "val")}
    model, _, hist, _ = train_fold_model(recipe, data["train"], data["val"], parts)
    tmp = dest.with_name("partial-" + dest.name)
    export_model(model).save(tmp)
    os.replace(tmp, dest)
    keras.backend.clear_session()
    log.info("CV fold %d: %s's recipe retrained on %d training masks (%d epochs, %.0f s)", fold, bundle.name,
             len(parts["train"]), len(hist), time.time() - t0)
    return dest


def fold_encoder(bundle: Path, parts: dict, folder: Path, fold: int) -> Path:
    """The encoder of `fold_segmenter`'s model for this fold as a DenseNet121 trunk weights file in `folder` (what a
    classifier on the segmenter's encoder starts from) -> that file; reused when it is there."""
    import keras

    from core.models import save_encoder

    dest = Path(folder) / f"fold_{fold}_{_fold_key(encoder_recipe(bundle)[0], parts)}.weights.h5"
    if dest.is_file():
        log.info("CV fold %d: segmenter encoder reused from %s", fold, dest)
        return dest
    seg = keras.models.load_model(fold_segmenter(bundle, parts, folder, fold), compile=False)
    tmp = dest.with_name("partial-" + dest.name)
    save_encoder(seg, tmp)
    os.replace(tmp, dest)
    keras.backend.clear_session()
    return dest


def cross_validate_segmenter(cfg: TrainConfig, manifest: Manifest, work_dir: Optional[Path] = None) -> dict:
    """Group-wise K-fold CV of the recipe (StratifiedGroupKFold by class; a group-aware validation part per
    fold for early stopping and post-processing). Finished folds are kept in `work_dir` and resumed."""
    from core.segmentation import Segmenter

    groups = np.asarray(manifest.groups)
    quiet = TrainConfig(**{**config_json(cfg), "verbose": 0, "cv_folds": 0, "external": (),
                           "head_units": tuple(cfg.head_units), "split": tuple(cfg.split)})
    key = json.dumps({"config": config_json(quiet), "paths": [s.path for s in manifest.samples]}, sort_keys=True)
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        if (work_dir / "key.json").is_file() and (work_dir / "key.json").read_text() != key:
            log.warning("CV work folder %s holds folds of other settings or data: starting afresh", work_dir)
            for f in work_dir.glob("fold_*.json"):
                f.unlink()
        (work_dir / "key.json").write_text(key)
    folds, rows = [], []
    for f, parts, held in group_folds(cfg, manifest):
        saved = work_dir / f"fold_{f + 1}.json" if work_dir is not None else None
        if saved is not None and saved.is_file():
            done = json.loads(saved.read_text())
            log.info("CV fold %d/%d: resumed from %s", f + 1, cfg.cv_folds, saved)
        else:
            set_seeds(cfg.seed)
            t0 = time.time()
            data = {k: load_seg_arrays(v, cfg.input_size, cfg.clahe) for k, v in parts.items()}
            model, _, hist, _ = train_fold_model(quiet, data["train"], data["val"], parts)
            seg = Segmenter(model=model, input_size=cfg.input_size, clahe=cfg.clahe)
            vmaps, vtruth = _segment_split(seg, parts["val"], data["val"][0])
            post = choose_postprocessing(vmaps, vtruth)
            seg.threshold, seg.largest_region_only = post["threshold"], post["largest_region_only"]
            tmaps, ttruth = _segment_split(seg, parts["test"], data["test"][0])
            fold_rows = score_masks([seg.postprocess(m) for m in tmaps], ttruth, parts["test"])
            m = segmentation_metrics(fold_rows, manifest.class_names, n_boot=0)
            done = {"row": {"fold": f + 1, "n_train": len(parts["train"]), "n_val": len(parts["val"]),
                            "n_test": len(held), "epochs": len(hist), **post, "dice_mean": m["dice"]["mean"],
                            "iou_mean": m["iou"]["mean"], "seconds": round(time.time() - t0, 1)},
                    "rows": fold_rows}
            if saved is not None:
                tmp = saved.with_suffix(".tmp")
                tmp.write_text(json.dumps(done))
                os.replace(tmp, saved)
            import keras

            keras.backend.clear_session()
        log.info("CV fold %d/%d: Dice %.3f on %d held-out images", f + 1, cfg.cv_folds, done["row"]["dice_mean"],
                 done["row"]["n_test"])
        folds.append(done["row"])
        rows += [{**r, "fold": f + 1} for r in done["rows"]]
    pooled = segmentation_metrics(rows, manifest.class_names, seed=cfg.seed)
    return {"method": f"group-wise {cfg.cv_folds}-fold cross-validation over all {len(manifest)} images "
                      f"({len(set(groups.tolist()))} near-duplicate groups; stratified by class, shuffled with seed "
                      f"{cfg.seed}); per fold a group-aware validation part for early stopping and the threshold",
            "folds": folds, "pooled": pooled,
            "dice_fold_mean": float(np.mean([r["dice_mean"] for r in folds])),
            "seconds": round(sum(r["seconds"] for r in folds), 1), "rows": rows}


def _write_rows(path: Path, rows: Sequence[dict], split_of: Optional[str] = None) -> None:
    from core.checkpoints import write_csv

    def num(v, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    header = ["split", "fold", "path", "class", "group", "dice", "iou", "true_area", "pred_area", *SHAPE_COLUMNS]
    write_csv(path, header, [[r.get("split", split_of), r.get("fold", ""), r["path"], r["class"], r["group"],
                              num(r["dice"], ".4f"), num(r["iou"], ".4f"), f"{r['true_area']:.5f}",
                              f"{r['pred_area']:.5f}", r.get("pred_regions", ""),
                              *(num(r.get(c), ".4f") for c in SHAPE_COLUMNS[1:])] for r in rows])


def export_model(model):
    """A copy of `model` without optimizer or loss (Adam's two moments would triple the saved file)."""
    import keras

    out = keras.Model.from_config(model.get_config())  # the architecture alone: no compile state
    out.set_weights(model.get_weights())
    return out


def check_masks(manifest: Manifest) -> None:
    if not any(s.mask_paths for s in manifest.samples):
        raise DatasetError(f"No lesion masks found under {manifest.root}: segmentation needs `<image>_mask.png` "
                           "files beside the images (the BUSI layout).")


def train_segmenter(cfg: TrainConfig, argv: Optional[Sequence[str]] = None) -> Path:
    """Train a lesion segmenter from `cfg` and write its bundle to `cfg.out_dir/cfg.bundle_name`."""
    import keras
    import tensorflow as tf

    from core.checkpoints import write_bundle, write_json
    from core.models import sha256_file
    from core.segmentation import Segmenter

    t_start = time.time()
    check_inputs(cfg, segmentation=True)
    check_seg_choices(cfg)  # an unknown choice is refused before any image is decoded
    set_seeds(cfg.seed)
    manifest = load_manifest(cfg)
    check_masks(manifest)
    if cfg.split_file:
        splits = read_split(cfg.split_file, manifest.root, manifest.class_names, manifest.name)
    else:
        splits = split_manifest(manifest, cfg.split, cfg.seed)
    log.info("Segmentation data %s: %d images (%d with a lesion mask); split train %d, val %d, test %d",
             manifest.name, len(manifest), sum(bool(s.mask_paths) for s in manifest.samples),
             *(len(splits[s]) for s in ("train", "val", "test")))
    cv = None
    if cfg.cv_folds > 1:
        cv = cross_validate_segmenter(cfg, manifest, cv_work_dir(cfg))
        set_seeds(cfg.seed)
    data = {s: load_seg_arrays(splits[s], cfg.input_size, cfg.clahe) for s in ("train", "val", "test")}
    model, provenance, history, timing = train_fold_model(cfg, data["train"], data["val"], splits)
    seg = Segmenter(model=model, input_size=cfg.input_size, clahe=cfg.clahe)
    vmaps, vtruth = _segment_split(seg, splits["val"], data["val"][0])
    post = choose_postprocessing(vmaps, vtruth)
    seg.threshold, seg.largest_region_only = post["threshold"], post["largest_region_only"]
    rows, metrics = [], {}
    for s, (maps, truths) in (("val", (vmaps, vtruth)), ("test", _segment_split(seg, splits["test"], data["test"][0]))):
        r = score_masks([seg.postprocess(m) for m in maps], truths, splits[s])
        metrics[s] = segmentation_metrics(r, manifest.class_names, seed=cfg.seed)
        rows += [{**x, "split": s} for x in r]
    log.info("Post-processing chosen on validation: threshold %.2f, largest region only %s; test Dice %.3f "
             "(lesion images), IoU %.3f", post["threshold"], post["largest_region_only"],
             metrics["test"]["dice"]["mean"] or float("nan"), metrics["test"]["iou"]["mean"] or float("nan"))
    metadata = {
        "kind": "segmenter",
        **run_record(cfg.bundle_name, argv),
        "config": config_json(cfg),
        "dataset": {"kind": cfg.dataset, "root": str(manifest.root), "n_images": len(manifest),
                    "n_with_mask": sum(bool(s.mask_paths) for s in manifest.samples),
                    "class_counts": manifest.class_counts(), "citation": CITATIONS.get(cfg.dataset),
                    "masks": "union of every `_mask*` file of an image; images without one (normal) have an "
                             "empty mask"},
        "split": {"seed": cfg.seed, "fractions": list(cfg.split), "group_aware": True, "file": "split.csv",
                  "reused_from": cfg.split_file, "counts": {s: len(splits[s]) for s in ("train", "val", "test")}},
        "class_names": list(manifest.class_names),
        "input_size": cfg.input_size,
        "backbone": "densenet121",
        "architecture": SEG_DECODERS[cfg.seg_decoder],
        "loss": SEG_DICE[cfg.seg_dice],
        **({"deep_supervision": f"training only: a 1x1-convolution sigmoid map on each of decoder steps "
                                f"{', '.join(map(str, DEEP_SUPERVISION_STEPS))} (upsampled to the input side) trained "
                                f"on the same loss against the full-size mask, weighted {cfg.deep_supervision} each; "
                                "early stopping on the lesion map's own validation loss; the checkpoint is the "
                                "single-output U-Net"} if cfg.deep_supervision > 0 else {}),
        **({"image_class_head": f"training only: the encoder's last feature map averaged, dropout "
                                f"{CLASS_HEAD_DROPOUT} and a softmax over the {len(manifest.class_names)} image "
                                f"classes, its cross-entropy weighted {cfg.seg_classify} beside the lesion map's "
                                "loss; early stopping on the lesion map's own validation loss; the checkpoint is the "
                                "single-output U-Net"}
           if cfg.seg_classify > 0 else {}),
        **({"weight_averaging": f"exponential moving average of the weights, momentum {cfg.ema} per step; "
                                "validated, early-stopped and saved on the average"} if cfg.ema > 0 else {}),
        **({"elastic_deformation": f"training only: keras.layers.RandomElasticTransform with scale {cfg.elastic} "
                                   "(at 0.5 a mean displacement of 1.6% of the image side, 95th percentile 4%) on "
                                   "about half the training images, image and mask alike"} if cfg.elastic > 0 else {}),
        "weights": provenance,
        "preprocessing": {"decoder": "core.preprocessing.load_image", "resize": "to the square input; the "
                          "probability map is resized back to the image (bilinear)", "clahe": cfg.clahe,
                          "input_range": "RGB 0-255"},
        "postprocessing": post,
        "training": {"epochs": len(history), "phases": timing["phases"], "precision": timing["precision"],
                     "wall_seconds": None, "platform": platform.platform(), "tensorflow": tf.__version__,
                     "keras": keras.__version__},
        "metrics": metrics,
    }
    if cv is not None:
        cv_rows = cv.pop("rows")
        metadata["cross_validation"] = cv
    hist_keys = sorted({k for row in history for k in row} - {"epoch", "phase"})

    def fill(tmp: Path) -> None:
        from core.checkpoints import write_csv

        export_model(model).save(tmp / "model.keras")
        metadata["model_sha256"] = sha256_file(tmp / "model.keras")
        metadata["training"]["wall_seconds"] = round(time.time() - t_start, 1)
        write_csv(tmp / "history.csv", ["epoch", "phase", *hist_keys],
                  [[r["epoch"], r["phase"], *[r.get(k, "") for k in hist_keys]] for r in history])
        _write_rows(tmp / "predictions.csv", rows)
        if cv is not None:
            _write_rows(tmp / "cv_predictions.csv", cv_rows, "cv")
        write_split(splits, tmp / "split.csv")
        write_json(tmp / "metadata.json", metadata)

    dest = write_bundle(Path(cfg.out_dir) / cfg.bundle_name, fill)
    shutil.rmtree(cv_work_dir(cfg), ignore_errors=True)
    log.info("Wrote %s in %.1f min", dest, (time.time() - t_start) / 60)
    return dest


def add_segmenter_cross_validation(cfg: TrainConfig, argv: Optional[Sequence[str]] = None) -> Path:
    """Cross-validate `cfg` and record it in the existing segmenter bundle (model and test metrics unchanged)."""
    from core.checkpoints import read_metadata, update_metadata

    check_seg_choices(cfg)  # as in train_segmenter: an unknown decoder would otherwise build the plain U-Net
    bundle = Path(cfg.out_dir) / cfg.bundle_name
    if not (bundle / "metadata.json").is_file():
        raise DatasetError(f"No segmenter at {bundle} to add cross-validation to.")
    meta = read_metadata(bundle)
    set_seeds(cfg.seed)
    manifest = load_manifest(cfg)
    check_masks(manifest)
    cv = cross_validate_segmenter(cfg, manifest, cv_work_dir(cfg))
    rows = cv.pop("rows")
    cv["command"] = " ".join(["python", "train.py", *map(quote_arg, argv)]) if argv is not None else None
    cv["git_commit"] = git_commit()
    cv["differs_from_checkpoint"] = config_differences(meta.get("config", {}), cfg)
    dest = update_metadata(bundle, {"cross_validation": cv},
                           files={"cv_predictions.csv": lambda p: _write_rows(p, rows, "cv")})
    shutil.rmtree(cv_work_dir(cfg), ignore_errors=True)
    log.info("Segmenter cross-validation added to %s: pooled Dice %.3f", dest, cv["pooled"]["dice"]["mean"])
    return dest
