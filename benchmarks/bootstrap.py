#!/usr/bin/env python
"""The ROC AUC bootstrap interval: sklearn's roc_auc_score per resample against the stacked rank sum, in one run.

    python benchmarks/bootstrap.py [--n-boot 500]

For every committed classifier's recorded predictions (test split and, where kept, the cross-validation's
out-of-fold predictions) the 95% interval of the macro ROC AUC by `core.evaluation.bootstrap_ci` two ways, on the
same resamples: sklearn's `roc_auc_score` (`_auc`) called on each resample, and the rank sum of all resamples
stacked (`_ranked_auc_rows`: what `classification_metrics` uses in every `train.py` run, Evaluation's first view of
a split at 500 resamples and the case report). Prints both times, their ratio and the largest difference of the
interval ends; last line: JSON of the figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    from core.checkpoints import list_bundles, read_metadata
    import numpy as np

    from core.evaluation import _auc, _ranked_auc_rows, bootstrap_ci, predictions_file, predictions_from_bundle

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-boot", type=int, default=500, help="resamples (Evaluation: 500; train.py: 1000)")
    args = ap.parse_args()
    figures = {}
    for bundle in list_bundles(ROOT / "checkpoints", kind="classifier"):
        k = len(read_metadata(bundle)["class_names"])
        for split in ("test", "cv"):
            if not predictions_file(bundle, split).is_file():
                continue
            y, p, _ = predictions_from_bundle(bundle, split)
            def sklearn_rows(t, q):  # one roc_auc_score call per resample
                return np.array([np.nan if (a := _auc(ti, qi, k)) is None else a for ti, qi in zip(t, q)])

            times, cis = [], []
            for stat in (sklearn_rows, lambda t, q: _ranked_auc_rows(t, q, k)):
                t0 = time.perf_counter()
                cis.append(bootstrap_ci(y, p, stat, args.n_boot))
                times.append(time.perf_counter() - t0)
            diff = max(abs(a - b) for a, b in zip(*cis)) if None not in cis else None
            key = f"{bundle.name}_{split}"
            figures[key] = {"n": len(y), "sklearn_s": round(times[0], 3), "stacked_s": round(times[1], 3),
                            "speedup": round(times[0] / times[1], 1), "max_interval_difference": diff}
            print(f"{key:34s} n={len(y):4d}  sklearn {times[0]:6.2f} s  stacked rank sum {times[1]:6.3f} s  "
                  f"x{times[0] / times[1]:6.1f}  interval {cis[1]}  max |difference| {diff}")
    print(json.dumps({"n_boot": args.n_boot, "bootstrap_auc": figures}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
