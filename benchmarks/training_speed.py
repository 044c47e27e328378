#!/usr/bin/env python
"""Fine-tuning phase: cached-trunk training vs a plain `model.fit` of the same model and data.

    python benchmarks/training_speed.py [--images 128] [--epochs 3] [--fine-tune-layers 114]

All runs use core.training.fit_model with the same config (DenseNet121 from ../shared/weights,
224 px, BUSI images, augmentation on), differing only in `cache` and `precision`: plain float32
`model.fit` (the reference), cached float32, and cached with oneDNN bfloat16 mixed precision
(`train.py --precision bfloat16`, skipped on CPUs without native bfloat16). Reported per epoch: the median of
epochs 2..n (epoch 1 includes graph tracing), and for the cached path also the one-off cost of
building the activation cache amortised over the epochs. Prints ratios measured in this one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/busi/Dataset_BUSI_with_GT"))
    ap.add_argument("--weights", default=str(ROOT.parent / "shared/weights/densenet121_imagenet_notop.weights.h5"))
    ap.add_argument("--images", type=int, default=128, help="training images")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--fine-tune-layers", type=int, default=286, help="286 = DenseNet121 conv4+conv5, as committed")
    ap.add_argument("--augment-copies", type=int, default=6)
    ap.add_argument("--amortise-over", type=int, default=None,
                    help="epochs to spread the cache cost over (default: the committed checkpoint's epoch count)")
    args = ap.parse_args()

    import numpy as np

    from core.data import load_busi
    from core.models import ModelConfig, build_model
    from core.training import TrainConfig, cpu_has_bf16, fit_model, load_arrays, set_seeds

    m = load_busi(args.data_dir, near_duplicates=False)  # random images, no split: repeat-scan groups unused
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(m))
    train_m, val_m = m.subset(idx[:args.images]), m.subset(idx[args.images:args.images + 32])
    xt, yt = load_arrays(train_m, 224)
    xv, yv = load_arrays(val_m, 224)
    cfg = TrainConfig(backbone="densenet121", weights=args.weights, head_epochs=0,
                      fine_tune_epochs=args.epochs, fine_tune_layers=args.fine_tune_layers, patience=100,
                      augment_copies=args.augment_copies, verbose=0)
    runs = [("plain model.fit", False, "float32"), ("cached", True, "float32")]
    if cpu_has_bf16():
        runs.append(("cached + bfloat16", True, "bfloat16"))
    else:
        print("This CPU has no native bfloat16: the bfloat16 run is skipped.")
    results = {}
    for label, cache, precision in runs:
        set_seeds(0)
        model, _ = build_model(ModelConfig(backbone="densenet121", num_classes=3, input_size=224,
                                           weights=args.weights))
        t0 = time.perf_counter()
        _, timing = fit_model(model, replace(cfg, cache=cache, precision=precision), xt, yt, xv, yv,
                              num_classes=3)
        total = time.perf_counter() - t0
        ep = timing["phases"][-1]["epoch_seconds"]
        steady = statistics.median(ep[1:]) if len(ep) > 1 else ep[0]
        results[label] = {"epoch": steady, "cache": timing.get("cache_seconds", 0.0), "total": total}
        print(f"{label}: epochs {', '.join(f'{s:.1f}' for s in ep)} s; steady epoch {steady:.2f} s; "
              f"cache build {results[label]['cache']:.1f} s; total {total:.1f} s", flush=True)
    plain = results["plain model.fit"]
    n_amort = args.amortise_over or committed_epochs(ROOT / "checkpoints/busi_densenet121")
    print(f"\nimages {args.images}, fine-tune layers {args.fine_tune_layers}, augmented copies {args.augment_copies}")
    figures = {"images": args.images, "epochs": args.epochs, "amortised_over": n_amort,
               "plain_epoch_s": round(plain["epoch"], 2)}
    for label, r in results.items():
        if r is plain:
            continue
        amortised = r["epoch"] + r["cache"] / n_amort
        print(f"{label}: speed-up per fine-tuning epoch (plain / this) {plain['epoch'] / r['epoch']:.1f}x; "
              f"with the cache cost spread over {n_amort} epochs {plain['epoch'] / amortised:.1f}x")
        key = label.replace(" + ", "_").replace(" ", "_")
        figures.update({f"{key}_epoch_s": round(r["epoch"], 2), f"{key}_cache_s": round(r["cache"], 1),
                        f"{key}_speedup": round(plain["epoch"] / r["epoch"], 2),
                        f"{key}_speedup_amortised": round(plain["epoch"] / amortised, 2)})
    print(json.dumps(figures))
    return 0


def committed_epochs(bundle: Path, default: int = 50) -> int:
    """Fine-tuning epochs of the committed checkpoint's recipe: its own count, for an ensemble (which records 0:
    it trains nothing itself) its longest member's configured fine-tuning schedule; `default` if unreadable."""
    from core.checkpoints import read_metadata

    try:
        meta = read_metadata(bundle)
    except Exception:
        return default
    epochs = int(meta.get("training", {}).get("epochs") or 0)
    members = [int(m.get("config", {}).get("fine_tune_epochs") or 0) for m in meta.get("ensemble", {}).get("members", [])]
    return epochs or max(members, default=0) or default


if __name__ == "__main__":
    raise SystemExit(main())
