"""python -m core.explain.evaluate CHECKPOINT: score every method on the checkpoint's test images.

Also runs the randomisation sanity checks (core.explain.sanity) on a few test images (`--sanity-images`,
`--sanity-only` to add them to an existing file).

Writes `explanations.json` into the bundle: per method the mean and 95% bootstrap interval of
deletion AUC (lower is better), insertion AUC (higher), pointing game, energy in the lesion mask and
IoU of the top-15% region with the mask, mean seconds per image, pairwise agreement between methods
and LIME's seed stability. Only test images with a non-empty lesion mask are used (BUSI: benign and
malignant). Evaluation settings are recorded in the file.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from core.data.manifest import Manifest
from core.data.roots import resolve_data_root
from core.evaluation import mean_ci
from core.explain.base import WEAK_EFFECT_MEANING

DEFAULT_PARAMS = {
    "gradcam": {},
    "gradcam++": {},
    "lime": {"num_samples": 500, "n_segments": 50},
    "shap": {"max_evals": 300},
    "occlusion": {"window": 32, "stride": 32},
    "integrated_gradients": {"steps": 16},
}


#: Lighter LIME / SHAP settings for the sanity checks (13 runs of every method per image on a DenseNet121).
SANITY_PARAMS = {"lime": {"num_samples": 300}, "shap": {"max_evals": 200}}


def test_cases(bundle: Path, data_root: Path, limit: Optional[int], seed: int = 0) -> tuple[Manifest, bool]:
    """(test-split manifest of the cases, with_masks): images with a non-empty lesion mask when the dataset has
    masks, else every test image (histopathology sets have none); balanced across classes if `limit` is given.
    Read the cases with `Manifest.read` (it pads IDC edge patches)."""
    from core.checkpoints import read_metadata
    from core.data.roots import bundle_splits
    from core.preprocessing import load_mask

    meta = read_metadata(bundle)
    split = bundle_splits(bundle, meta, str(data_root))["test"]
    with_masks = any(s.mask_paths for s in split.samples)
    cases = [s for s in split.samples if s.mask_paths and load_mask(s.mask_paths).any()] if with_masks else \
        [s for s in split.samples if Path(s.path).is_file()]
    if limit and len(cases) > limit:
        rng = np.random.default_rng(seed)
        by_class: dict[int, list] = {}
        for s in cases:
            by_class.setdefault(s.label, []).append(s)
        for v in by_class.values():
            rng.shuffle(v)
        picked, i = [], 0
        while len(picked) < limit:
            for v in by_class.values():
                if i < len(v) and len(picked) < limit:
                    picked.append(v[i])
            i += 1
        cases = sorted(picked, key=lambda s: s.path)
    return replace(split, samples=tuple(cases)), with_masks


def case_scores(clf, image: np.ndarray, mask: Optional[np.ndarray], methods: Sequence[str], steps: int
                ) -> tuple[dict, dict]:
    """One test image: per method its run time, deletion / insertion AUC and (with a lesion mask) localisation
    scores, all at the model's work resolution -> ({method: {metric: value}}, {method: work-resolution map})."""
    from core.explain import explain
    from core.explain import metrics as M
    from core.preprocessing import resize

    predict = lambda x: clf.predict_work(np.asarray(x))  # noqa: E731
    work = clf.work_image(image)
    work_mask = resize(mask.astype(np.uint8), work.shape[:2]) > 0 if mask is not None else None
    scores, maps = {}, {}
    for m in methods:
        e = explain(clf, image, m, **DEFAULT_PARAMS.get(m, {}))
        a = resize(e.attribution, work.shape[:2])
        maps[m] = a
        r = {"seconds": e.seconds, "deletion_auc": M.deletion_auc(predict, work, a, e.target, steps),
             "insertion_auc": M.insertion_auc(predict, work, a, e.target, steps)}
        if work_mask is not None:
            r.update(pointing_game=M.pointing_game(a, work_mask), energy_in_mask=M.energy_in_mask(a, work_mask),
                     mask_iou_top15=M.mask_iou(a, work_mask, 15))
        if e.perturbed_range is not None:  # perturbation methods: 1 when the map ranks effects under one point
            r["weak_effect"] = float(e.weak_effect)
        scores[m] = r
    return scores, maps


def _ray_case_scores(bundle: Path, cases: Manifest, with_masks: bool, methods, steps: int, address: str,
                     workers: int):
    """`case_scores` of every case on Ray actors (`core.batch.ray_map`: each loads the checkpoint once), in case order."""
    from core.batch import ray_map

    def score(clf, i: int):
        from core.preprocessing import load_mask

        s = cases.samples[i]
        image = cases.read(s)
        mask = load_mask(s.mask_paths, image.shape[:2]) if with_masks else None
        return case_scores(clf, image, mask, methods, steps)

    return ray_map(bundle, score, range(len(cases)), address, workers)


def evaluate(bundle: str | Path, methods: Optional[Sequence[str]] = None, limit: Optional[int] = 24,
             data_dir: Optional[str] = None, steps: int = 20, stability_images: int = 3, stability_seeds: int = 3,
             log=print, address: Optional[str] = None, workers: int = 2) -> dict:
    """Score every method on the checkpoint's test cases; `address` ("local", "auto" or ray://HOST:10001) spreads
    the cases over Ray actors (`workers` of them when Ray starts here) with the same numbers as the serial run."""
    from core.backends import machine_summary
    from core.checkpoints import load_classifier
    from core.explain import EXPLAINERS, explain
    from core.explain import metrics as M
    from core.preprocessing import load_mask

    bundle = Path(bundle)
    clf = load_classifier(bundle)
    methods = list(methods or EXPLAINERS)
    root = resolve_data_root(clf.metadata, bundle, data_dir)
    cases, with_masks = test_cases(bundle, root, limit)
    if not cases:
        raise ValueError(f"No test images under {root}; is the dataset available?")
    mask_keys = ("pointing_game", "energy_in_mask", "mask_iou_top15") if with_masks else ()
    per: dict[str, dict[str, list]] = {m: {k: [] for k in ("deletion_auc", "insertion_auc", *mask_keys,
                                                            "seconds")} for m in methods}
    agree: dict[tuple, list] = {}
    t_all = time.time()

    def serial():
        for c in cases.samples:
            image = cases.read(c)
            yield case_scores(clf, image, load_mask(c.mask_paths, image.shape[:2]) if with_masks else None,
                              methods, steps)

    results = serial() if address is None else _ray_case_scores(bundle, cases, with_masks, methods, steps, address,
                                                                workers)
    for i, (case, (scores, maps)) in enumerate(zip(cases.samples, results)):
        for m in methods:
            for k, v in scores[m].items():
                per[m].setdefault(k, []).append(v)
        for a_i, ma in enumerate(methods):
            for mb in methods[a_i + 1:]:
                agree.setdefault((ma, mb), []).append(M.agreement(maps[ma], maps[mb]))
        log(f"[{i + 1}/{len(cases)}] {Path(case.path).name}: " + ", ".join(
            f"{m} {per[m]['seconds'][-1]:.1f}s" for m in methods))
    stability = {}
    if "lime" in methods and stability_images > 0:
        vals = []
        for case in cases.samples[:stability_images]:
            image = cases.read(case)
            runs = [explain(clf, image, "lime", **{**DEFAULT_PARAMS["lime"], "random_seed": sd}).attribution
                    for sd in range(stability_seeds)]
            st = M.seed_stability(runs)["stability"]
            if st is not None:  # empty maps have no stability to report
                vals.append(st)
        stability["lime"] = {**mean_ci(vals), "seeds": stability_seeds, "images": len(vals)}
    result = {
        "checkpoint": bundle.name,
        "model_sha256": clf.metadata.get("model_sha256"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "images": {"n": len(cases), "split": "test", "with_masks": with_masks,
                   "selection": ("test images with a non-empty lesion mask, balanced across classes" if with_masks
                                 else "test images (the dataset has no lesion masks: localisation scores are not "
                                      "computed), balanced across classes"), "classes": {c: sum(x.class_name == c for x in cases)
                                                          for c in clf.class_names}},
        "machine": {**machine_summary(), "forward": clf.backend_info.get("backend", clf.backend),
                    "perturbation_forward": clf.perturbation + (
                        f" for {', '.join(clf.perturbation_methods)}; float32 for the other methods"
                        if clf.perturbation_methods is not None else ""),
                    **({"ray": f"this machine started the run; the seconds are the Ray workers' ({address})"}
                       if address else {})},
        "settings": {"params": {m: DEFAULT_PARAMS.get(m, {}) for m in methods}, "curve_steps": steps,
                     "curve_baseline": "blur", "top_k_percent": 15, "resolution": "work image (model input; the tile grid for patch models)",
                     "target": "predicted class"},
        "metrics_help": {"deletion_auc": "lower is better", "insertion_auc": "higher is better",
                         "pointing_game": "share of images whose attribution maximum is inside the lesion",
                         "energy_in_mask": "share of positive attribution inside the lesion",
                         "mask_iou_top15": "IoU of the top-15% region with the lesion",
                         "weak_effect": f"share of images where {WEAK_EFFECT_MEANING} (lower is better)"},
        "methods": {m: {k: mean_ci(v) for k, v in per[m].items()} for m in methods},
        "agreement": [{"a": a, "b": b, "iou_top15": mean_ci([x["iou_top"] for x in v]),
                       "spearman": mean_ci([x["spearman"] for x in v])} for (a, b), v in agree.items()],
        "seed_stability": stability,
        "wall_seconds": round(time.time() - t_all, 1),
    }
    return result


def sanity(bundle: str | Path, methods: Optional[Sequence[str]] = None, n_images: int = 2,
           data_dir: Optional[str] = None, seed: int = 0, log=print) -> dict:
    """Model-parameter randomisation and random-logit checks (core.explain.sanity) on `n_images` test images,
    balanced across classes, with the evaluation's method settings (LIME and SHAP lighter: SANITY_PARAMS)."""
    from core.checkpoints import load_classifier
    from core.explain import EXPLAINERS
    from core.explain.sanity import SanityConfig, sanity_checks

    bundle = Path(bundle)
    clf = load_classifier(bundle)
    methods = tuple(methods or EXPLAINERS)
    cases, _ = test_cases(bundle, resolve_data_root(clf.metadata, bundle, data_dir), n_images, seed)
    images = [cases.read(s) for s in cases.samples]
    t0, last = time.time(), [0.0]

    def progress(f: float) -> None:
        if f - last[0] >= 0.1 or f >= 1.0:
            last[0] = f
            log(f"sanity checks {f:.0%} ({time.time() - t0:.0f} s)")

    params = {m: {**DEFAULT_PARAMS.get(m, {}), **SANITY_PARAMS.get(m, {})} for m in methods}
    cfg = SanityConfig(methods=methods, params=params, seed=seed)
    res = sanity_checks(clf, images, cfg, progress)
    res["images"] = [os.path.relpath(s.path, cases.root) for s in cases.samples]
    res["model_sha256"] = clf.metadata.get("model_sha256")
    res["wall_seconds"] = round(time.time() - t0, 1)
    return res


def kept_sanity(path: Path, model_sha256: Optional[str]) -> dict:
    """{"sanity": ...} from an earlier explanations.json at `path` when its checks were run on the same model file
    (same sha256), else {}: re-scoring the methods with `--sanity-images 0` keeps checks that still hold."""
    try:
        old = json.loads(Path(path).read_text()).get("sanity")
    except (OSError, ValueError):
        return {}
    if not old or model_sha256 is None or old.get("model_sha256") != model_sha256:
        return {}
    return {"sanity": old}


def write_result(bundle: Path, result: dict) -> Path:
    out = Path(bundle) / "explanations.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from core.explain import EXPLAINERS
    from core.errors import BreastXAIError

    ap = argparse.ArgumentParser(prog="python -m core.explain.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--methods", nargs="+", default=None, choices=sorted(EXPLAINERS))
    ap.add_argument("--limit", type=int, default=24, help="number of test images (0: all with masks)")
    ap.add_argument("--data-dir", default=None, help="dataset root if not where metadata.json says")
    ap.add_argument("--steps", type=int, default=20, help="deletion/insertion curve steps")
    ap.add_argument("--address", default=None, help="spread the test images over Ray: 'local' (start Ray here), "
                    "'auto' or ray://HOST:10001 (join a cluster)")
    ap.add_argument("--workers", type=int, default=2, help="Ray actors when --address local")
    ap.add_argument("--sanity-images", type=int, default=2,
                    help="test images for the randomisation sanity checks (0: skip them, keeping those "
                    "already recorded for the same model file)")
    ap.add_argument("--sanity-only", action="store_true",
                    help="only (re)run the sanity checks and add them to the existing explanations.json")
    args = ap.parse_args(argv)
    bundle = Path(args.checkpoint)
    try:
        if args.sanity_only:
            old = bundle / "explanations.json"
            result = json.loads(old.read_text()) if old.is_file() else {"checkpoint": bundle.name, "methods": {}}
        else:
            result = evaluate(bundle, args.methods, args.limit or None, args.data_dir, args.steps,
                              address=args.address, workers=args.workers)
        if args.sanity_images > 0:
            result["sanity"] = sanity(bundle, args.methods, args.sanity_images, args.data_dir)
        elif not args.sanity_only:
            result.update(kept_sanity(bundle / "explanations.json", result.get("model_sha256")))
    except (BreastXAIError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = write_result(bundle, result)
    for m, r in result.get("sanity", {}).get("methods", {}).items():
        verdict = {True: "pass", False: "FAIL", None: "undefined"}[r["passed"]]
        print(f"sanity {m:<22} {verdict:<9} {r['note']}")
    if args.sanity_only:
        print(f"written {path}")
        return 0
    for m, r in result["methods"].items():
        local = (f"point {r['pointing_game']['mean']:.2f}  energy {r['energy_in_mask']['mean']:.2f}  "
                 f"iou {r['mask_iou_top15']['mean']:.2f}  ") if "pointing_game" in r else ""
        print(f"{m:<22} del {r['deletion_auc']['mean']:.3f}  ins {r['insertion_auc']['mean']:.3f}  {local}"
              f"{r['seconds']['mean']:.2f} s/img")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
