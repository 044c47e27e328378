#!/usr/bin/env python
"""Explainer speed against the inference floor, measured in one run on one image.

    python benchmarks/explainers.py checkpoints/busi_densenet121 [--repeats 2]

Floor: the time per image of the classifier's compiled forward pass at its best batch size.
Each perturbation method is reported as (its time) / (its number of forward passes x floor);
plain lime = LimeImageExplainer with the Keras model's `predict` and lime's default batch_size=10;
Grad-CAM in units of one single-image forward pass. Targets: <= 1.10, <= 0.5, <= 3. `lime_1000_vs_float32`:
LIME 1000 on the default path (bfloat16 perturbations where the bundle's fast_forward.json allows) over the
float32 path, same run (target <= 0.35). Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def pick_image(bundle: Path) -> np.ndarray:
    from core.checkpoints import read_metadata
    from core.data.roots import bundle_splits

    meta = read_metadata(bundle)
    try:
        test = bundle_splits(bundle, meta)["test"]
        return test.read(test.samples[0])
    except Exception:
        return np.random.default_rng(0).integers(0, 255, (400, 500, 3), dtype=np.uint8)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", default=str(ROOT / "checkpoints/busi_densenet121"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--floor-images", type=int, default=256)
    args = ap.parse_args()

    from core.checkpoints import load_classifier
    from core.explain import explain

    bundle = Path(args.checkpoint)
    clf = load_classifier(bundle)
    image = pick_image(bundle)
    s = clf.input_size
    x = np.random.default_rng(0).integers(0, 255, (args.floor_images, s, s, 3), dtype=np.uint8)

    # 1. inference floor at the best batch size
    per_bs = {}
    for bs in (16, 32, 64, 128):
        clf.batch_size = bs
        clf.predict_proba(x[:bs])  # trace
        per_bs[bs] = best_of(lambda: clf.predict_proba(x), args.repeats) / len(x)
    best_bs = min(per_bs, key=per_bs.get)
    clf.batch_size = best_bs
    floor = per_bs[best_bs]
    print("floor, seconds per image by batch size: " + ", ".join(f"{b}: {t * 1000:.1f} ms" for b, t in per_bs.items()))
    print(f"inference floor: {floor * 1000:.2f} ms/image at batch size {best_bs} ({1 / floor:.1f} images/s); "
          f"forward pass: {clf.backend_info.get('backend')} ({clf.backend_info.get('reason')})")

    # 2. perturbation methods as a ratio to the floor for the same number of forward passes
    from dataclasses import replace

    lime_p = {"num_samples": 1000, "random_seed": 0}
    f32 = replace(clf, perturbation="float32", _perturb_forward=None)
    explain(f32, image, "lime", **{**lime_p, "num_samples": 64})  # warm-up
    t_lime = best_of(lambda: explain(f32, image, "lime", **lime_p), args.repeats)
    passes_lime = 1000 + 1  # samples + the prediction of the image itself
    print(f"LIME 1000 samples (float32 perturbations): {t_lime:.2f} s -> {t_lime / (passes_lime * floor):.3f} x floor")
    explain(clf, image, "lime", **{**lime_p, "num_samples": 64})
    t_default = best_of(lambda: explain(clf, image, "lime", **lime_p), args.repeats)
    lime_forward = clf.perturbation if clf.fast_perturbation_allowed("lime") else "float32"
    print(f"LIME 1000 samples, default path (perturbations on {lime_forward}"
          f"{', recorded in fast_forward.json' if lime_forward != 'float32' else ''}): {t_default:.2f} s -> "
          f"lime_1000_vs_float32 = {t_default / t_lime:.3f}")

    clf = f32  # SHAP, occlusion and plain lime: measured on the float32 path, as before
    calls = [0]
    orig = clf.forward

    def counting(batch):  # every forward pass of every method goes through Classifier.forward
        calls[0] += len(batch)
        return orig(batch)

    clf.forward = counting
    e = explain(clf, image, "shap", max_evals=500)
    n_shap = calls[0]
    clf.forward = orig
    t_shap = best_of(lambda: explain(clf, image, "shap", max_evals=500), args.repeats)
    print(f"SHAP 500 evals: {t_shap:.2f} s for {n_shap} forward passes -> {t_shap / (n_shap * floor):.3f} x floor")

    e = explain(clf, image, "occlusion")
    n_occ = e.extras["n_windows"] + 2
    t_occ = best_of(lambda: explain(clf, image, "occlusion"), args.repeats)
    print(f"occlusion ({e.extras['n_windows']} windows): {t_occ:.2f} s -> {t_occ / (n_occ * floor):.3f} x floor")

    # 3. plain lime usage: Keras model.predict, lime's default batch_size=10
    from lime.lime_image import LimeImageExplainer

    import core.explain.lime_explainer as ours

    work = clf.work_image(image)
    from core.explain.lime_explainer import LimeParams, segment
    segs = segment(work, LimeParams())
    import lime.lime_image as li
    li.tqdm = ours._no_bar

    def plain():
        LimeImageExplainer(random_state=0).explain_instance(
            work, lambda imgs: clf.model.predict(np.asarray(imgs, np.float32), verbose=0), top_labels=1,
            num_samples=1000, segmentation_fn=lambda _i: segs)

    t_plain = best_of(plain, 1)
    print(f"plain lime (model.predict, batch_size=10): {t_plain:.2f} s; ours / plain = {t_lime / t_plain:.3f}")

    # 4. Grad-CAM in single-image forward-pass units (Grad-CAM runs on the float32 Keras graph: so does the unit)
    one = clf.prepare(image)[None]
    clf.batch_size = 1
    clf.backend, clf._forward = "keras", None
    clf.forward(one)
    t_one = best_of(lambda: [clf.forward(one) for _ in range(10)], args.repeats) / 10
    explain(clf, image, "gradcam")
    t_cam = best_of(lambda: explain(clf, image, "gradcam"), max(args.repeats, 3))
    print(f"Grad-CAM: {t_cam * 1000:.1f} ms = {t_cam / t_one:.2f} single-image forward passes ({t_one * 1000:.1f} ms)")
    import json

    print(json.dumps({"floor_ms": round(floor * 1000, 2), "lime_1000_s": round(t_lime, 2),
                      "lime_1000_default_s": round(t_default, 2), "lime_1000_vs_float32": round(t_default / t_lime, 3),
                      "perturbation_forward": clf.perturbation, "lime_vs_floor": round(t_lime / (passes_lime * floor), 3),
                      "shap_vs_floor": round(t_shap / (n_shap * floor), 3), "occlusion_vs_floor":
                      round(t_occ / (n_occ * floor), 3), "ours_vs_plain_lime": round(t_lime / t_plain, 3),
                      "gradcam_vs_forward": round(t_cam / t_one, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
