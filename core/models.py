"""Model zoo: ImageNet backbones and the seeds' small CNN, each as ONE flat functional graph.

Every model takes float32 RGB in 0-255 of shape (S, S, 3); backbone-specific normalisation happens
inside the graph (`BackbonePreprocess`), so explainers and Grad-CAM work on raw pixels.
Layer naming convention: `preprocess` (normalisation), backbone layers (Keras names), `head_*`; a classifier on a
lesion segmenter (`pooling="lesion"`) also holds the segmenter's `seg_*` decoder and `lesion_pool`.
"""
from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import keras
import numpy as np
from keras import layers

from core.errors import WeightsUnavailableError
from core.checkpoints import sha256_file  # also re-exported: training records model hashes

BACKBONES = ("resnet50", "densenet121", "efficientnetb0", "mobilenetv2", "simple_cnn")
_APPS = {
    "resnet50": ("ResNet50", "caffe"),
    "densenet121": ("DenseNet121", "torch"),
    "efficientnetb0": ("EfficientNetB0", "raw"),  # EfficientNet normalises inside its own graph
    "mobilenetv2": ("MobileNetV2", "tf"),
}
HEAD_PREFIX = "head_"
OUTPUT_NAME = "head_predictions"


@dataclass(frozen=True)
class ModelConfig:
    """What to build. Defaults follow the seeds: dropout 0.5, L2 0.01, Dense 256/128/64 head."""

    backbone: str = "densenet121"
    num_classes: int = 2
    input_size: int = 224
    pooling: str = "avg"  # "avg" (GAP), "flatten" or "lesion" (LesionPool: needs a segmenter as `weights`)
    head_units: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.5
    l2: float = 0.01
    weights: str = "none"  # "imagenet", "none", a path to a Keras weights file of the trunk, or a segmenter bundle
    stain_targets: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None  # (OD mean, OD std): StainStandardise
    trunk_layer: Optional[str] = None  # cut the backbone at this layer (e.g. DenseNet121 "pool3_relu"); None: whole
    scales: tuple[int, ...] = ()  # extra sides: the trunk (same weights) also sees the input resized to each


@keras.saving.register_keras_serializable(package="breastxai")
class BackbonePreprocess(layers.Layer):
    """Per-backbone normalisation of 0-255 RGB inputs (Keras `preprocess_input` modes, in-graph).

    mode: 'caffe' (RGB->BGR, minus ImageNet mean), 'torch' (/255, ImageNet mean/std), 'tf' ([-1, 1]),
    'unit' ([0, 1]) or 'raw' (identity).
    """

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)
    CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

    def __init__(self, mode: str = "raw", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "torch", "tf", "unit", "raw"):
            raise ValueError(f"Unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, x):
        ops = keras.ops
        if self.mode == "caffe":
            x = x[..., ::-1]
            return x - ops.convert_to_tensor(self.CAFFE_MEAN_BGR, dtype=x.dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(self.MEAN, dtype=x.dtype)
            std = ops.convert_to_tensor(self.STD, dtype=x.dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "unit":
            return x / 255.0
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="breastxai")
class StainStandardise(layers.Layer):
    """Per-image colour standardisation of 0-255 RGB, in-graph (a Reinhard-style normalisation in optical
    density): each image's per-channel optical-density mean and spread are mapped to fixed targets, removing
    differences in stain strength and colour cast between labs, scanners and patients. Output: 0-255 RGB.

    target_mean, target_std: per-channel OD statistics (3,) the images are mapped to (from the training set).
    """

    def __init__(self, target_mean=(0.5, 0.6, 0.4), target_std=(0.3, 0.3, 0.25), **kwargs):
        super().__init__(**kwargs)
        self.target_mean = tuple(float(v) for v in target_mean)
        self.target_std = tuple(float(v) for v in target_std)

    def call(self, x):
        ops = keras.ops
        od = -ops.log((ops.clip(x, 0.0, 255.0) + 1.0) / 256.0)
        mean = ops.mean(od, axis=(1, 2), keepdims=True)
        std = ops.sqrt(ops.var(od, axis=(1, 2), keepdims=True) + 1e-4)
        tm = ops.convert_to_tensor(self.target_mean, dtype=x.dtype)
        ts = ops.convert_to_tensor(self.target_std, dtype=x.dtype)
        od = ops.clip((od - mean) / std * ts + tm, 0.0, 5.545)  # 5.545 = log(256): black
        return ops.clip(256.0 * ops.exp(-od) - 1.0, 0.0, 255.0)

    def get_config(self):
        return {**super().get_config(), "target_mean": self.target_mean, "target_std": self.target_std}


@keras.saving.register_keras_serializable(package="breastxai")
class LesionPool(layers.Layer):
    """Pool a feature map over the predicted lesion: inputs [features (N, h, w, c), lesion map (N, S, S, 1) in 0-1],
    S a multiple of h and w -> (N, c), the features' mean weighted by the map's mean over each feature cell.

    Where the map holds almost nothing (its cells sum below `min_share` of the cells: no lesion found, e.g. a normal
    scan), the plain mean over the whole map is taken instead. `feature_layer` names the layer whose map is pooled
    (Grad-CAM's default target in a model with this layer).
    """

    def __init__(self, feature_layer: str = "", min_share: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.feature_layer = str(feature_layer)
        self.min_share = float(min_share)

    def call(self, inputs):
        ops = keras.ops
        feats, lesion = inputs
        h, w = feats.shape[1], feats.shape[2]
        side_h, side_w = lesion.shape[1] // h, lesion.shape[2] // w
        cells = ops.average_pool(ops.cast(lesion, feats.dtype), (side_h, side_w), strides=(side_h, side_w),
                                 padding="valid")  # (N, h, w, 1): the lesion's share of each feature cell
        total = ops.sum(cells, axis=(1, 2), keepdims=True)
        found = ops.cast(total >= self.min_share * h * w, feats.dtype)
        weights = found * cells / ops.maximum(total, 1e-6) + (1.0 - found) / float(h * w)
        return ops.sum(feats * weights, axis=(1, 2))

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], input_shape[0][-1])

    def get_config(self):
        return {**super().get_config(), "feature_layer": self.feature_layer, "min_share": self.min_share}


def stain_targets(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Median per-channel optical-density mean and std over uint8 RGB images (N, H, W, 3): StainStandardise's
    targets, taken from the training images."""
    od = -np.log((np.asarray(images, np.float32) + 1.0) / 256.0)
    means = od.mean(axis=(1, 2))
    stds = od.std(axis=(1, 2))
    return tuple(map(float, np.median(means, 0))), tuple(map(float, np.median(stds, 0)))


def _online(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_imagenet_file(backbone: str) -> Optional[Path]:
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    key = {"resnet50": "resnet50", "densenet121": "densenet121", "efficientnetb0": "efficientnetb0",
           "mobilenetv2": "mobilenet_v2"}[backbone]
    hits = sorted(cache.glob(f"{key}*notop*.h5")) if cache.is_dir() else []
    return hits[0] if hits else None


def _simple_cnn(x):
    """The seeds' baseline: three Conv(3x3, ReLU) + MaxPool blocks with 16/32/64 filters."""
    for i, filters in enumerate((16, 32, 64), start=1):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = layers.MaxPooling2D(name=f"pool{i}")(x)
    return x


def weights_file(weights: str) -> Path:
    """The trunk weights file `weights` names; WeightsUnavailableError, saying what to pass instead, if it is not
    there."""
    path = Path(weights)
    if not path.is_file():
        raise WeightsUnavailableError(f"Weights file not found: {path}. Use --weights imagenet "
                                      "(online), none, a path to an existing .weights.h5 file, or a lesion segmenter "
                                      "bundle (its encoder).")
    return path


def segmenter_bundle(weights: str) -> Optional[Path]:
    """The lesion segmenter bundle `weights` names (a folder whose metadata.json has kind "segmenter"), else None."""
    from core.checkpoints import bundle_kind

    path = Path(weights)
    return path if (path / "metadata.json").is_file() and bundle_kind(path) == "segmenter" else None


def encoder_weights(seg: keras.Model, trunk: Optional[keras.Model] = None) -> tuple[list[np.ndarray], ...]:
    """A DenseNet121 U-Net's encoder weights, in the order of `trunk`'s weighted layers (a fresh DenseNet121 trunk if
    None; matched by name); WeightsUnavailableError if `seg` lacks one of them."""
    ref = trunk if trunk is not None else keras.applications.DenseNet121(include_top=False, weights=None)
    try:
        return tuple([np.asarray(w) for w in seg.get_layer(l.name).get_weights()] for l in ref.layers if l.weights)
    except ValueError as exc:
        raise WeightsUnavailableError(f"{seg.name} has no DenseNet121 encoder layer {exc}") from exc


def save_encoder(seg: keras.Model, path: Path) -> Path:
    """Write a U-Net's DenseNet121 encoder as a trunk weights file (`*.weights.h5`, what `--weights PATH` reads)."""
    trunk = keras.applications.DenseNet121(include_top=False, weights=None)
    _copy_weights(encoder_weights(seg, trunk), trunk)
    trunk.save_weights(str(path))
    return Path(path)


def _encoder_weights(backbone: str, bundle: Path) -> tuple[tuple[list[np.ndarray], ...], dict]:
    """A segmenter bundle's DenseNet121 encoder weights (verified bundle, Keras safe mode; see `encoder_weights`)
    and the bundle's metadata."""
    from core.checkpoints import load_segmenter

    if backbone != "densenet121":
        raise WeightsUnavailableError(f"A lesion segmenter's encoder is a DenseNet121 trunk: use --backbone "
                                      f"densenet121 with --weights {bundle}, not {backbone}.")
    seg_bundle = load_segmenter(bundle, backend="keras")
    try:
        return encoder_weights(seg_bundle.keras_model()), seg_bundle.metadata
    except WeightsUnavailableError as exc:
        raise WeightsUnavailableError(f"{bundle.name}: {exc}") from exc


def _segmenter_provenance(source: str, bundle: Path, meta: dict) -> dict:
    """Weights provenance of a classifier started from a segmenter bundle (`source`: "segmenter encoder" or, with
    lesion pooling, "segmenter"): the bundle, its model hash and the command that retrains it."""
    return {"source": source, "path": str(bundle), "sha256": meta.get("model_sha256"), "segmenter": bundle.name,
            "segmenter_command": meta.get("command"), "segmenter_argv": meta.get("argv"),
            "segmenter_weights": meta.get("weights")}


def build_model(cfg: ModelConfig) -> tuple[keras.Model, dict]:
    """Build the flat classifier; returns (model, weights provenance dict).

    Raises WeightsUnavailableError if ImageNet weights are requested offline, naming the alternatives.
    """
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"Unknown backbone {cfg.backbone!r}; choose one of {', '.join(BACKBONES)}.")
    if cfg.pooling not in ("avg", "flatten", "lesion"):
        raise ValueError("pooling must be 'avg', 'flatten' or 'lesion'")
    if cfg.pooling == "lesion":
        return _lesion_model(cfg)
    if cfg.trunk_layer and cfg.backbone == "simple_cnn":
        raise ValueError("--trunk-layer cuts an ImageNet backbone; the simple CNN has no trunk to cut.")
    size = (cfg.input_size, cfg.input_size, 3)
    provenance = {"source": "none", "path": None, "sha256": None}
    ref = None
    if cfg.backbone != "simple_cnn" and cfg.weights != "none":
        if cfg.weights == "imagenet":
            cached = _cached_imagenet_file(cfg.backbone)
            if cached is None and not _online():
                raise WeightsUnavailableError(
                    f"ImageNet weights for {cfg.backbone} must be downloaded by Keras, and there is no network "
                    "here. Offline alternatives: --weights PATH to a Keras weights file of the trunk (e.g. "
                    "../shared/weights/densenet121_imagenet_notop.weights.h5 for densenet121), or "
                    "--weights none to train from scratch.")
            ref = _trunk_weights(cfg.backbone, "imagenet", None)
            cached = _cached_imagenet_file(cfg.backbone)
            provenance = {"source": "imagenet (keras.applications download)",
                          "path": str(cached) if cached else None,
                          "sha256": _file_sha256(str(cached), _stamp(cached)) if cached else None}
        elif segmenter_bundle(cfg.weights) is not None:
            bundle = Path(cfg.weights)
            ref, seg_meta = _encoder_weights(cfg.backbone, bundle)
            provenance = _segmenter_provenance("segmenter encoder", bundle, seg_meta)
        else:
            path = weights_file(cfg.weights)
            stamp = _stamp(path)
            ref = _trunk_weights(cfg.backbone, str(path), stamp)
            provenance = {"source": "file", "path": str(path), "sha256": _file_sha256(str(path), stamp)}

    inp = keras.Input(size, name="image")
    x0 = inp if cfg.stain_targets is None else StainStandardise(*cfg.stain_targets, name="stain_standardise")(inp)
    if cfg.backbone == "simple_cnn":
        x = BackbonePreprocess("unit", name="preprocess")(x0)
        features = _simple_cnn(x)
    else:
        app_name, mode = _APPS[cfg.backbone]
        x = BackbonePreprocess(mode, name="preprocess")(x0)
        base = getattr(keras.applications, app_name)(include_top=False, weights=None, input_tensor=x)
        if ref is not None:
            _copy_weights(ref, base)
        features = base.output
        if cfg.trunk_layer:
            names = [l.name for l in base.layers]
            if cfg.trunk_layer not in names:
                raise ValueError(f"{cfg.backbone} has no layer {cfg.trunk_layer!r} to cut the trunk at; "
                                 f"DenseNet121's block ends are pool2_relu, pool3_relu, pool4_relu and relu.")
            features = base.get_layer(cfg.trunk_layer).output
            if len(features.shape) != 4:
                raise ValueError(f"--trunk-layer {cfg.trunk_layer!r} is not a feature map (shape {features.shape}).")

    if cfg.pooling == "avg":
        h = layers.GlobalAveragePooling2D(name=HEAD_PREFIX + "pool")(features)
    else:
        h = layers.Flatten(name=HEAD_PREFIX + "flatten")(features)
    if cfg.scales:
        h = _multi_scale(cfg, inp, features, h)
    model = keras.Model(inp, _head(cfg, h), name=f"breastxai_{cfg.backbone}")
    return model, provenance


def _head(cfg: ModelConfig, pooled):
    """The classifier head on pooled features (N, F): BatchNorm, `cfg.head_units` Dense ReLU layers with dropout,
    softmax over `cfg.num_classes` (float32) -> the output tensor."""
    reg = keras.regularizers.l2(cfg.l2) if cfg.l2 > 0 else None
    h = layers.BatchNormalization(name=HEAD_PREFIX + "bn")(pooled)
    for i, units in enumerate(cfg.head_units, start=1):
        h = layers.Dense(units, activation="relu", kernel_regularizer=reg, name=f"{HEAD_PREFIX}dense{i}")(h)
        if cfg.dropout > 0:
            h = layers.Dropout(cfg.dropout, name=f"{HEAD_PREFIX}dropout{i}")(h)
    return layers.Dense(cfg.num_classes, activation="softmax", dtype="float32", name=OUTPUT_NAME)(h)


#: The layer that pools a lesion classifier's features over the segmenter's predicted lesion (`LesionPool`).
LESION_POOL_NAME = "lesion_pool"


def _lesion_model(cfg: ModelConfig) -> tuple[keras.Model, dict]:
    """A classifier on a lesion segmenter: the whole U-Net (frozen weights from `cfg.weights`, a segmenter bundle
    or, in a cross-validation fold, a segmenter `.keras` file) runs on the image; its encoder's `cfg.trunk_layer`
    map is pooled over the predicted lesion (`LesionPool`) and the head classifies that. One flat graph whose
    input is the segmenter's (0-255 RGB, `cfg.input_size`)."""
    from core.checkpoints import CheckpointError, load_segmenter

    problems = [msg for bad, msg in (
        (cfg.backbone != "densenet121", "--backbone densenet121 (the segmenter's encoder)"),
        (not cfg.trunk_layer, "--trunk-layer: the encoder map to pool, e.g. pool3_relu"),
        (bool(cfg.scales), "no --scales"),
        (cfg.stain_targets is not None, "no --stain-standardise"),
    ) if bad]
    if problems:
        raise ValueError("Lesion pooling (--pooling lesion) needs " + "; ".join(problems) + ".")
    path = Path(cfg.weights)
    if segmenter_bundle(cfg.weights) is not None:
        seg = load_segmenter(path, backend="keras")
        model, provenance = seg.keras_model(), _segmenter_provenance("segmenter", path, seg.metadata)
    elif path.is_file() and path.suffix == ".keras":
        try:
            model = keras.models.load_model(path, compile=False, safe_mode=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error for the user
            raise CheckpointError(f"{path}: not a readable segmenter model ({exc})") from exc
        provenance = {"source": "segmenter model file", "path": str(path), "sha256": sha256_file(path)}
    else:
        raise WeightsUnavailableError(f"Lesion pooling (--pooling lesion) takes its segmenter from --weights: a "
                                      f"lesion segmenter bundle (train.py --task segmentation), not {cfg.weights}.")
    if model.output.shape[-1] != 1 or len(model.output.shape) != 4:
        raise WeightsUnavailableError(f"{path.name} is not a lesion segmenter (output {model.output.shape}).")
    if model.input.shape[1] != cfg.input_size:
        raise ValueError(f"The segmenter {path.name} takes {model.input.shape[1]} px images: use --input-size "
                         f"{model.input.shape[1]}, not {cfg.input_size}.")
    names = [l.name for l in model.layers]
    if cfg.trunk_layer not in names or cfg.trunk_layer.startswith(SEG_PREFIX):
        raise ValueError(f"The segmenter's encoder has no layer {cfg.trunk_layer!r} to pool; DenseNet121's block "
                         "ends are pool2_relu, pool3_relu, pool4_relu and relu.")
    features = model.get_layer(cfg.trunk_layer).output
    pooled = LesionPool(cfg.trunk_layer, name=LESION_POOL_NAME)([features, model.output])
    return keras.Model(model.input, _head(cfg, pooled), name="breastxai_lesion_densenet121"), provenance


def _multi_scale(cfg: ModelConfig, inp, features, pooled):
    """Run the same trunk layers again on the input resized to each side in `cfg.scales` (shared weights, one
    flat graph: every trunk layer has one call per scale, the full-size call first) and concatenate the pooled
    features of every scale: (N, F * (1 + len(scales)))."""
    if cfg.pooling != "avg":
        raise ValueError("Extra scales need global average pooling (feature maps differ in size).")
    bad = [s for s in cfg.scales if not 32 <= s < cfg.input_size]
    if bad or len(set(cfg.scales)) != len(cfg.scales):
        raise ValueError(f"Extra scales must be distinct sides from 32 px up to below the input size "
                         f"{cfg.input_size}; got {list(cfg.scales)}.")
    trunk = keras.Model(inp, features)
    out = [pooled]
    for side in cfg.scales:
        small = layers.Resizing(side, side, interpolation="bilinear", name=f"scale_{side}")(inp)
        # Re-call every trunk layer on the resized tensor (Keras' own graph walk; no nested model, no copy).
        f = trunk._run_through_graph([small], operation_fn=lambda op: op)
        out.append(layers.GlobalAveragePooling2D(name=f"{HEAD_PREFIX}pool_{side}")(f))
    return layers.Concatenate(name=HEAD_PREFIX + "concat")(out)


ENSEMBLE_NAME = "breastxai_ensemble"


def member_prefix(i: int) -> str:
    """Layer-name prefix of ensemble member i (1-based) inside `build_ensemble`'s flat graph."""
    return f"m{i}_"


def member_layer_name(name: str) -> str:
    """A layer's name inside its member model: `name` without `member_prefix` (other names unchanged)."""
    import re

    return re.sub(r"^m\d+_", "", name)


def ensemble_layer(model: keras.Model, member: int, name: str) -> str:
    """The layer of `build_ensemble`'s model that computes member `member`'s (1-based) layer `name`: its own copy,
    or, where that call was shared, the earlier member's copy that computes it."""
    names = {l.name for l in model.layers}
    for i in range(member, 0, -1):
        if member_prefix(i) + name in names:
            return member_prefix(i) + name
    raise ValueError(f"The ensemble has no layer computing member {member}'s {name!r}.")


def build_ensemble(members: "list[keras.Model]", input_size: int) -> keras.Model:
    """One flat classifier from trained classifiers of the same classes: their logits averaged.

    Each member's layers are copied (renamed `m1_...`, `m2_...`, weights copied, shared layers stay shared) and
    run on the input, resized in-graph to the member's own side where it differs. A layer call that repeats an
    earlier member's exactly (same kind, settings and weights, same inputs: e.g. the frozen ImageNet blocks two
    DenseNet121 members start with) is computed once and shared. The members' penultimate features are
    concatenated (`head_concat`, also the out-of-distribution features) and one Dense layer holds every member's
    output kernel and bias divided by the number of members, so its logits are the mean of the members' logits
    and the ensemble stays a model with one linear output (Grad-CAM and integrated gradients see the ensemble's
    score). members: Keras classifiers whose last layer is a softmax Dense; input_size: the ensemble's side S.
    Returns float32 (N, S, S, 3) in 0-255 -> softmax (N, K).
    """
    import hashlib
    import json

    if len(members) < 2:
        raise ValueError("An ensemble needs at least two member models.")
    k = {int(m.output_shape[-1]) for m in members}
    if len(k) != 1:
        raise ValueError(f"Ensemble members predict different numbers of classes: {sorted(k)}.")
    inp = keras.Input((input_size, input_size, 3), name="image")
    features, kernels, biases, used = [], [], [], []
    original: dict = {}  # id(copy) -> the member's layer it copies
    done: dict = {}  # (layer kind, settings, weights digest, inputs) -> output of the call computed first

    def signature(layer) -> str:
        config = {k2: v for k2, v in layer.get_config().items() if k2 != "name"}
        digest = hashlib.sha256()
        for w in layer.get_weights():
            digest.update(np.ascontiguousarray(w).tobytes())
        return json.dumps([type(layer).__name__, config, digest.hexdigest()], sort_keys=True, default=str)

    def call(op, *args, **kwargs):
        key = (signature(original[id(op)]),
               repr([id(t) if isinstance(t, keras.KerasTensor) else repr(t) for t in keras.tree.flatten(args)]),
               repr(sorted(kwargs.items())))
        if key not in done:
            done[key] = op(*args, **kwargs)
            used.append(op)
        return done[key]

    for i, member in enumerate(members, start=1):
        final = member.layers[-1]
        if not isinstance(final, layers.Dense):
            raise ValueError(f"Member {i} does not end in a Dense output layer.")
        side = int(member.input_shape[1])
        x = inp if side == input_size else layers.Resizing(side, side, interpolation="bilinear",
                                                             name=f"{member_prefix(i)}resize")(inp)
        made: dict = {}

        def copy(layer, i=i, made=made):
            if id(layer) not in made:
                made[id(layer)] = layer.__class__.from_config({**layer.get_config(),
                                                               "name": member_prefix(i) + layer.name})
                original[id(made[id(layer)])] = layer
            return made[id(layer)]

        trunk = keras.Model(member.inputs, final.input)
        # Keras' own graph walk, as _multi_scale: every layer copied once, every call memoised by `call`.
        features.append(trunk._run_through_graph([x], operation_fn=copy, call_fn=call))
        kernels.append(np.asarray(final.kernel) / len(members))
        biases.append(np.asarray(final.bias) / len(members))
    h = layers.Concatenate(name=HEAD_PREFIX + "concat")(features)
    out = layers.Dense(k.pop(), activation="softmax", dtype="float32", name=OUTPUT_NAME)(h)
    model = keras.Model(inp, out, name=ENSEMBLE_NAME)
    for dst in dict.fromkeys(used):  # each copy that runs, once
        dst.set_weights(original[id(dst)].get_weights())
    model.get_layer(OUTPUT_NAME).set_weights([np.concatenate(kernels, axis=0), np.sum(biases, axis=0)])
    return model


@functools.lru_cache(maxsize=2)
def _trunk_weights(backbone: str, source: str, stamp: Optional[tuple[int, int]]) -> tuple[list[np.ndarray], ...]:
    """Each weighted layer's arrays of `backbone`'s trunk (include_top=False, any input size: the arrays do not
    depend on it) from `source`: "imagenet" (Keras download) or a weights file path whose (mtime_ns, size) is
    `stamp`. Cached per process: a cross-validated run builds the network once per fold, and building the
    reference trunk and reading the file cost seconds each time (a rewritten file has a new stamp)."""
    app = getattr(keras.applications, _APPS[backbone][0])
    if source == "imagenet":
        try:
            ref = app(include_top=False, weights="imagenet")
        except Exception as exc:  # network errors surface as many types
            raise WeightsUnavailableError(
                f"Could not download ImageNet weights for {backbone} ({exc}). Use --weights PATH "
                "or --weights none.") from exc
    else:
        ref = app(include_top=False, weights=None)
        try:
            ref.load_weights(source)
        except Exception as exc:
            raise WeightsUnavailableError(f"{source} does not fit a {backbone} trunk: {exc}") from exc
    return tuple([np.asarray(w) for w in l.get_weights()] for l in ref.layers if l.weights)


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, stamp: tuple[int, int]) -> str:
    """sha256 of the file at `path` whose (mtime_ns, size) is `stamp`: once per process and file version (a weights
    file is read for every network built, one per cross-validation fold; a DenseNet121 trunk is 32 MB)."""
    return sha256_file(path)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def _copy_weights(src: tuple[list[np.ndarray], ...], dst: keras.Model) -> None:
    """Set `dst`'s weighted layers, in order, to `src` (from `_trunk_weights`)."""
    b = [l for l in dst.layers if l.weights]
    if len(src) != len(b):
        raise WeightsUnavailableError(f"Weight layout mismatch ({len(src)} vs {len(b)} layers with weights).")
    for wa, lb in zip(src, b):
        lb.set_weights(wa)


def backbone_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Layers between the input normalisation and the head, in graph order."""
    return [l for l in model.layers
            if not isinstance(l, keras.layers.InputLayer) and l.name != "preprocess"
            and not l.name.startswith(HEAD_PREFIX)]


def set_trainable(model: keras.Model, fine_tune_layers: int) -> int:
    """Freeze the backbone, then unfreeze its last `fine_tune_layers` layers (-1: all).

    BatchNormalization layers stay frozen (inference mode), as in Keras' transfer-learning guide.
    The head is always trainable. Returns how many backbone layers are trainable.
    """
    bb = backbone_layers(model)
    for layer in model.layers:
        layer.trainable = layer.name.startswith(HEAD_PREFIX)
    chosen = bb if fine_tune_layers < 0 else (bb[-fine_tune_layers:] if fine_tune_layers else [])
    n = 0
    for layer in chosen:
        if isinstance(layer, keras.layers.BatchNormalization):
            continue
        layer.trainable = True
        n += 1
    return n


def last_conv_layer(model: keras.Model) -> str:
    """Name of the last backbone layer with a 4-D (N, h, w, c) output: Grad-CAM's default target (in a model that
    pools over a predicted lesion, the pooled encoder map, not the segmenter's decoder)."""
    pool = next((l for l in model.layers if isinstance(l, LesionPool)), None)
    if pool is not None:
        return pool.feature_layer
    for layer in reversed(backbone_layers(model)):
        shape = getattr(layer.output, "shape", None)
        if shape is not None and len(shape) == 4:
            return layer.name
    raise ValueError("The model has no convolutional feature map")


def cut_point(model: keras.Model, first_trainable: str) -> Optional[str]:
    """Latest layer at or before `first_trainable` whose single output alone determines the model output.

    Everything before it is frozen, so its activations can be cached; returns None if none works.
    """
    names = [l.name for l in model.layers]
    start = names.index(first_trainable) - 1
    for i in range(start, 0, -1):
        layer = model.layers[i]
        if isinstance(layer, keras.layers.InputLayer):
            return None
        try:
            keras.Model(layer.output, model.output)
        except (ValueError, AttributeError):
            continue
        return layer.name
    return None


# --------------------------------------------------------------------------------------- segmentation
SEG_PREFIX = "seg_"
SEG_OUTPUT_NAME = "seg_mask"
#: Encoder feature maps the U-Net decoder joins, deepest first (Keras DenseNet121 layer names):
#: 7x7x1024, 14x14x1024, 28x28x512, 56x56x256 and 112x112x64 at a 224 px input.
DENSENET121_SKIPS = ("relu", "pool4_relu", "pool3_relu", "pool2_relu", "conv1_relu")
#: The segmenter's input side must divide by this: its encoder halves the image five times.
SEGMENTER_MULTIPLE = 32


@dataclass(frozen=True)
class SegmenterConfig:
    """A U-Net on an ImageNet DenseNet121 encoder: `decoder_filters` per upsampling step (deepest first)."""

    input_size: int = 224
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    weights: str = "none"  # "imagenet", "none" or a path to a DenseNet121 trunk weights file
    dropout: float = 0.0  # spatial dropout on the bottleneck
    attention: bool = False  # gate each skip connection by the decoder (Attention U-Net, Oktay et al. 2018)


def attention_gate(skip, gate, channels: int, prefix: str):
    """Additive attention gate (Oktay et al. 2018): `skip` (N, H, W, C) times alpha (N, H, W, 1) in 0-1, where
    alpha = sigmoid(psi(ReLU(theta(skip) + phi(gate)))), theta / phi 1x1 convolutions to `channels`, psi a 1x1
    convolution to one channel; `gate` is the decoder map at the skip's resolution."""
    theta = layers.Conv2D(channels, 1, use_bias=False, name=prefix + "skip")(skip)
    phi = layers.Conv2D(channels, 1, name=prefix + "decoder")(gate)
    a = layers.ReLU(name=prefix + "relu")(layers.Add(name=prefix + "add")([theta, phi]))
    alpha = layers.Conv2D(1, 1, activation="sigmoid", name=prefix + "alpha")(a)
    return layers.Multiply(name=prefix + "apply")([skip, alpha])


def build_segmenter(cfg: SegmenterConfig) -> tuple[keras.Model, dict]:
    """U-Net-style lesion segmenter -> (model, weights provenance).

    Input float32 RGB 0-255 (S, S, 3), S divisible by 32; output float32 lesion probability (S, S, 1).
    Encoder layers keep their Keras names (so `set_trainable`-style freezing and the trunk weights file
    apply); decoder layers are named `seg_*`. Each decoder step: 2x bilinear upsampling, concatenation
    with the encoder map of that scale, two 3x3 conv + BatchNorm + ReLU. With `cfg.attention` the encoder map
    is first multiplied by an additive attention gate (Oktay et al. 2018): sigmoid(1x1 conv(ReLU(1x1 conv(skip)
    + 1x1 conv(upsampled decoder map)))), one weight in 0-1 per pixel, so the decoder can mute skip features
    away from the lesion.
    """
    if cfg.input_size % SEGMENTER_MULTIPLE:
        raise ValueError(f"The segmenter's input size must be a multiple of {SEGMENTER_MULTIPLE}, "
                         f"not {cfg.input_size}.")
    if len(cfg.decoder_filters) != len(DENSENET121_SKIPS):
        raise ValueError(f"decoder_filters needs {len(DENSENET121_SKIPS)} entries, one per upsampling step.")
    trunk, provenance = build_model(ModelConfig(backbone="densenet121", num_classes=2, input_size=cfg.input_size,
                                                head_units=(), dropout=0.0, l2=0.0, weights=cfg.weights))
    skips = [trunk.get_layer(n).output for n in DENSENET121_SKIPS]
    x = skips[0]
    if cfg.dropout > 0:
        x = layers.SpatialDropout2D(cfg.dropout, name=SEG_PREFIX + "dropout")(x)
    for i, filters in enumerate(cfg.decoder_filters):
        x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{SEG_PREFIX}up{i + 1}")(x)
        if i + 1 < len(skips):
            skip = attention_gate(skips[i + 1], x, max(filters // 2, 8), f"{SEG_PREFIX}gate{i + 1}_") \
                if cfg.attention else skips[i + 1]
            x = layers.Concatenate(name=f"{SEG_PREFIX}concat{i + 1}")([x, skip])
        for j in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{SEG_PREFIX}conv{i + 1}_{j}")(x)
            x = layers.BatchNormalization(name=f"{SEG_PREFIX}bn{i + 1}_{j}")(x)
            x = layers.ReLU(name=f"{SEG_PREFIX}relu{i + 1}_{j}")(x)
    out = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name=SEG_OUTPUT_NAME)(x)
    return keras.Model(trunk.input, out, name="breastxai_unet_densenet121"), provenance


def encoder_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """A segmenter's encoder layers (between the input normalisation and the `seg_*` decoder), in graph order."""
    return [l for l in model.layers if not isinstance(l, keras.layers.InputLayer) and l.name != "preprocess"
            and not l.name.startswith(SEG_PREFIX)]


def set_encoder_trainable(model: keras.Model, first: Optional[str]) -> int:
    """Freeze a segmenter's encoder before layer `first` (None: the whole encoder; "all": nothing frozen).

    Encoder BatchNormalization stays frozen (inference mode); the decoder is always trainable.
    Returns how many encoder layers are trainable.
    """
    enc = encoder_layers(model)
    names = [l.name for l in enc]
    start = len(enc) if first is None else (0 if first == "all" else names.index(first))
    n = 0
    for layer in model.layers:
        if layer.name.startswith(SEG_PREFIX):
            layer.trainable = True
    for i, layer in enumerate(enc):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
        n += layer.trainable
    return n
