"""Seeded, stratified, group-aware train/val/test splits, saved as CSV with each checkpoint."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from core.data.manifest import Manifest, Sample
from core.errors import DatasetError

SPLITS = ("train", "val", "test")


def describe_groups(groups: Sequence[str], show: int = 3) -> str:
    """'a, b, c … (132 groups)' for long lists (BUSI folds hold out over a hundred groups)."""
    groups = list(groups)
    return ", ".join(groups[:show]) + (f" … ({len(groups)} groups)" if len(groups) > show else "")


def _holdout(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a held-out part of about `fraction`, stratified, never splitting a group."""
    # imported here: scikit-learn costs about a second to import, and loading a model needs none of it
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold, train_test_split

    n = len(labels)
    idx = np.arange(n)
    if len(np.unique(groups)) == n:  # no grouping: exact stratified fraction
        n_held, n_cls = max(1, int(round(fraction * n))), len(np.unique(labels))
        can_stratify = np.min(np.bincount(labels)[np.unique(labels)]) >= 2 and min(n_held, n - n_held) >= n_cls
        _, held = train_test_split(idx, test_size=n_held, random_state=seed, stratify=labels if can_stratify else None)
        out = np.zeros(n, bool)
        out[held] = True
        return out
    n_groups = len(np.unique(groups))
    n_splits = int(min(max(2, round(1.0 / fraction)), n_groups))
    try:
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, held = next(cv.split(idx, labels, groups))
    except ValueError:  # every class smaller than n_splits: stratification impossible, keep groups apart
        gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        _, held = next(gss.split(idx, labels, groups))
    out = np.zeros(n, bool)
    out[held] = True
    return out


def split_manifest(manifest: Manifest, fractions: Sequence[float] = (0.7, 0.15, 0.15),
                   seed: int = 42) -> dict[str, Manifest]:
    """Split into train/val/test (fractions sum to 1), stratified by label, no group in two splits."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise DatasetError(f"Split fractions must be three positive numbers summing to 1, got {fractions}.")
    labels = np.asarray(manifest.labels)
    groups = np.asarray(manifest.groups)
    if len(np.unique(groups)) < 3:
        raise DatasetError(f"Need at least 3 groups to make a train/val/test split; found {len(np.unique(groups))}.")
    test = _holdout(labels, groups, fractions[2], seed)
    rest = np.flatnonzero(~test)
    val_rel = _holdout(labels[rest], groups[rest], fractions[1] / (fractions[0] + fractions[1]), seed + 1)
    val = np.zeros(len(labels), bool)
    val[rest[val_rel]] = True
    train = ~(test | val)
    return {"train": manifest.subset(np.flatnonzero(train)), "val": manifest.subset(np.flatnonzero(val)),
            "test": manifest.subset(np.flatnonzero(test))}


def write_split(splits: dict[str, Manifest], path: str | Path) -> None:
    """Write `split.csv`: split, path (relative to the dataset root), label, class_name, group, masks."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["split", "path", "label", "class_name", "group", "mask_paths", "magnification", "subtype",
                    "x", "y"])
        for name in SPLITS:
            m = splits[name]
            for s in m.samples:
                w.writerow([name, _rel(s.path, m.root), s.label, s.class_name, s.group,
                            ";".join(_rel(p, m.root) for p in s.mask_paths), s.magnification or "", s.subtype or "",
                            *(s.position or ("", ""))])


def mask_paths(row: dict, root: str | Path) -> tuple[str, ...]:
    """The lesion mask files of one `split.csv` row (its `mask_paths`, ';'-separated, relative to the dataset `root`)
    as paths under `root`; () for a row without any."""
    return tuple(str(Path(root) / p) for p in (row.get("mask_paths") or "").split(";") if p)


def read_split(path: str | Path, root: str | Path, class_names: Sequence[str], name: str = "dataset",
               patch_side: int | None = None) -> dict[str, Manifest]:
    """Read `split.csv` back into manifests, resolving paths against the dataset `root`
    (`patch_side`: see `Manifest.patch_side`)."""
    rows: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            rows[r["split"]].append(Sample(
                path=str(Path(root) / r["path"]), label=int(r["label"]), class_name=r["class_name"],
                group=r["group"], mask_paths=mask_paths(r, root),
                magnification=int(r["magnification"]) if r["magnification"] else None,
                subtype=r["subtype"] or None,
                position=(int(r["x"]), int(r["y"])) if r.get("x") else None))
    return {s: Manifest(name, str(root), tuple(class_names), tuple(v), patch_side) for s, v in rows.items()}


def _rel(path: str, root: str) -> str:
    try:
        return Path(os.path.relpath(path, root)).as_posix()
    except ValueError:
        return path
