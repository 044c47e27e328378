#!/usr/bin/env python
"""Several explanations at once in one process, against one alone, in one run: the server's share of
`benchmarks/dashboard_sessions.py` without browsers or Streamlit.

    python benchmarks/explain_concurrency.py [--checkpoint checkpoints/busi_densenet121] [--threads 4]

Each thread explains its own BUSI image with Grad-CAM and LIME 300 (the Explain page's defaults, `FAST_PARAMS`)
on one shared `Classifier`, as concurrent dashboard sessions do. After a warm-up explanation, one image alone, then
every thread starts at the same moment. `max_vs_single` near the thread count means the shared forward passes
serialise only on the CPU's cores; well above it, on something else. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUSI = ROOT.parent / "shared/data/busi/Dataset_BUSI_with_GT"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints/busi_densenet121"))
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    names = [(c, i) for i in range(101, 110) for c in ("benign", "malignant")][:args.threads + 2]
    paths = [BUSI / c / f"{c} ({i}).png" for c, i in names]
    if not all(p.is_file() for p in paths):
        print(f"needs BUSI images under {BUSI}", file=sys.stderr)
        return 2

    import numpy as np
    from PIL import Image

    from core.checkpoints import load_classifier
    from core.explain import FAST_PARAMS, explain

    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    clf = load_classifier(args.checkpoint)

    def gradcam_lime(image) -> float:
        t0 = time.perf_counter()
        explain(clf, image, "gradcam")
        explain(clf, image, "lime", **FAST_PARAMS["lime"])
        return time.perf_counter() - t0

    gradcam_lime(images[-1])  # warm-up: Grad-CAM's graph, the compiled perturbation forward pass
    single = gradcam_lime(images[-2])
    print(f"one alone: Grad-CAM + LIME 300 in {single:.1f} s (perturbation forward: {clf.perturbation})")
    took: list = [None] * args.threads
    barrier = threading.Barrier(args.threads)

    def run(i: int) -> None:
        barrier.wait()
        took[i] = gradcam_lime(images[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    worst = max(took)
    print(f"{args.threads} at once: each {', '.join(f'{t:.1f}' for t in took)} s; slowest {worst:.1f} s, "
          f"{worst / single:.2f}x one alone")
    print(json.dumps({"checkpoint": Path(args.checkpoint).name, "threads": args.threads,
                      "perturbation": clf.perturbation, "single_s": round(single, 2),
                      "each_s": [round(t, 2) for t in took], "max_s": round(worst, 2),
                      "max_vs_single": round(worst / single, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
