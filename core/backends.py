"""Inference backends for the forward pass of perturbation methods: Keras or OpenVINO.

`benchmarks/inference_backends.py` on this 2-core CPU (DenseNet121, BUSI test set): OpenVINO float32
is 1.34x faster than the float32 Keras graph with identical predictions (max |Δp| 0.0000), so 'auto'
uses it. OpenVINO bfloat16 (AMX) is 5.8x faster but moves probabilities by up to 0.044 on real test
images (no predicted class changed): above the 0.01 agreement rule, so it is opt-in only
('openvino-bf16'). The converted model is cached on disk by the model file's sha256 and used only
after a self-check against Keras on probe images (`MAX_DP`). Gradients (Grad-CAM, integrated
gradients) always use the Keras model.

Perturbation explainers (LIME, SHAP, occlusion) may run their perturbed copies on OpenVINO bfloat16 where the
explanations agree with float32 on a fixed set of validation images (`perturbation_agreement`: Spearman rank
correlation of the attributions >= 0.95 for every method and image, and LIME's top-5 superpixels unchanged).
`python -m core.backends CHECKPOINT --record` runs the check once per model and records it in the bundle as
`fast_forward.json` (tied to the model's sha256); `load_classifier` then uses bfloat16 for perturbations only.
The displayed prediction always comes from the float32 forward pass.
"""
from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

log = logging.getLogger("breastxai.backends")

#: Largest accepted |Δp| between a backend and float32 Keras on the self-check probes.
MAX_DP = 0.01
BACKENDS = ("auto", "keras", "openvino", "openvino-bf16")
#: Infer requests per compiled model (concurrent batches from different sessions).
REQUEST_POOL = 4
#: Images per OpenVINO inference call. Smaller calls ran faster on the 2-core CPU here (DenseNet121, float32, ms per
#: image: 15.2 at 8, 15.8 at 16, 16.1 at 32, 17.0 at 64); LIME 300 on busi_densenet121 took 4.7-4.8 s instead of 5.2-5.5.
OV_BATCH = 8
#: OpenVINO's performance hint for forward passes that mostly see one image (predictions, out-of-distribution features,
#: lesion maps): one stream on every core.
OV_HINT = "LATENCY"
#: The hint for the bfloat16 perturbation forward pass, which sees batches of hundreds: one stream per core group (2
#: single-core streams here), a batch of several OV_BATCH calls spread over free infer requests, one per stream. 296
#: bfloat16 images on busi_densenet121 took 3.72-3.80 s against 3.88-3.91 s with LATENCY, and four such batches at once
#: 14.5-15.3 s against 16.7-17.0 s; a single image waits on one stream (46 against 26 ms), hence not for predictions.
BATCH_HINT = "THROUGHPUT"


#: CPU features that decide how fast a forward pass runs here; bfloat16 runs natively with either of BF16_FEATURES.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
BF16_FEATURES = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[Optional[str], frozenset]:
    """(model name or None, flags) of the first CPU in /proc/cpuinfo (Linux); (None, empty) elsewhere."""
    cpu, flags = None, frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu is None:
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return cpu, flags


def cpu_has_bf16() -> bool:
    """True where the CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere it would be emulated."""
    return any(f in _cpuinfo()[1] for f in BF16_FEATURES)


def machine_summary() -> dict:
    """Where timings were taken: {"platform", "cpu" (model name or null), "cores", "cpu_features"} (Linux reads
    /proc/cpuinfo; elsewhere cpu and features stay empty). Seconds recorded beside it mean little without it."""
    import platform

    cpu, flags = _cpuinfo()
    return {"platform": platform.platform(), "cpu": cpu or platform.processor() or None, "cores": os.cpu_count(),
            "cpu_features": [f for f in CPU_FEATURES if f in flags]}


def warm(key: Optional[str]) -> Optional[tuple[int, int]]:
    """(input side, outputs) of model sha256 `key` when its converted model and Keras probe outputs are cached (then
    OpenVINO can predict before TensorFlow is even imported), else None."""
    import json

    if not key or not (cache_dir() / f"{key}.xml").is_file():
        return None
    try:
        rec = json.loads((cache_dir() / f"{key}.keras-probe.json").read_text())
        return int(rec["input_size"]), int(np.asarray(rec["probs"]).shape[1])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def cache_dir() -> Path:
    base = os.environ.get("BREASTXAI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "breastxai")
    return Path(base) / "openvino"


def requested_backend(explicit: Optional[str] = None) -> str:
    """explicit, else $BREASTXAI_BACKEND, else 'auto'."""
    name = (explicit or os.environ.get("BREASTXAI_BACKEND") or "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    return name


def openvino_forward(model, input_size: int, key: Optional[str], precision: str = "f32", hint: str = OV_HINT
                     ) -> Callable[[np.ndarray], np.ndarray]:
    """Compile `model` (float32 (N, S, S, 3) -> (N, K)) with OpenVINO; returns f(batch) -> np.ndarray.

    `model` is a Keras model or a function returning one, called only when the converted model is not cached yet.
    `key` (the model file's sha256) names the cached IR; None converts without caching.
    """
    import openvino as ov

    xml = cache_dir() / f"{key}.xml" if key else None
    cached_ir = xml is not None and xml.is_file()
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint}
    compiled = None
    if cached_ir:
        # OpenVINO's own cache of compiled models (keyed by the model, this config, the CPU and OpenVINO's version):
        # a warm start imports the compiled blob instead of compiling the IR again (0.12 against 0.46 s for
        # busi_densenet121 on this 2-core CPU), on the path to the first prediction and the first explanation.
        try:
            blobs = cache_dir() / "compiled"
            blobs.mkdir(parents=True, exist_ok=True)  # OpenVINO caches nothing into a folder that does not exist
            core = ov.Core()
            core.set_property({"CACHE_DIR": str(blobs)})
            compiled = core.compile_model(str(xml), "CPU", config)
        except Exception as exc:  # an unwritable cache or a damaged blob: compile without the cache
            log.info("OpenVINO compiled-model cache not used (%s)", exc)
    if compiled is None:
        core = ov.Core()
        if cached_ir:
            om = core.read_model(str(xml))
        else:
            import tensorflow as tf

            keras_model = model if hasattr(model, "layers") else model()
            fn = tf.function(lambda v: keras_model(v, training=False), autograph=False)
            om = ov.convert_model(fn.get_concrete_function(tf.TensorSpec([None, input_size, input_size, 3],
                                                                         tf.float32)))
            if xml is not None:
                try:
                    xml.parent.mkdir(parents=True, exist_ok=True)
                    tmp = xml.with_name(f".{xml.stem}-{os.getpid()}.xml")
                    ov.save_model(om, str(tmp), compress_to_fp16=False)
                    os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
                    os.replace(tmp, xml)
                except OSError as exc:  # a read-only home is not an error: convert again next time
                    log.info("OpenVINO model not cached (%s)", exc)
        compiled = core.compile_model(om, "CPU", config)
    # A pool of infer requests: concurrent sessions (Streamlit threads, REST workers) each take one per batch
    # instead of queueing behind one lock; a request is held for one batch, never for a whole explanation.
    pool: queue.Queue = queue.Queue()
    for _ in range(REQUEST_POOL):
        pool.put(compiled.create_infer_request())
    try:
        streams = max(1, int(compiled.get_property("NUM_STREAMS")))
    except Exception:  # a plugin without the property: one stream
        streams = 1
    output = compiled.output(0)

    def run(request, x: np.ndarray, starts: Iterator[int], out: dict, lock: threading.Lock, errors: list) -> None:
        try:
            while not errors:
                with lock:
                    i = next(starts, None)
                if i is None:
                    return
                out[i] = np.array(request.infer({0: x[i:i + OV_BATCH]})[output], np.float32)
        except Exception as exc:  # re-raised in the caller's thread
            errors.append(exc)

    def forward(batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if len(x) == 0:  # OpenVINO refuses a zero batch
            return np.zeros((0, output.get_partial_shape()[-1].get_length()), np.float32)
        starts = range(0, len(x), OV_BATCH)
        requests = [pool.get()]
        try:
            # More streams: also take requests that are free right now (never wait for a second one, so a busy
            # pool or a pool of one still serves the batch), each pulling the next OV_BATCH chunk until none is left.
            while len(requests) < min(streams, len(starts)):
                try:
                    requests.append(pool.get_nowait())
                except queue.Empty:
                    break
            out: dict = {}
            it, lock, errors = iter(starts), threading.Lock(), []
            helpers = [threading.Thread(target=run, args=(r, x, it, out, lock, errors), daemon=True)
                       for r in requests[1:]]
            for t in helpers:
                t.start()
            try:
                run(requests[0], x, it, out, lock, errors)
            finally:  # no request goes back to the pool while a helper may still use it
                for t in helpers:
                    t.join()
            if errors:
                raise errors[0]
            return np.concatenate([out[i] for i in starts])
        finally:
            for r in requests:
                pool.put(r)

    forward.pool = pool  # type: ignore[attr-defined]  (tests and diagnostics)
    forward.streams = streams  # type: ignore[attr-defined]
    return forward


def keras_reference(keras_forward: Callable[[np.ndarray], np.ndarray], probe: np.ndarray,
                    key: Optional[str]) -> np.ndarray:
    """Keras probabilities for the probe images, stored beside the cached IR (same model sha256, same
    probes -> same numbers), so a warm start skips tracing the Keras graph just for the self-check."""
    import json

    ref = cache_dir() / f"{key}.keras-probe.json" if key else None
    out = None
    if ref is not None and ref.is_file():
        try:
            rec = json.loads(ref.read_text())
            out = np.asarray(rec["probs"], np.float32)
            if out.shape[0] == len(probe) and "input_size" in rec:
                return out
            out = out if out.shape[0] == len(probe) else None  # an older record: rewritten with the input size
        except (OSError, ValueError, KeyError):
            out = None
    if out is None:
        out = np.asarray(keras_forward(probe), np.float32)
    if ref is not None:
        try:
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f".{ref.name}-{os.getpid()}")
            tmp.write_text(json.dumps({"probs": out.tolist(), "input_size": int(probe.shape[1])}))
            os.replace(tmp, ref)
        except OSError:
            pass
    return out


def _verification(key: str, precision: str) -> tuple[Path, dict]:
    import openvino as ov

    return (cache_dir() / f"{key}.{precision}.verified.json",
            {"openvino": ov.__version__, "device": ov.Core().get_property("CPU", "FULL_DEVICE_NAME"),
             "precision": precision})


def verified_earlier(key: Optional[str], precision: str) -> Optional[float]:
    """The probe |Δp| recorded when this cached IR last passed the self-check against Keras with this OpenVINO
    version, CPU and precision (the check is deterministic for the same IR, runtime and CPU), else None. A warm
    start then skips the 8 probe images (0.37 s for busi_densenet121, twice with its feature model)."""
    import json

    if not key:
        return None
    try:
        path, who = _verification(key, precision)
        rec = json.loads(path.read_text())
        if {k: rec.get(k) for k in who} == who and float(rec["max_dp"]) <= MAX_DP:
            return float(rec["max_dp"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def record_verified(key: Optional[str], precision: str, dp: float) -> None:
    """Remember that the cached IR of `key` passed the self-check here (see `verified_earlier`)."""
    import json

    if not key:
        return
    try:
        path, who = _verification(key, precision)
        tmp = path.with_name(f".{path.name}-{os.getpid()}")
        tmp.write_text(json.dumps({**who, "max_dp": dp}))
        os.replace(tmp, path)
    except OSError:
        pass


def choose_forward(model, input_size: int, keras_forward: Callable[[np.ndarray], np.ndarray],
                   key: Optional[str], backend: str = "auto") -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """The forward pass to use and a report {'backend', 'max_dp_probe', 'reason'}. `model`: a Keras model or a
    function returning one (see `openvino_forward`); with the IR and the Keras probe outputs cached, neither it nor
    `keras_forward` is called.

    'keras' -> keras_forward. 'auto' / 'openvino' -> OpenVINO float32, 'openvino-bf16' -> OpenVINO
    bfloat16, each only if it converts and agrees with Keras within MAX_DP on 8 probe images (random
    textures and flat images); else keras_forward ('auto' falls back, the others raise). A passed check is
    recorded beside the cached IR and not repeated by later loads on the same OpenVINO version and CPU.
    """
    backend = requested_backend(backend)
    if backend == "keras":
        return keras_forward, {"backend": "keras float32", "reason": "requested"}
    precision = "bf16" if backend == "openvino-bf16" else "f32"
    label = f"openvino {'bfloat16' if precision == 'bf16' else 'float32'}"
    try:
        fwd = openvino_forward(model, input_size, key, precision)
        dp = verified_earlier(key, precision)
        if dp is None:
            rng = np.random.default_rng(0)
            probe = np.concatenate([rng.uniform(0, 255, (4, input_size, input_size, 3)),
                                    np.linspace(0, 255, 4)[:, None, None, None]
                                    * np.ones((1, input_size, input_size, 3))]).astype(np.float32)
            dp = float(np.abs(fwd(probe) - keras_reference(keras_forward, probe, key)).max())
            if dp <= MAX_DP:
                record_verified(key, precision, dp)
    except Exception as exc:  # openvino missing, unsupported op: keep Keras
        if backend != "auto":
            raise
        return keras_forward, {"backend": "keras float32", "reason": f"OpenVINO unavailable ({type(exc).__name__}: {exc})"}
    if dp > MAX_DP:
        if backend != "auto":
            raise RuntimeError(f"{label} differs from Keras by {dp:.4f} > {MAX_DP} on the probes")
        return keras_forward, {"backend": "keras float32", "max_dp_probe": dp,
                               "reason": f"{label} differs by {dp:.4f} > {MAX_DP}"}
    return fwd, {"backend": label, "max_dp_probe": dp, "reason": "faster, agrees with float32 Keras"
                 if precision == "f32" else "requested (bfloat16: faster, probabilities may move by a few 0.01)"}


#: The agreement rule for a faster perturbation forward pass.
FAST_RULE = {"spearman_min": 0.95, "lime_top_k": 5, "methods": ("lime", "occlusion", "shap")}
FAST_PARAMS = {"lime": {"num_samples": 1000, "random_seed": 0}, "occlusion": {}, "shap": {"max_evals": 300}}


def agreement_verdict(rows: list[dict], methods) -> dict:
    """FAST_RULE applied to perturbation_agreement's rows, method by method: {"passed": every method agrees,
    "passed_methods": the methods whose every image agrees (those perturb on the fast forward), "rule"}."""
    def ok(r: dict) -> bool:
        return r["spearman"] is not None and r["spearman"] >= FAST_RULE["spearman_min"] and r.get("lime_top5_same", True)

    agreed = [m for m in methods if all(ok(r) for r in rows if r["method"] == m)]
    return {"passed": len(agreed) == len(methods), "passed_methods": agreed,
            "rule": f"Spearman rank correlation of the attributions >= {FAST_RULE['spearman_min']} for every image, "
                    f"and LIME's top-{FAST_RULE['lime_top_k']} superpixels unchanged, same seeds; judged method by "
                    "method: a method that agrees on every image perturbs on the fast forward, the others on float32"}


def perturbation_agreement(clf, images, fast: str = "openvino-bf16", methods=FAST_RULE["methods"],
                           params: Optional[dict] = None, log=print) -> dict:
    """Explain each image with the float32 forward and with `fast`, same seeds; per method the Spearman rank
    correlation of the two attributions, and for LIME whether the top-5 superpixels are the same. Also the
    speed-up of LIME on the first image. Returns the record for fast_forward.json ("passed" by FAST_RULE)."""
    import time
    from dataclasses import replace

    from scipy.stats import spearmanr

    from core.explain import explain

    params = params or FAST_PARAMS
    ref = replace(clf, perturbation="float32", perturbation_methods=None, _perturb_forward=None)
    quick = replace(clf, perturbation=fast, perturbation_methods=None, _perturb_forward=None)
    quick.perturbation_forward()
    if quick.perturbation == "float32":
        return {"backend": fast, "passed": False, "reason": f"{fast} is not available here"}
    rows, times = [], {"float32": [], fast: []}
    for i, img in enumerate(images):
        for m in methods:
            t0 = time.perf_counter()
            a = explain(ref, img, m, **params.get(m, {}))
            t1 = time.perf_counter()
            b = explain(quick, img, m, **params.get(m, {}))
            t2 = time.perf_counter()
            if m == "lime":
                times["float32"].append(t1 - t0)
                times[fast].append(t2 - t1)
            if np.ptp(a.attribution) == 0 and np.ptp(b.attribution) == 0:  # both blank: they agree
                rho = 1.0 if np.allclose(a.attribution, b.attribution) else float("nan")
            else:
                rho = spearmanr(a.attribution.ravel(), b.attribution.ravel()).statistic
            row = {"image": i, "method": m, "spearman": float(rho) if np.isfinite(rho) else None}
            if m == "lime":
                top = lambda e: sorted(sorted(e.extras["segment_weights"], key=lambda k: -e.extras["segment_weights"][k])  # noqa: E731
                                       [:FAST_RULE["lime_top_k"]])
                row["lime_top5_same"] = top(a) == top(b)
            rows.append(row)
            log(f"image {i + 1}/{len(images)} {m}: Spearman {row['spearman']}"
                + (f", top-5 same {row['lime_top5_same']}" if m == "lime" else ""))
    rhos = [r["spearman"] for r in rows]
    return {"backend": fast, **agreement_verdict(rows, methods), "methods": list(methods), "params": params,
            "n_images": len(images), "spearman_min": float(min(r for r in rhos if r is not None)) if any(
                r is not None for r in rhos) else None, "rows": rows,
            "lime_seconds": {k: float(np.median(v)) for k, v in times.items() if v},
            "model_sha256": clf.metadata.get("model_sha256")}


def main(argv=None) -> int:
    """python -m core.backends CHECKPOINT [--images 5] [--record]: the perturbation-forward agreement check."""
    import argparse
    import json

    from core.checkpoints import load_classifier, read_metadata, write_json
    from core.data.roots import bundle_splits

    ap = argparse.ArgumentParser(prog="python -m core.backends", description=main.__doc__)
    ap.add_argument("checkpoint")
    ap.add_argument("--images", type=int, default=5, help="validation images to compare on")
    ap.add_argument("--record", action="store_true", help="write the result into the bundle (fast_forward.json)")
    args = ap.parse_args(argv)
    bundle = Path(args.checkpoint)
    clf = load_classifier(bundle)
    val = bundle_splits(bundle, read_metadata(bundle))["val"]
    step = max(len(val) // max(args.images, 1), 1)
    picks = val.samples[::step][:args.images]
    res = perturbation_agreement(clf, [val.read(s) for s in picks])
    res["images"] = [os.path.relpath(s.path, val.root) for s in picks]
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))
    if args.record:
        write_json(bundle / "fast_forward.json", res)
        print(f"written {bundle / 'fast_forward.json'}")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
