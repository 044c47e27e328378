#!/usr/bin/env python
"""Can the inference floor go lower? float32 Keras vs bfloat16 Keras vs ONNX Runtime vs OpenVINO, in one run.

    python benchmarks/inference_backends.py checkpoints/busi_densenet121 [--images 64]

Speed: images/s on random inputs at batch 32 (best of 2). Agreement: max |Δp| against float32 Keras
over the checkpoint's test images (needs the dataset); a backend is worth adopting only if it is
at least 5% faster AND max |Δp| <= 0.01.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np


def timed(fn, x: np.ndarray, bs: int, repeats: int = 2) -> tuple[float, np.ndarray]:
    fn(x[:bs])
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = np.concatenate([fn(x[i:i + bs]) for i in range(0, len(x), bs)])
        best = min(best, time.perf_counter() - t0)
    return len(x) / best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", default=str(ROOT / "checkpoints/busi_densenet121"))
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import keras
    import tensorflow as tf

    from core.checkpoints import load_classifier
    from core.data.roots import bundle_splits

    clf = load_classifier(args.checkpoint)
    model, s, bs = clf.model, clf.input_size, args.batch_size
    x = np.random.default_rng(0).uniform(0, 255, (args.images, s, s, 3)).astype(np.float32)
    try:
        test = bundle_splits(Path(args.checkpoint), clf.metadata)["test"]
        xt = clf.prepare_batch([test.read(p) for p in test.samples])
    except Exception:
        xt = None
        print("test images not available: agreement measured on random inputs only")

    f32 = tf.function(lambda v: model(v, training=False), autograph=False)
    backends = {"float32 keras": lambda v: f32(v).numpy()}

    def to_bf16(layer):
        cfg = layer.get_config()
        if "dtype" in cfg and layer.name != model.layers[-1].name:
            cfg["dtype"] = "mixed_bfloat16"  # bfloat16 compute, float32 variables; softmax output stays float32
        return layer.__class__.from_config(cfg)

    bf = keras.models.clone_model(model, clone_function=to_bf16)
    bf.set_weights(model.get_weights())
    assert any(getattr(l, "compute_dtype", "") == "bfloat16" for l in bf.layers), "bfloat16 policy not applied"
    fbf = tf.function(lambda v: bf(v, training=False), autograph=False)
    backends["bfloat16 keras"] = lambda v: np.asarray(fbf(v), np.float32)

    try:
        import onnxruntime as ort

        model(x[:1])
        path = Path(tempfile.mkdtemp()) / "model.onnx"
        model.export(str(path), format="onnx", verbose=False)
        so = ort.SessionOptions()
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        input_name = sess.get_inputs()[0].name
        backends["onnxruntime"] = lambda v: sess.run(None, {input_name: np.ascontiguousarray(v)})[0]
    except Exception as exc:  # tf2onnx / onnxruntime missing or export unsupported
        print(f"ONNX Runtime not measured: {type(exc).__name__}: {exc}")

    try:
        from core.backends import openvino_forward

        for prec in ("f32", "bf16"):
            backends[f"openvino {prec}"] = openvino_forward(model, s, None, precision=prec)
    except Exception as exc:
        print(f"OpenVINO not measured: {type(exc).__name__}: {exc}")

    ref_rate, ref_out = timed(backends["float32 keras"], x, bs)
    ref_test = np.concatenate([backends["float32 keras"](xt[i:i + bs]) for i in range(0, len(xt), bs)]) \
        if xt is not None else None
    print(f"float32 keras: {ref_rate:.1f} images/s (reference)")
    for name, fn in backends.items():
        if name == "float32 keras":
            continue
        rate, out = timed(fn, x, bs)
        dp = np.abs(out - ref_out).max()
        line = f"{name}: {rate:.1f} images/s = {rate / ref_rate:.2f}x float32; max |dp| random {dp:.4f}"
        if ref_test is not None:
            o = np.concatenate([fn(xt[i:i + bs]) for i in range(0, len(xt), bs)])
            dpt = np.abs(o - ref_test).max()
            flips = int((o.argmax(1) != ref_test.argmax(1)).sum())
            line += f", test set ({len(xt)} images) {dpt:.4f}, {flips} changed predictions"
            ok = rate >= 1.05 * ref_rate and dpt <= 0.01  # a gain beyond run-to-run noise, same predictions
            line += " -> adopt" if ok else " -> keep float32"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
