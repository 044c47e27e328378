"""Distillation: one network trained on a teacher's softened probabilities (`train.py --distil-from BUNDLE`).

The teacher is any classifier bundle, typically an ensemble (`train.py --ensemble`), whose N members cost N
forward passes for every explanation. The student is trained by the usual recipe on the targets
`w * softmax(z / T) + (1 - w) * onehot(y)`, z the teacher's logits (mean of its members' logits for an ensemble),
w `--distil-weight`, T `--distil-temperature`; validation and early stopping stay on the true labels.

Cross-validation of a student is of its whole recipe: in every fold the teacher's recipe (each member's recorded
configuration) is retrained on that fold's training part, so no held-out image has been seen by the teacher
that labels the student's training images.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from core.errors import ConfigError

log = logging.getLogger("breastxai.train")


def soft_targets(teacher_probs: np.ndarray, labels: np.ndarray, weight: float, temperature: float) -> np.ndarray:
    """float32 (N, K): `weight` x the teacher's probabilities sharpened or softened by `temperature` (softmax of
    log p / T, p (N, K) uncalibrated softmax outputs) plus (1 - weight) x the one-hot true labels (N,)."""
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"--distil-weight must be within 0-1 (got {weight}).")
    if temperature <= 0:
        raise ConfigError(f"--distil-temperature must be above 0 (got {temperature}).")
    p = np.asarray(teacher_probs, np.float64)
    z = np.log(np.clip(p, 1e-12, 1.0)) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    soft = z / z.sum(axis=1, keepdims=True)
    onehot = np.eye(p.shape[1])[np.asarray(labels, np.int64)]
    return (weight * soft + (1.0 - weight) * onehot).astype(np.float32)


def teacher_recipes(bundle: str | Path) -> list:
    """The training configurations that rebuild the teacher: one per ensemble member (its recorded "config", or its
    own bundle's metadata where the ensemble's record lacks it), or the bundle's own for a single model."""
    from core.checkpoints import read_metadata
    from core.training.classify import config_from_json

    bundle = Path(bundle)
    meta = read_metadata(bundle)
    members = (meta.get("ensemble") or {}).get("members")
    if not members:
        if not meta.get("config"):
            raise ConfigError(f"{bundle}: its metadata records no training configuration to retrain it by.")
        return [config_from_json(meta["config"])]
    out = []
    for m in members:
        recorded = m.get("config")
        if recorded is None and m.get("bundle") and (Path(m["bundle"]) / "metadata.json").is_file():
            recorded = read_metadata(Path(m["bundle"])).get("config")
        if recorded is None:
            raise ConfigError(f"{bundle}: member {m.get('bundle')} has no recorded configuration, so its recipe "
                              "cannot be retrained for a cross-validation.")
        out.append(config_from_json(recorded))
    return out


def _check_inputs(student, recipes: Sequence) -> None:
    for r in recipes:
        if (r.input_size, r.clahe, r.patches) != (student.input_size, student.clahe, student.patches):
            raise ConfigError(f"The teacher's recipe reads images at {r.input_size} px (CLAHE {r.clahe}, patches "
                              f"{r.patches}); the student at {student.input_size} px (CLAHE {student.clahe}, patches "
                              f"{student.patches}): distil between models of the same input.")


def bundle_soft_targets(cfg, train_data: tuple, class_names: Sequence[str]) -> tuple[np.ndarray, dict]:
    """(targets (N, K), metadata entry): the teacher bundle `cfg.distil_from`'s uncalibrated probabilities on the
    training images (uint8 (N, S, S, 3), labels (N,)) turned into soft targets."""
    from core.checkpoints import load_classifier

    x, y = train_data
    teacher = load_classifier(cfg.distil_from)
    if list(teacher.class_names) != list(class_names):
        raise ConfigError(f"The teacher {cfg.distil_from} has classes {list(teacher.class_names)}, the data "
                          f"{list(class_names)}: not the same task.")
    _check_inputs(cfg, [replace(cfg, input_size=teacher.input_size,
                                clahe=bool(teacher.metadata.get("preprocessing", {}).get("clahe")))])
    p = teacher.raw_proba(x)
    targets = soft_targets(p, y, cfg.distil_weight, cfg.distil_temperature)
    agree = float(np.mean(np.argmax(p, axis=1) == y))
    on_true = float(targets[np.arange(len(y)), y].mean())
    log.info("Distillation from %s: teacher accuracy on the %d training images %.3f; soft targets put %.3f on the "
             "true class on average", cfg.distil_from, len(y), agree, on_true)
    meta = teacher.metadata
    entry = {"teacher": str(cfg.distil_from), "teacher_model_sha256": meta.get("model_sha256"),
             "teacher_members": len((meta.get("ensemble") or {}).get("members") or []) or 1,
             "weight": cfg.distil_weight, "temperature": cfg.distil_temperature,
             "teacher_train_accuracy": agree,
             "mean_target_on_true_class": on_true,
             "targets": "weight x softmax(teacher logits / temperature) + (1 - weight) x one-hot label, per training "
                        "image (every augmented copy of an image gets its row); validation and early stopping on "
                        "the true labels"}
    return targets, entry


def fold_soft_targets(cfg, train_data: tuple, val_data: tuple, class_names: Sequence[str]) -> np.ndarray:
    """Soft targets for one cross-validation fold: the teacher's recipes retrained on this fold's training part
    (their early stopping on its validation part), their probabilities on the training images combined as the
    ensemble combines them (softmax of the mean of the members' logits)."""
    import keras

    from core.training.classify import in_memory_classifier, train_model
    from core.training.common import set_seeds
    from core.training.ensemble import mean_logit_probabilities

    recipes = [replace(r, verbose=0, cv_folds=0, external=(), distil_from=None) for r in teacher_recipes(
        cfg.distil_from)]
    _check_inputs(cfg, recipes)
    k = len(class_names)
    probs = []
    for i, r in enumerate(recipes):
        set_seeds(r.seed)
        model, _, _, _ = train_model(r, k, train_data, val_data)
        probs.append(in_memory_classifier(model, r, class_names).raw_proba(train_data[0]))
        log.info("Distillation fold teacher %d/%d retrained: accuracy %.3f on the fold's training images", i + 1,
                 len(recipes), float(np.mean(np.argmax(probs[-1], axis=1) == train_data[1])))
        del model
        keras.backend.clear_session()
    p = probs[0] if len(probs) == 1 else mean_logit_probabilities(probs)
    return soft_targets(p, train_data[1], cfg.distil_weight, cfg.distil_temperature)
