"""Inference backends for the forward pass of perturbation methods: Keras or OpenVINO.

`benchmarks/inference_backends.py` on this 2-core CPU (DenseNet121, BUSI test set): OpenVINO float32
is 1.34x faster than the float32 Keras graph with identical predictions (max |Δp| 0.0000), so 'auto'
uses it. OpenVINO bfloat16 (AMX) is 5.8x faster but moves probabilities by up to 0.044 on real test
images (no predicted class changed): above the 0.01 agreement rule, so it is opt-in only
('openvino-bf16'). The converted model is cached on disk by the model file's sha256 and used only
after a self-check against Keras on probe images (`MAX_DP`). Gradients (Grad-CAM, integrated
gradients) always use the Keras model.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Optional

import numpy as np

log = logging.getLogger("breastxai.backends")

#: Largest accepted |Δp| between a backend and float32 Keras on the self-check probes.
MAX_DP = 0.01
BACKENDS = ("auto", "keras", "openvino", "openvino-bf16")


def cache_dir() -> Path:
    base = os.environ.get("BREASTXAI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "breastxai")
    return Path(base) / "openvino"


def requested_backend(explicit: Optional[str] = None) -> str:
    """explicit, else $BREASTXAI_BACKEND, else 'auto'."""
    name = (explicit or os.environ.get("BREASTXAI_BACKEND") or "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    return name


def openvino_forward(model, input_size: int, key: Optional[str], precision: str = "f32"
                     ) -> Callable[[np.ndarray], np.ndarray]:
    """Compile `model` (float32 (N, S, S, 3) -> (N, K)) with OpenVINO; returns f(batch) -> np.ndarray.

    `key` (the model file's sha256) names the cached IR; None converts without caching.
    """
    import openvino as ov

    core = ov.Core()
    xml = cache_dir() / f"{key}.xml" if key else None
    if xml is not None and xml.is_file():
        om = core.read_model(str(xml))
    else:
        import tensorflow as tf

        fn = tf.function(lambda v: model(v, training=False), autograph=False)
        om = ov.convert_model(fn.get_concrete_function(tf.TensorSpec([None, input_size, input_size, 3], tf.float32)))
        if xml is not None:
            try:
                xml.parent.mkdir(parents=True, exist_ok=True)
                tmp = xml.with_name(f".{xml.stem}-{os.getpid()}.xml")
                ov.save_model(om, str(tmp), compress_to_fp16=False)
                os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
                os.replace(tmp, xml)
            except OSError as exc:  # a read-only home is not an error: convert again next time
                log.info("OpenVINO model not cached (%s)", exc)
    compiled = core.compile_model(om, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                              "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one infer request; Streamlit sessions share the classifier across threads

    def forward(batch: np.ndarray) -> np.ndarray:
        with lock:
            out = request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})
            return np.array(out[compiled.output(0)], dtype=np.float32)

    return forward


def keras_reference(keras_forward: Callable[[np.ndarray], np.ndarray], probe: np.ndarray,
                    key: Optional[str]) -> np.ndarray:
    """Keras probabilities for the probe images, stored beside the cached IR (same model sha256, same
    probes -> same numbers), so a warm start skips tracing the Keras graph just for the self-check."""
    import json

    ref = cache_dir() / f"{key}.keras-probe.json" if key else None
    if ref is not None and ref.is_file():
        try:
            out = np.asarray(json.loads(ref.read_text())["probs"], np.float32)
            if out.shape[0] == len(probe):
                return out
        except (OSError, ValueError, KeyError):
            pass
    out = np.asarray(keras_forward(probe), np.float32)
    if ref is not None:
        try:
            ref.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.with_name(f".{ref.name}-{os.getpid()}")
            tmp.write_text(json.dumps({"probs": out.tolist()}))
            os.replace(tmp, ref)
        except OSError:
            pass
    return out


def choose_forward(model, input_size: int, keras_forward: Callable[[np.ndarray], np.ndarray],
                   key: Optional[str], backend: str = "auto") -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """The forward pass to use and a report {'backend', 'max_dp_probe', 'reason'}.

    'keras' -> keras_forward. 'auto' / 'openvino' -> OpenVINO float32, 'openvino-bf16' -> OpenVINO
    bfloat16, each only if it converts and agrees with Keras within MAX_DP on 8 probe images (random
    textures and flat images); else keras_forward ('auto' falls back, the others raise).
    """
    backend = requested_backend(backend)
    if backend == "keras":
        return keras_forward, {"backend": "keras float32", "reason": "requested"}
    precision = "bf16" if backend == "openvino-bf16" else "f32"
    label = f"openvino {'bfloat16' if precision == 'bf16' else 'float32'}"
    try:
        fwd = openvino_forward(model, input_size, key, precision)
        rng = np.random.default_rng(0)
        probe = np.concatenate([rng.uniform(0, 255, (4, input_size, input_size, 3)),
                                np.linspace(0, 255, 4)[:, None, None, None] * np.ones((1, input_size, input_size, 3))]
                               ).astype(np.float32)
        dp = float(np.abs(fwd(probe) - keras_reference(keras_forward, probe, key)).max())
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
