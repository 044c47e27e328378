"""Ensembles: one checkpoint from trained classifier bundles of the same task and split (`train.py --ensemble`).

The members keep their own weights; `core.models.build_ensemble` joins them into one flat Keras model whose logits
are the mean of theirs, so the ensemble is one `Classifier` that every explainer reads as any other (its Grad-CAM
is the mean of its members' maps). The ensemble's temperature is fitted on the shared validation split, and its
cross-validation combines the members' out-of-fold predictions on the same folds the same way: the recipe's own
CV, since each member's CV trained that member's recipe fold by fold.
"""
from __future__ import annotations

import csv
import logging
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from core.errors import DatasetError

log = logging.getLogger("breastxai.train")


@dataclass(frozen=True)
class EnsembleConfig:
    """Which bundles to join, where the data is (default: where the first member's metadata says) and where
    the ensemble's bundle goes."""

    members: tuple[str, ...]
    name: Optional[str] = None  # default: the first member's name
    out_dir: str = "checkpoints"
    data_dir: Optional[str] = None
    external: tuple[str, ...] = ()
    seed: int = 42


def mean_logit_probabilities(member_probs: Sequence[np.ndarray]) -> np.ndarray:
    """softmax(mean_m log p_m): the probabilities of the mean of the members' logits (each p_m (N, K), uncalibrated
    softmax outputs; log p_m is the member's logits up to a per-row constant, which the softmax removes)."""
    logits = np.mean([np.log(np.clip(np.asarray(p, np.float64), 1e-12, 1.0)) for p in member_probs], axis=0)
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _split_rows(bundle: Path) -> set[tuple[str, str]]:
    with open(bundle / "split.csv", newline="") as fh:
        return {(r["split"], r["path"]) for r in csv.DictReader(fh)}


def check_members(paths: Sequence[Path], metas: Sequence[dict]) -> None:
    """Raise DatasetError unless the members share classes, dataset, split and preprocessing (whole images)."""
    if len(paths) < 2:
        raise DatasetError("--ensemble needs at least two checkpoint bundles.")
    first, rows = metas[0], _split_rows(paths[0])
    for path, meta in zip(paths[1:], metas[1:]):
        what = {"classes": (first.get("class_names"), meta.get("class_names")),
                "dataset": (first.get("dataset", {}).get("kind"), meta.get("dataset", {}).get("kind")),
                "CLAHE": (first.get("preprocessing", {}).get("clahe"), meta.get("preprocessing", {}).get("clahe"))}
        for name, (a, b) in what.items():
            if a != b:
                raise DatasetError(f"{paths[0].name} and {path} differ in {name} ({a} vs {b}): not one task.")
        if _split_rows(path) != rows:
            raise DatasetError(f"{path} was trained on another split than {paths[0]}: an ensemble's validation and "
                               "test images must be unseen by every member (train the members with --split-file).")
    for path, meta in zip(paths, metas):
        if meta.get("patches") or meta.get("kind") == "segmenter":
            raise DatasetError(f"{path}: only whole-image classifiers can join an ensemble.")


def combine_cv(paths: Sequence[Path], metas: Sequence[dict], manifest, seed: int = 42) -> Optional[dict]:
    """The ensemble recipe's cross-validation from its members' `cv_predictions.csv` (same images, same folds),
    or None (with the reason logged) where a member has none or the folds differ."""
    from core.evaluation import classification_metrics
    from core.training.classify import summarise_cv

    tables = []
    for path in paths:
        f = path / "cv_predictions.csv"
        if not f.is_file():
            log.info("No cross-validation for the ensemble: %s has no cv_predictions.csv", path)
            return None
        with open(f, newline="") as fh:
            tables.append({r["path"]: r for r in csv.DictReader(fh)})
    keys = sorted(tables[0])
    if any(sorted(t) != keys or any(t[k]["fold"] != tables[0][k]["fold"] for k in keys) for t in tables[1:]):
        log.info("No cross-validation for the ensemble: the members' folds differ")
        return None
    index = {os.path.relpath(s.path, manifest.root): i for i, s in enumerate(manifest.samples)}
    missing = [k for k in keys if k not in index]
    if missing:
        raise DatasetError(f"{len(missing)} cross-validation image(s) are not in the data here, e.g. {missing[0]}.")
    names = list(manifest.class_names)
    idx = np.array([index[k] for k in keys])
    fold_of = np.array([int(tables[0][k]["fold"]) for k in keys])
    probs = mean_logit_probabilities([np.array([[float(t[k][f"p_{c}"]) for c in names] for k in keys])
                                      for t in tables])
    labels, groups = np.asarray(manifest.labels)[idx], np.asarray(manifest.groups)[idx]
    member_folds = {r["fold"]: r for r in metas[0].get("cross_validation", {}).get("folds", [])}
    folds = []
    for f in sorted(set(fold_of.tolist())):
        m = fold_of == f
        r = classification_metrics(labels[m], probs[m], names, n_boot=0)
        folds.append({"fold": f, "test_groups": sorted(set(groups[m].tolist())),
                      **{k: member_folds.get(f, {}).get(k) for k in ("n_train", "n_val")}, "n_test": int(m.sum()),
                      "accuracy": r["accuracy"], "balanced_accuracy": r["balanced_accuracy"],
                      "roc_auc": r.get("roc_auc_macro")})
    method = (f"the members' own group-wise {len(folds)}-fold cross-validations (same folds: "
              f"{metas[0].get('cross_validation', {}).get('method', 'see the members')}), each fold's out-of-fold "
              "probabilities combined as the ensemble combines them (softmax of the mean of the members' logits); "
              "uncalibrated")
    out = summarise_cv(manifest, folds, idx, probs, fold_of, method, seed)
    out["scope"] = metas[0].get("cross_validation", {}).get("scope", "all")
    out["members"] = [{"bundle": str(p), "command": m.get("cross_validation", {}).get("command") or m.get("command"),
                       "pooled_accuracy": m.get("cross_validation", {}).get("pooled_accuracy"),
                       "pooled_roc_auc": m.get("cross_validation", {}).get("pooled_roc_auc"),
                       "pooled_recall": m.get("cross_validation", {}).get("pooled_recall")}
                      for p, m in zip(paths, metas)]
    return out


def train_ensemble(cfg: EnsembleConfig, argv: Optional[Sequence[str]] = None) -> Path:
    """Join `cfg.members` into one bundle `cfg.out_dir/<name>`: model.keras, metadata.json, predictions.csv,
    split.csv, ood.npz and, where every member has one, cv_predictions.csv."""
    import keras
    import tensorflow as tf

    from core import ood as ood_mod
    from core.checkpoints import (apply_temperature, load_classifier, read_metadata, sha256_file, write_bundle,
                                  write_csv, write_json)
    from core.data import write_split
    from core.data.roots import bundle_splits
    from core.evaluation import classification_metrics, fit_temperature
    from core.models import HEAD_PREFIX, build_ensemble, ensemble_layer, last_conv_layer, member_prefix
    from core.training.classify import (bundle_predictions, config_from_json, config_json, decode_split,
                                        external_check, in_memory_classifier, load_manifest, write_cv_predictions)
    from core.training.common import run_record, set_seeds

    t_start = time.time()
    set_seeds(cfg.seed)
    paths = [Path(p) for p in cfg.members]
    for p in paths:
        if not (p / "metadata.json").is_file():
            raise DatasetError(f"No checkpoint bundle at {p} (no metadata.json).")
    metas = [read_metadata(p) for p in paths]
    check_members(paths, metas)
    members = [load_classifier(p, backend="keras") for p in paths]
    size = max(c.input_size for c in members)
    model = build_ensemble([c.model for c in members], size)
    log.info("Ensemble of %s at %d px: %d layers, %d weights", ", ".join(map(str, paths)), size, len(model.layers),
             model.count_params())

    first = metas[0]
    recorded = config_from_json(first.get("config", {}))
    tcfg = replace(recorded, input_size=size, data_dir=cfg.data_dir or recorded.data_dir,
                   name=cfg.name or first.get("name"), out_dir=cfg.out_dir, cv_folds=0,
                   external=tuple(cfg.external), verbose=0, seed=cfg.seed, patches=0)
    splits = bundle_splits(paths[0], first, cfg.data_dir)
    manifest = load_manifest(replace(recorded, data_dir=str(splits["train"].root), limit=None))
    data = {s: decode_split(splits[s], tcfg) for s in ("train", "val", "test")}
    clf = in_memory_classifier(model, tcfg, manifest.class_names)
    raw = {s: clf.raw_proba(data[s][0]) for s in ("val", "test")}
    temperature = fit_temperature(data["val"][1], raw["val"])
    clf.temperature = temperature
    probs = {s: apply_temperature(raw[s], temperature) for s in raw}
    metrics = {s: classification_metrics(data[s][1], probs[s], manifest.class_names, seed=cfg.seed)
               for s in ("val", "test")}
    uncal = classification_metrics(data["test"][1], raw["test"], manifest.class_names, n_boot=0)
    log.info("Temperature %.3f; validation accuracy %.3f, macro ROC AUC %s", temperature,
             metrics["val"]["accuracy"], metrics["val"]["roc_auc_macro"])
    # How far the in-graph resize moves each member from its own predictions on the validation images.
    pens = keras.Model(model.inputs, model.get_layer(HEAD_PREFIX + "concat").input)
    pens = pens.predict(data["val"][0].astype(np.float32), batch_size=16, verbose=0)
    val_images = [splits["val"].read(s) for s in splits["val"].samples]
    member_shift = []
    for c, pen in zip(members, pens):
        final = c.model.layers[-1]
        inside = keras.ops.convert_to_numpy(final(pen))  # the member's own softmax output layer
        own = c.raw_proba(val_images)
        member_shift.append({"val_max_abs_probability_difference": round(float(np.abs(inside - own).max()), 4),
                             "val_same_prediction_share": round(float((inside.argmax(1) == own.argmax(1)).mean()), 4),
                             "note": "the member inside the ensemble against the member on its own"})

    fl = ood_mod.feature_layer(model)
    feats = {s: clf.features(data[s][0]) for s in ("train", "val", "test")}
    detector = ood_mod.fit(feats["train"], data["train"][1], feats["val"])
    ood_info = ood_mod.summary(detector, fl, feats["test"], feats["train"])
    clf.ood = detector
    cv = combine_cv(paths, metas, manifest, cfg.seed)
    cv_preds = cv.pop("predictions") if cv is not None else None
    externals = [external_check(clf, spec, manifest) for spec in cfg.external]

    name = tcfg.name
    member_info = [{"bundle": str(p), "name": m.get("name"), "command": m.get("command"), "argv": m.get("argv"),
                    "git_commit": m.get("git_commit"), "model_sha256": m.get("model_sha256"),
                    "input_size": m.get("input_size"), "backbone": m.get("backbone"), "weights": m.get("weights"),
                    "head": m.get("head"), "temperature": m.get("calibration", {}).get("temperature"),
                    "val_accuracy": m.get("metrics", {}).get("val", {}).get("accuracy"),
                    "val_roc_auc_macro": m.get("metrics", {}).get("val", {}).get("roc_auc_macro"),
                    "layer_prefix": member_prefix(i), "in_ensemble": shift,
                    "config": m.get("config")}  # the member's recipe, retrained fold by fold by --distil-from CVs
                   for i, (p, m, shift) in enumerate(zip(paths, metas, member_shift), start=1)]
    metadata = {
        **run_record(name, argv),
        "config": {**config_json(tcfg), "ensemble": [str(p) for p in paths]},
        "dataset": {**first.get("dataset", {}), "root": str(manifest.root)},
        "split": {**first.get("split", {}), "reused_from": str(paths[0] / "split.csv")},
        "class_names": list(manifest.class_names),
        "input_size": size,
        "backbone": " + ".join(str(m.get("backbone")) for m in metas),
        "weights": {"source": "the members' trained weights", "members": [m.get("weights") for m in metas]},
        "preprocessing": {**first.get("preprocessing", {}),
                          "resize": f"cv2 INTER_AREA/LINEAR to {size} px square; in-graph bilinear resize to each "
                                    "member's own side where it is smaller"},
        "head": {"ensemble": "mean of the members' logits: one Dense layer over their concatenated penultimate "
                             "features, holding each member's output kernel and bias divided by the number of members",
                 "members": len(paths), "units": []},
        "ensemble": {"members": member_info,
                     "rule": "softmax of the mean of the members' logits, then one temperature fitted on the "
                             "validation split",
                     "forward_cost": "every member's forward pass for every prediction and perturbation"},
        "gradcam_layer": list(dict.fromkeys(ensemble_layer(model, i, m.get("gradcam_layer") or last_conv_layer(c.model))
                                            for i, (m, c) in enumerate(zip(metas, members), start=1))),
        "training": {"epochs": 0, "phases": [], "precision": "float32", "wall_seconds": None,
                     "platform": platform.platform(), "tensorflow": tf.__version__, "keras": keras.__version__,
                     "members_wall_seconds": [m.get("training", {}).get("wall_seconds") for m in metas]},
        "calibration": {"method": "temperature scaling on the validation split", "temperature": temperature,
                        "test_ece_before": uncal["ece"], "test_ece_after": metrics["test"]["ece"]},
        "metrics": metrics,
        "ood": ood_info,
    }
    if cv is not None:
        metadata["cross_validation"] = cv
    if externals:
        metadata["external_checks"] = externals
    pred_header, pred_rows = bundle_predictions(splits, probs, externals, manifest.class_names)

    def fill(tmp: Path) -> None:
        model.save(tmp / "model.keras")
        metadata["model_sha256"] = sha256_file(tmp / "model.keras")
        metadata["training"]["wall_seconds"] = round(time.time() - t_start, 1)
        write_csv(tmp / "predictions.csv", pred_header, pred_rows)
        write_split(splits, tmp / "split.csv")
        detector.save(tmp / "ood.npz")
        if cv_preds is not None:
            write_cv_predictions({"predictions": cv_preds}, tmp / "cv_predictions.csv", manifest.class_names)
        write_json(tmp / "metadata.json", metadata)

    dest = write_bundle(Path(cfg.out_dir) / name, fill)
    log.info("Wrote %s in %.1f min", dest, (time.time() - t_start) / 60)
    return dest
