"""Helpers every training task shares: seeds, precision, memory, provenance, epoch timing."""
from __future__ import annotations

import functools
import logging
import os
import random
import shlex
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np

from core.backends import cpu_has_bf16

log = logging.getLogger("breastxai.train")

#: `TrainConfig.flip` values (Keras RandomFlip modes, plus "none").
FLIPS = ("horizontal_and_vertical", "horizontal", "vertical", "none")
#: `TrainConfig.precision` values.
PRECISIONS = ("float32", "bfloat16")


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux /proc/meminfo MemAvailable; else free pages)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def resolve_precision(requested: str) -> str:
    """The precision training will really use: bfloat16 only where the CPU has it (else float32, with a warning)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {requested!r}")
    if requested == "bfloat16" and not cpu_has_bf16():
        log.warning("This CPU has no native bfloat16 (AVX512-BF16/AMX): training in float32 instead.")
        return "float32"
    return requested


@contextmanager
def mixed_precision(precision: str):
    """Inside: TensorFlow functions traced now run oneDNN's automatic bfloat16 rewrite (matmuls and
    convolutions in bfloat16 on AMX, variables and losses stay float32). float32: no change."""
    import tensorflow as tf

    if precision != "bfloat16":
        yield
        return
    key = "auto_mixed_precision_onednn_bfloat16"
    before = tf.config.optimizer.get_experimental_options().get(key, False)
    tf.config.optimizer.set_experimental_options({key: True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({key: before})


def set_seeds(seed: int) -> None:
    import keras

    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)


@functools.lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """This checkout's HEAD commit, "+dirty" when tracked files have uncommitted changes, or None outside git.
    Read once per process: `train.py` reads it as it starts, so a bundle records the code its run started from
    even when commits land while it trains."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[2])
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parents[2]).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def epoch_timer():
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t)

    return EpochTimer()


def quote_arg(a: str) -> str:
    """`a` quoted for a shell command line."""
    return shlex.quote(a)




#: `TrainConfig.distribute` values.
DISTRIBUTE = ("none", "multiworker")


def multiworker_strategy():
    """tf.distribute.MultiWorkerMirroredStrategy from $TF_CONFIG -> (strategy, is_chief, number of workers).

    Create it before any other TensorFlow work (collective ops are configured at start-up). The chief is the
    "chief" task, or worker 0 when the cluster names no chief; only it writes the bundle.
    """
    import json

    import tensorflow as tf

    conf = json.loads(os.environ.get("TF_CONFIG") or "{}")
    cluster, task = conf.get("cluster") or {}, conf.get("task") or {}
    if not cluster or not task:
        from core.errors import BreastXAIError

        raise BreastXAIError('--distribute multiworker needs TF_CONFIG, e.g. {"cluster": {"worker": ["host1:12345", '
                         '"host2:12345"]}, "task": {"type": "worker", "index": 0}} on each worker.')
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    chief = task.get("type") == "chief" or (task.get("type") == "worker" and int(task.get("index", 0)) == 0
                                            and "chief" not in cluster)
    return strategy, chief, sum(len(v) for v in cluster.values())


def weights_digest(model, trainable_only: bool = True) -> str:
    """sha256 of a model's weights (float32 bytes, in order). The trainable weights are equal on every worker after
    synchronous training; BatchNorm running statistics are each worker's own (unsynchronised, as in Keras)."""
    import hashlib

    h = hashlib.sha256()
    for w in (model.trainable_weights if trainable_only else model.weights):
        h.update(np.ascontiguousarray(np.asarray(w), np.float32).tobytes())
    return h.hexdigest()


def joint_geometry(geometry: list, photometric: list, images, masks):
    """Augment images (B, S, S, 3) 0-255 and their masks (B, S, S, 1) in {0, 1} together: the `geometry` layers
    (flips, rotations, zooms...) see image and mask stacked, so both move alike; the `photometric` layers see the
    images only. Returns (images clipped to 0-255, masks back in {0, 1}), float32."""
    import keras

    ops = keras.ops
    both = ops.concatenate([images, masks * 255.0], axis=-1)
    for layer in geometry:
        both = layer(both, training=True)
    img = both[..., :3]
    for layer in photometric:
        img = layer(img, training=True)
    return ops.clip(img, 0.0, 255.0), ops.cast(both[..., 3:] >= 127.5, "float32")


def build_before_fit(model, train_data) -> bool:
    """Create the optimizer's, loss's and metrics' variables before `fit` traces its train step; True if done.

    Keras 3 on TensorFlow without a distribution strategy creates them inside the first trace of the step, and a
    tf.function that created variables is traced again, so every phase paid for two graphs of the whole network
    (a DenseNet121 U-Net at 32 px: ~20 s each on a 2-core CPU). Done for a tf.data.Dataset (its element_spec) and
    for a Keras PyDataset with a `batch_spec()` method (one batch's structure, drawn without side effects); other
    inputs keep Keras's own build."""
    import tensorflow as tf

    build = getattr(model, "_symbolic_build", None)  # the Keras 3 trainer's (keras is pinned in requirements.txt)
    if build is None:
        return False
    if isinstance(train_data, tf.data.Dataset):
        spec = train_data.element_spec
    elif callable(getattr(train_data, "batch_spec", None)):
        spec = train_data.batch_spec()
    else:
        return False
    build(data_batch=spec)
    return True


def batch_spec(batch):
    """tf.TensorSpec structure of one batch (nested tuples / dicts of arrays), the batch dimension left open."""
    import tensorflow as tf

    return tf.nest.map_structure(lambda a: tf.TensorSpec((None, *np.shape(a)[1:]), tf.as_dtype(np.asarray(a).dtype)),
                                 batch)


def run_phase(target, name: str, train_data, val_data, epoch0: int, epochs: int, callbacks: list, precision: str,
              verbose: int, batch_size: Optional[int] = None) -> tuple[list[dict], dict]:
    """One training phase: `target.fit` (already compiled) for up to `epochs` epochs after `epoch0` under `precision`,
    with `callbacks` and a per-epoch timer. Returns (history rows tagged with the phase name, timing row)."""
    t0, timer = time.time(), epoch_timer()
    build_before_fit(target, train_data)
    with mixed_precision(precision):
        h = target.fit(train_data, validation_data=val_data, epochs=epoch0 + epochs, initial_epoch=epoch0,
                       callbacks=[*callbacks, timer], verbose=verbose,
                       **({"batch_size": batch_size} if batch_size else {}))
    secs = time.time() - t0
    n_ep = len(h.history.get("loss", []))
    rows = [{"epoch": epoch0 + j + 1, "phase": name, **{k: float(v[j]) for k, v in h.history.items()}}
            for j in range(n_ep)]
    return rows, {"phase": name, "epochs": n_ep, "seconds": secs, "seconds_per_epoch": secs / max(n_ep, 1),
                  "epoch_seconds": timer.seconds}


def run_record(name: str, argv) -> dict:
    """The head of a bundle's metadata.json: name, creation time (UTC), the exact command and the git commit."""
    import datetime as _dt

    argv = list(argv) if argv is not None else None
    return {"name": name, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "train.py", *map(quote_arg, argv)]) if argv is not None else None,
            "argv": argv, "git_commit": git_commit()}
