"""Classification metrics (sklearn), calibration, bootstrap intervals; CLI: python -m core.evaluation CKPT."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

# scikit-learn is imported inside the functions that use it: it takes about a second to import, and loading a model
# or showing a prediction needs none of it.


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """One row per class: TP, TN, FP, FN, precision, recall (sensitivity), specificity, F1, support."""
    from sklearn import metrics as skm

    k = len(class_names)
    cm = skm.confusion_matrix(y_true, y_pred, labels=list(range(k)))
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=list(range(k)), zero_division=0)
    rows, n = [], cm.sum()
    for i, name in enumerate(class_names):
        tp = int(cm[i, i])
        fn = int(cm[i].sum() - tp)
        fp = int(cm[:, i].sum() - tp)
        tn = int(n - tp - fn - fp)
        rows.append({"class": name, "tp": tp, "tn": tn, "fp": fp, "fn": fn,
                     "precision": float(p[i]), "recall": float(r[i]),
                     "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
                     "f1": float(f[i]), "support": int(s[i])})
    return rows


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """ECE of the top-class confidence over `n_bins` equal-width bins (weighted |accuracy - confidence|)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def reliability_curve(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> dict:
    """Per-bin mean confidence, accuracy and count of the top-class prediction (reliability diagram)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    out = {"confidence": [], "accuracy": [], "count": [], "bin_lo": [], "bin_hi": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if sel.any():
            out["confidence"].append(float(conf[sel].mean()))
            out["accuracy"].append(float(correct[sel].mean()))
            out["count"].append(int(sel.sum()))
            out["bin_lo"].append(float(lo))
            out["bin_hi"].append(float(hi))
    return out


def _auc_defined(present, k: int):
    """ROC AUC needs both classes (binary) or every class (macro one-vs-rest over k > 2): `present` is how many
    classes y_true holds, an int or an array of counts (one per bootstrap resample), answered alike."""
    return (present >= 2) & ((k == 2) | (present >= k))


def _auc(y_true: np.ndarray, probs: np.ndarray, k: int) -> Optional[float]:
    from sklearn import metrics as skm

    if not _auc_defined(len(np.unique(y_true)), k):
        return None
    if k == 2:
        return float(skm.roc_auc_score(y_true, probs[:, 1]))
    return float(skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=list(range(k))))


def _ranked_auc_rows(y_true: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """`_auc` of each row at once by the Mann-Whitney rank sum (ties count half, as in sklearn's roc_auc_score; the
    same value to float rounding), without sklearn's input checks (~9 ms a call): labels (B, n), probabilities
    (B, n, k) -> (B,) float64, NaN where ROC AUC is undefined. The bootstrap's statistic."""
    from scipy.stats import rankdata

    n = y_true.shape[1]
    counts = np.stack([(y_true == c).sum(axis=1) for c in range(k)], axis=1)  # (B, k)
    aucs = []
    for c in ([1] if k == 2 else range(k)):
        n1 = counts[:, c]
        rank_sum = np.where(y_true == c, rankdata(probs[..., c], axis=1), 0.0).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            aucs.append((rank_sum - n1 * (n1 + 1) / 2) / (n1 * (n - n1)))
    return np.where(_auc_defined((counts > 0).sum(axis=1), k), np.mean(aucs, axis=0), np.nan)


def _pr_auc(y_true: np.ndarray, probs: np.ndarray, k: int) -> Optional[float]:
    from sklearn import metrics as skm

    if len(np.unique(y_true)) < 2:
        return None
    if k == 2:
        return float(skm.average_precision_score(y_true, probs[:, 1]))
    onehot = np.eye(k)[y_true]
    keep = onehot.sum(axis=0) > 0
    return float(skm.average_precision_score(onehot[:, keep], probs[:, keep], average="macro"))


def bootstrap_ci(y_true: np.ndarray, probs: np.ndarray, stat, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> Optional[list[float]]:
    """Percentile bootstrap (1 - alpha) interval of `stat` over resampled cases; None without cases, or when `stat`
    is undefined on more than half of the resamples.

    `stat` takes resamples stacked, labels (B, n) and probabilities (B, n, K), and returns (B,) with NaN where
    undefined: one call per chunk of resamples (<= 2M cases), drawn as n_boot successive draws of n indices."""
    n = len(y_true)
    if n == 0 or n_boot <= 0:
        return None
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)  # a few tens of MB of probabilities per call at most
    vals = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, (min(chunk, n_boot - start), n))
        v = np.asarray(stat(y_true[idx], probs[idx]), np.float64)
        vals.extend(v[~np.isnan(v)].tolist())
    if len(vals) < n_boot // 2:
        return None
    return [float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))]


def mean_ci(values: Sequence[Optional[float]], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean, median and percentile-bootstrap 95% interval of the mean over the finite values (None, NaN dropped).

    Returns {"n", "mean", "median", "ci95"}: mean and median None without values; ci95 None with fewer than two
    values (an interval of one value would only repeat it) or `n_boot` 0. Resamples as `bootstrap_ci` draws them."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "median": None, "ci95": None}
    ci = bootstrap_ci(v, v, lambda _, x: x.mean(axis=1), n_boot, seed) if v.size > 1 else None
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)), "ci95": ci}


def binomial_ci(correct: int, n: int, level: float = 0.95) -> Optional[list[float]]:
    """Exact (Clopper-Pearson) interval of a proportion; unlike the bootstrap, honest at 12/12."""
    from scipy.stats import binomtest

    if n <= 0:
        return None
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=level, method="exact")
    return [float(ci.low), float(ci.high)]


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str],
                           n_boot: int = 1000, seed: int = 0) -> dict:
    """Every headline metric for true labels (N,) and probabilities (N, K), JSON-ready."""
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)  # float32 softmax rounding
    k = len(class_names)
    y_pred = probs.argmax(axis=1)
    labels = list(range(k))
    rep = skm.classification_report(y_true, y_pred, labels=labels, target_names=list(class_names),
                                    output_dict=True, zero_division=0)
    acc_stat = lambda t, p: (p.argmax(-1) == t).mean(-1)  # (B, n) resamples -> (B,)
    auc_stat = lambda t, p: _ranked_auc_rows(t, p, k)
    out = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "accuracy_ci95": bootstrap_ci(y_true, probs, acc_stat, n_boot, seed),
        "accuracy_ci95_exact": binomial_ci(int((y_pred == y_true).sum()), len(y_true)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)) if len(y_true) else None,
        "cohen_kappa": float(skm.cohen_kappa_score(y_true, y_pred, labels=labels)),
        "roc_auc_macro": _auc(y_true, probs, k),
        "roc_auc_ci95": bootstrap_ci(y_true, probs, auc_stat, n_boot, seed),
        "pr_auc_macro": _pr_auc(y_true, probs, k),
        "log_loss": float(skm.log_loss(y_true, np.clip(probs, 1e-12, 1), labels=labels)),
        "ece": expected_calibration_error(y_true, probs),
        "macro_avg": {m: float(rep["macro avg"][m]) for m in ("precision", "recall", "f1-score")},
        "weighted_avg": {m: float(rep["weighted avg"][m]) for m in ("precision", "recall", "f1-score")},
        "per_class": per_class_table(y_true, y_pred, class_names),
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    for row in out["per_class"]:
        out[f"recall_{row['class']}"] = row["recall"]
    return out


def patient_level_metrics(y_true: Sequence[int], probs: np.ndarray, groups: Sequence[str],
                          class_names: Sequence[str], n_boot: int = 1000, seed: int = 0) -> Optional[dict]:
    """Patient-level results as in Spanhol et al. (2016), for datasets whose patients carry one class.

    Each patient's probability is the mean over its images (N,) -> metrics over patients, plus the
    patient recognition rate (mean over patients of the share of their images classified correctly) and
    one row per patient. Returns None when a patient has images of two classes (IDC: tissue, not patients).
    """
    y_true, probs, groups = np.asarray(y_true, int), np.asarray(probs, np.float64), np.asarray(groups)
    names = sorted(set(groups.tolist()))
    y_pat, p_pat, rates, rows = [], [], [], []
    for g in names:
        sel = groups == g
        if len(set(y_true[sel].tolist())) > 1:
            return None
        p = probs[sel].mean(axis=0)
        rate = float((probs[sel].argmax(1) == y_true[sel]).mean())
        y_pat.append(int(y_true[sel][0]))
        p_pat.append(p)
        rates.append(rate)
        rows.append({"patient": str(g), "true": class_names[y_pat[-1]], "predicted": class_names[int(p.argmax())],
                     "n_images": int(sel.sum()), "image_accuracy": rate,
                     "probabilities": {c: float(v) for c, v in zip(class_names, p)}})
    out = classification_metrics(np.array(y_pat), np.array(p_pat), class_names, n_boot=n_boot, seed=seed)
    out["patient_recognition_rate"] = float(np.mean(rates))
    out["patients"] = rows
    return out


def subgroup_metrics(y_true: Sequence[int], probs: np.ndarray, subgroups: Sequence[Optional[str]],
                     class_names: Sequence[str], groups: Optional[Sequence[str]] = None,
                     called: Optional[Sequence[int]] = None) -> list[dict]:
    """How often each subgroup (a tumour subtype, say) is classified right: one row per subgroup.

    y_true (N,), probs (N, K), subgroups (N,) with None or "" for images without one (left out); groups (N,)
    the patients, when each row should also count patients right (mean probability over a patient's images of
    that subgroup, its most probable class, as `patient_level_metrics`, also with `called`); called (N,) the class
    each image was called (default: the most probable; `called_at_threshold` for an operating point). Rows:
    subgroup, class (its true class, or "mixed"), images, images_correct, recall (images_correct / images),
    mean_p_true (mean probability of each image's true class), and patients / patients_correct with `groups`;
    sorted by class, then subgroup.
    """
    y_true, probs = np.asarray(y_true, int), np.asarray(probs, np.float64)
    called_all = probs.argmax(1) if called is None else np.asarray(called, int)
    sub = np.array([s or "" for s in subgroups], dtype=object)
    rows = []
    for name in sorted(set(sub.tolist()) - {""}):
        sel = sub == name
        y, p = y_true[sel], probs[sel]
        right = called_all[sel] == y
        classes = sorted(set(y.tolist()))
        row = {"subgroup": str(name), "class": class_names[classes[0]] if len(classes) == 1 else "mixed",
               "images": int(sel.sum()), "images_correct": int(right.sum()), "recall": float(right.mean()),
               "mean_p_true": float(p[np.arange(len(y)), y].mean())}
        if groups is not None:
            g = np.asarray(groups)[sel]
            pats = sorted(set(g.tolist()))
            ok = 0
            for q in pats:
                at = g == q
                ok += int(np.bincount(y[at]).argmax() == p[at].mean(0).argmax())
            row.update(patients=len(pats), patients_correct=ok)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["class"], r["subgroup"]))


def called_at_threshold(probs: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """(N,) the class each image is called at an operating point: `positive` when P(positive) >= threshold,
    else the most probable of the other classes."""
    probs = np.asarray(probs, np.float64)
    rest = probs.copy()
    rest[:, positive] = -1.0
    return np.where(probs[:, positive] >= threshold, positive, rest.argmax(1))


def weak_subgroups(rows: Sequence[dict], below: float = 0.8) -> str:
    """'papillary carcinoma (31 of 50), mucinous carcinoma (90 of 128)': the `subgroup_metrics` rows whose
    recall is under `below`, weakest first; "" when none is."""
    weak = sorted((r for r in rows if r["recall"] < below), key=lambda r: r["recall"])
    return ", ".join(f"{r['subgroup'].replace('_', ' ')} ({r['images_correct']} of {r['images']})" for r in weak)


def misread_as(rows: Sequence[dict], predicted: str, class_names: Sequence[str], below: float = 0.8) -> list[dict]:
    """The `subgroup_metrics` rows of the other class that a binary model gets right less often than `below`:
    the subtypes whose images it most often calls `predicted` (with two classes a miss is that class), weakest
    first. Empty for three or more classes, where a miss does not say which class it went to."""
    if len(class_names) != 2:
        return []
    return sorted((r for r in rows if r["class"] in class_names and r["class"] != predicted and r["recall"] < below),
                  key=lambda r: r["recall"])


def curves(y_true: Sequence[int], probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """One-vs-rest ROC and PR curve points per class (for plotting)."""
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=int)
    out = {}
    for i, name in enumerate(class_names):
        t = (y_true == i).astype(int)
        if t.min() == t.max():
            continue
        fpr, tpr, _ = skm.roc_curve(t, probs[:, i])
        prec, rec, _ = skm.precision_recall_curve(t, probs[:, i])
        out[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": float(skm.auc(fpr, tpr)),
                     "precision": prec.tolist(), "recall": rec.tolist(),
                     "ap": float(skm.average_precision_score(t, probs[:, i]))}
    return out


def fit_temperature(y_true: Sequence[int], probs: np.ndarray) -> float:
    """Temperature T minimising the NLL of softmax(log p / T) on held-out (validation) predictions.

    If every validation prediction is already correct the NLL keeps falling as T -> 0, so the fit
    would only make the model (arbitrarily) more confident: T stays 1.
    """
    from scipy.optimize import minimize_scalar

    from core.checkpoints import apply_temperature

    y_true = np.asarray(y_true, dtype=int)
    if len(y_true) == 0 or bool((np.argmax(probs, axis=1) == y_true).all()):
        return 1.0

    def nll(t):
        p = apply_temperature(probs, float(t)).astype(np.float64)
        return -np.mean(np.log(np.clip(p[np.arange(len(y_true)), y_true], 1e-12, 1)))

    res = minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded")
    return float(res.x)


#: Out-of-fold predictions a bundle keeps in files of their own (stored uncalibrated): file, and why one can be missing.
OUT_OF_FOLD = {"cv": ("cv_predictions.csv", "the bundle was trained without --cv-folds"),
               "calibration": ("calibration_predictions.csv",
                               "only bundles trained with --calibration inner-cv keep out-of-fold predictions")}


def predictions_file(path: str | Path, split: str) -> Path:
    """The file of a bundle that holds `split`'s predictions: predictions.csv, or an `OUT_OF_FOLD` one."""
    return Path(path) / OUT_OF_FOLD.get(split, ("predictions.csv",))[0]


def predictions_from_bundle(path: str | Path, split: str = "test") -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(y_true (N,), probs (N, K), rows) for one split of a bundle's predictions.csv; "cv": the out-of-fold
    predictions of its cross-validation (cv_predictions.csv, uncalibrated, as each fold's model gave them);
    "calibration": those its temperature was fitted on, with the temperature applied."""
    from core.checkpoints import apply_temperature, read_csv, read_metadata

    meta = read_metadata(path)
    names = meta["class_names"]
    file = predictions_file(path, split)
    if split in OUT_OF_FOLD:
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: {OUT_OF_FOLD[split][1]}.")
        rows = read_csv(file)
    else:
        rows = [r for r in read_csv(file) if r["split"] == split]
    y = np.array([names.index(r["true"]) for r in rows], dtype=int)
    p = np.array([[float(r[f"p_{c}"]) for c in names] for r in rows], dtype=np.float64).reshape(len(rows), len(names))
    if split == "calibration":
        p = apply_temperature(p, float(meta.get("calibration", {}).get("temperature", 1.0))).astype(np.float64)
    return y, p, rows


def subtypes_from_bundle(path: str | Path, split: str = "cv", at_operating_point: bool = False
                         ) -> Optional[list[dict]]:
    """`subgroup_metrics` by subtype (BreakHis' eight tumour types) of one split of a bundle ("cv": its
    cross-validation; "calibration": the out-of-fold predictions its operating point was chosen on), patients
    from split.csv; `at_operating_point`: images called as the model card's operating point calls them. None
    when split.csv records no subtypes, the bundle keeps no such predictions, or it has no operating point."""
    from core.checkpoints import read_csv, read_metadata

    if not (predictions_file(path, split).is_file() and (Path(path) / "split.csv").is_file()):
        return None
    meta = read_metadata(path)
    names, op = meta["class_names"], meta.get("operating_point") or {}
    if at_operating_point and op.get("positive_class") not in names:
        return None
    y, p, rows = predictions_from_bundle(path, split)
    known = {r["path"]: r for r in read_csv(Path(path) / "split.csv")}
    subtypes = [known.get(r["path"], {}).get("subtype") for r in rows]
    if not any(subtypes):
        return None
    groups = [r.get("group") or known.get(r["path"], {}).get("group") or r["path"] for r in rows]
    called = called_at_threshold(p, names.index(op["positive_class"]), op["threshold"]) if at_operating_point else None
    return subgroup_metrics(y, p, subtypes, names, groups, called)


def _missed(rows: Sequence[dict]) -> str:
    """'19 of 50 papillary carcinoma and 38 of 128 mucinous carcinoma' (the images each row got wrong)."""
    parts = [f"{r['images'] - r['images_correct']} of {r['images']} {r['subgroup'].replace('_', ' ')}" for r in rows]
    return ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]


def subtype_caution(path: str | Path, probs: np.ndarray, class_names: Sequence[str], meta: dict,
                    rows: Callable[[str | Path, str, bool], Optional[list[dict]]] = subtypes_from_bundle
                    ) -> Optional[dict]:
    """What the cross-validation says about a binary call (`probs`: one image's (K,) probabilities): the tumour
    subtypes of the other class it most often called the predicted class (`misread_as`), and, for an image below
    the operating point of the other class, how many of their images the operating point still left below it in
    the predictions it was chosen on. `rows(path, split, at_operating_point)` gives the subtype rows (default
    `subtypes_from_bundle`; the dashboard passes its cached copy). None when nothing needs saying.

    Returns {"text": one paragraph, "missed_in_cv": [{"subgroup", "class", "images", "images_wrong"}],
    "left_below_operating_point": the same for the operating point, or None}."""
    pred = class_names[int(np.argmax(probs))]
    misread = misread_as(rows(path, "cv", False) or [], pred, class_names)
    if not misread:
        return None

    def brief(rs):
        return [{"subgroup": r["subgroup"], "class": r["class"], "images": r["images"],
                 "images_wrong": r["images"] - r["images_correct"]} for r in rs]

    text = (f"Read a {pred} call with care: in cross-validation this model called {_missed(misread)} images {pred} "
            "(the model card's table by tumour subtype).")
    below = None
    op = meta.get("operating_point") or {}
    positive = op.get("positive_class")
    if positive in class_names and positive != pred and probs[list(class_names).index(positive)] < op["threshold"]:
        at_op = {r["subgroup"]: r for r in rows(path, "calibration", True) or []}
        below = [at_op[r["subgroup"]] for r in misread if r["subgroup"] in at_op] or None
        if below:
            text += (f" The operating point, which this image does not cross, still left {_missed(below)} images "
                     f"below it in the {op.get('chosen_on', 'predictions it was chosen on')}.")
    return {"text": text, "missed_in_cv": brief(misread), "left_below_operating_point": brief(below) if below else None}


def near_duplicate_audit(path: str | Path, split: str = "test", data_dir: Optional[str] = None,
                         max_bits: Optional[int] = None) -> dict:
    """Metrics of `split` without the images that have a near-duplicate (a repeat scan) in another split.

    Near-duplicates are the difference-hash clusters of `core.data.duplicates` over every image of the
    bundle's split.csv; an image is excluded when its cluster reaches any other split. Needs the dataset.
    """
    from core.checkpoints import read_csv, read_metadata
    from core.data.duplicates import NEAR_DUPLICATE_BITS, near_duplicate_components
    from core.errors import DatasetError
    from core.data.roots import resolve_data_root

    path = Path(path)
    max_bits = NEAR_DUPLICATE_BITS if max_bits is None else max_bits
    meta = read_metadata(path)
    root = resolve_data_root(meta, path, data_dir)
    rows = read_csv(path / "split.csv")
    missing = [r["path"] for r in rows if not (root / r["path"]).is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} images of {path.name}'s split are not under {root} (e.g. {missing[0]}); "
                           "pass --data-dir.")
    comp = near_duplicate_components([str(root / r["path"]) for r in rows], max_bits)
    splits_of: dict[int, set] = {}
    for c, r in zip(comp, rows):
        splits_of.setdefault(int(c), set()).add(r["split"])
    leaky = {r["path"] for c, r in zip(comp, rows) if r["split"] == split and len(splits_of[int(c)]) > 1}
    y, p, pred_rows = predictions_from_bundle(path, split)
    keep = np.array([r["path"] not in leaky for r in pred_rows], bool)
    m = classification_metrics(y[keep], p[keep], meta["class_names"], seed=0)
    return {"method": f"difference hash (16x16), clusters of images within {max_bits} of 256 bits over every "
                      f"image of split.csv; {split} images whose cluster reaches another split are excluded",
            "split": split, "max_bits": max_bits, "n_split": int(len(y)), "n_excluded": int((~keep).sum()),
            "excluded_by_class": {c: int(((y == i) & ~keep).sum()) for i, c in enumerate(meta["class_names"])},
            "excluded": sorted(leaky), "metrics": m}


def compare_bundles(path: str | Path, other: str | Path) -> dict:
    """Another checkpoint's results on the same split (e.g. a baseline CNN beside the committed DenseNet), for the
    model card: its settings, validation and test metrics and test probabilities in this bundle's test order.

    Raises DatasetError unless both bundles hold predictions for exactly the same validation and test images.
    """
    from core.checkpoints import read_metadata
    from core.errors import DatasetError

    meta, om = read_metadata(path), read_metadata(other)
    out = {"name": om.get("name"), "backbone": om.get("backbone"), "input_size": om.get("input_size"),
           "command": om.get("command"), "git_commit": om.get("git_commit"), "model_sha256": om.get("model_sha256"),
           "weights": (om.get("weights") or {}).get("source"),
           "epochs": om.get("training", {}).get("epochs"),
           "wall_seconds": om.get("training", {}).get("wall_seconds"), "metrics": {}}
    if list(om.get("class_names", [])) != list(meta.get("class_names", [])):
        raise DatasetError(f"{Path(other).name} predicts other classes than {Path(path).name}.")
    for split in ("val", "test"):
        y, _, rows = predictions_from_bundle(path, split)
        oy, op, orows = predictions_from_bundle(other, split)
        order = {r["path"]: i for i, r in enumerate(orows)}
        if set(order) != {r["path"] for r in rows}:
            raise DatasetError(f"{Path(other).name} was not evaluated on the same {split} images as {Path(path).name}.")
        idx = [order[r["path"]] for r in rows]
        out["metrics"][split] = classification_metrics(oy[idx], op[idx], meta["class_names"], seed=0)
        if split == "test":
            out["test_probabilities"] = np.round(op[idx], 6).tolist()
    return out


def sensitivity_specificity(y_true: Sequence[int], p_pos: np.ndarray, positive: int, threshold: float) -> dict:
    """Calling `positive` when P(positive) >= threshold: sensitivity and specificity with exact 95% intervals and
    the 2x2 counts (positive vs the rest)."""
    y = np.asarray(y_true) == positive
    call = np.asarray(p_pos) >= threshold
    tp, fn = int((y & call).sum()), int((y & ~call).sum())
    tn, fp = int((~y & ~call).sum()), int((~y & call).sum())
    return {"threshold": float(threshold), "tp": tp, "fn": fn, "tn": tn, "fp": fp,
            "sensitivity": tp / max(tp + fn, 1), "sensitivity_ci95": binomial_ci(tp, tp + fn),
            "specificity": tn / max(tn + fp, 1), "specificity_ci95": binomial_ci(tn, tn + fp)}


CHOSEN_ON = {"val": "validation split",
             "calibration": "out-of-fold predictions of the training and validation patients"}


def operating_point_source(op: dict) -> str:
    """Where an operating point's threshold was chosen, as words after "on the" (records without it: validation)."""
    return op.get("chosen_on") or CHOSEN_ON["val"]


def calibration_phrase(meta: dict) -> str:
    """How a bundle's probabilities were calibrated, as a sentence for pages and reports."""
    cal = meta.get("calibration") or {}
    method, t = cal.get("method", ""), cal.get("temperature", 1.0)
    if method.startswith("none") or not cal:
        return "Probabilities are the model's softmax, not calibrated."
    where = CHOSEN_ON["calibration"] if "out-of-fold" in method else "the validation split"
    return f"Probabilities are temperature-calibrated on {where} (T = {t:.2f})."


def operating_point(y_val: Sequence[int], p_val: np.ndarray, y_test: Sequence[int], p_test: np.ndarray,
                    positive: int, class_names: Sequence[str], target_sensitivity: float = 0.95,
                    chosen_on: str = "val") -> dict:
    """A threshold on P(positive) chosen on held-out predictions for sensitivity >= target (the highest such
    threshold, so specificity is as high as that allows), with their and test sensitivity / specificity at it.

    p_val, p_test: calibrated probabilities (N, K). Positive vs the rest (e.g. malignant vs benign + normal).
    chosen_on: "val" (the validation split) or "calibration" (the out-of-fold predictions a `--calibration
    inner-cv` bundle keeps, for validation splits of a few patients); the result's "val" entry holds those figures.
    """
    where = CHOSEN_ON[chosen_on]
    pv = np.asarray(p_val)[:, positive]
    yv = np.asarray(y_val) == positive
    if not yv.any():
        raise ValueError(f"The {where} hold no {class_names[positive]} images to set a threshold on.")
    candidates = np.unique(pv[yv])[::-1]  # thresholds at the positives' own probabilities, high to low
    threshold = float(candidates[-1])
    for t in candidates:
        if (pv[yv] >= t).mean() >= target_sensitivity:
            threshold = float(t)
            break
    return {"positive_class": class_names[positive], "target_sensitivity": target_sensitivity,
            "rule": f"the highest threshold on P({class_names[positive]}) whose sensitivity on the {where} is at "
                    f"least {target_sensitivity:.2f} ({class_names[positive]} against every other class)",
            "chosen_on": where, "threshold": threshold,
            "val": sensitivity_specificity(y_val, pv, positive, threshold),
            "test": sensitivity_specificity(y_test, np.asarray(p_test)[:, positive], positive, threshold)}


def format_report(m: dict, class_names: Sequence[str]) -> str:
    """A plain-text summary a person can read."""
    def ci(v):
        return f" [{v[0]:.3f}, {v[1]:.3f}]" if v else ""
    lines = [f"n = {m['n']}",
             f"accuracy        {m['accuracy']:.3f}{ci(m['accuracy_ci95'])}",
             f"ROC AUC (macro) {m['roc_auc_macro']:.3f}{ci(m['roc_auc_ci95'])}" if m["roc_auc_macro"] is not None
             else "ROC AUC (macro) n/a",
             f"PR AUC (macro)  {m['pr_auc_macro']:.3f}" if m["pr_auc_macro"] is not None else "PR AUC n/a",
             f"Cohen's kappa   {m['cohen_kappa']:.3f}", f"ECE             {m['ece']:.3f}", "",
             f"{'class':<22}{'prec':>6}{'recall':>8}{'spec':>7}{'f1':>7}{'TP':>5}{'TN':>5}{'FP':>5}{'FN':>5}{'n':>5}"]
    for r in m["per_class"]:
        lines.append(f"{r['class']:<22}{r['precision']:>6.3f}{r['recall']:>8.3f}{r['specificity']:>7.3f}"
                     f"{r['f1']:>7.3f}{r['tp']:>5}{r['tn']:>5}{r['fp']:>5}{r['fn']:>5}{r['support']:>5}")
    lines.append(f"{'macro avg':<22}{m['macro_avg']['precision']:>6.3f}{m['macro_avg']['recall']:>8.3f}"
                 f"{'':>7}{m['macro_avg']['f1-score']:>7.3f}")
    lines += ["", "confusion matrix (rows = true, columns = predicted): " + ", ".join(class_names)]
    lines += ["  " + " ".join(f"{v:>5}" for v in row) for row in m["confusion_matrix"]]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.evaluation",
                                 description="Metrics of a checkpoint from its saved predictions.csv.")
    ap.add_argument("checkpoint", help="bundle folder, e.g. checkpoints/busi_densenet121")
    ap.add_argument("--split", default="test", help="val, test, or external:<name> (a recorded external check)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--without-near-duplicates", action="store_true",
                    help="leave out images with a near-duplicate (repeat scan) in another split; needs the dataset")
    ap.add_argument("--data-dir", default=None, help="dataset folder, if not where metadata.json says")
    ap.add_argument("--compare", default=None, metavar="OTHER_BUNDLE",
                    help="another checkpoint trained on the same split (e.g. the simple CNN baseline): its metrics on "
                         "the same images; with --record stored as metadata.json['comparison'] for the model card")
    ap.add_argument("--operating-point", default=None, metavar="CLASS",
                    help="choose a threshold on P(CLASS) on validation for --sensitivity (CLASS against the rest) and "
                         "report test sensitivity and specificity at it; with --record stored for the model card")
    ap.add_argument("--sensitivity", type=float, default=0.95, help="with --operating-point: target sensitivity")
    ap.add_argument("--choose-on", default="val", choices=sorted(CHOSEN_ON),
                    help="with --operating-point: choose the threshold on the validation split (default) or on the "
                         "out-of-fold predictions a --calibration inner-cv bundle keeps (calibration_predictions.csv)")
    ap.add_argument("--record", action="store_true",
                    help="with --without-near-duplicates, --compare or --operating-point: also store the result in "
                         "metadata.json (atomically)")
    args = ap.parse_args(argv)
    from core.checkpoints import read_metadata
    from core.errors import BreastXAIError

    try:
        meta = read_metadata(args.checkpoint)
        y, p, _ = predictions_from_bundle(args.checkpoint, args.split)
        if len(y) == 0:
            print(f"error: {args.checkpoint} has no predictions for split {args.split!r}", file=sys.stderr)
            return 2
        audit = near_duplicate_audit(args.checkpoint, args.split, args.data_dir) if args.without_near_duplicates \
            else None
    except (BreastXAIError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.operating_point:
        names = list(meta["class_names"])
        if args.operating_point not in names:
            print(f"error: {args.operating_point!r} is not one of {names}", file=sys.stderr)
            return 2
        try:
            yv, pv, _ = predictions_from_bundle(args.checkpoint, args.choose_on)
            yt, pt, _ = predictions_from_bundle(args.checkpoint, "test")
            op = operating_point(yv, pv, yt, pt, names.index(args.operating_point), names, args.sensitivity,
                                 chosen_on=args.choose_on)
        except (ValueError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.record:
            from core.checkpoints import update_metadata

            update_metadata(args.checkpoint, {"operating_point": op})
        print(json.dumps(op, indent=2) if args.json else "\n".join(
            [f"threshold P({op['positive_class']}) >= {op['threshold']:.4f} ({op['rule']})"] +
            [f"{'chosen on' if s == 'val' else s}: sensitivity {op[s]['sensitivity']:.3f} ({op[s]['tp']}/{op[s]['tp'] + op[s]['fn']}), specificity "
             f"{op[s]['specificity']:.3f} ({op[s]['tn']}/{op[s]['tn'] + op[s]['fp']})" for s in ("val", "test")]))
        return 0
    if args.compare:
        if args.split not in ("val", "test"):
            print("error: --compare works on the val or test split", file=sys.stderr)
            return 2
        try:
            comp = compare_bundles(args.checkpoint, args.compare)
        except (BreastXAIError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.record:
            from core.checkpoints import update_metadata

            update_metadata(args.checkpoint, {"comparison": comp})
        mine = classification_metrics(y, p, meta["class_names"], n_boot=0)
        for label, mm in ((Path(args.checkpoint).name, mine), (comp["name"], comp["metrics"][args.split])):
            print(f"{label}: balanced accuracy {mm['balanced_accuracy']:.3f}, ROC AUC {mm['roc_auc_macro']:.3f}, "
                  f"accuracy {mm['accuracy']:.3f} ({args.split}, n = {mm['n']})")
        return 0
    if audit is not None:
        if args.record:
            from core.checkpoints import update_metadata

            update_metadata(args.checkpoint, {"near_duplicate_audit": audit})
        print(json.dumps(audit, indent=2) if args.json else
              f"{audit['n_excluded']} of {audit['n_split']} {args.split} images left out (near-duplicate in "
              f"another split: {audit['excluded_by_class']})\n" + format_report(audit["metrics"], meta["class_names"]))
        return 0
    m = classification_metrics(y, p, meta["class_names"])
    print(json.dumps(m, indent=2) if args.json else format_report(m, meta["class_names"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
