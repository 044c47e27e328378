"""core.training.common: one training phase traces its train step once."""
from __future__ import annotations

import numpy as np
import pytest

from core.training import common


@pytest.mark.parametrize("prebuild", [True, False])
def test_a_phase_traces_its_train_step_once_when_built_before_fit(monkeypatch, prebuild):
    """Keras 3 (TensorFlow, no distribution strategy) creates the optimizer's and metrics' variables inside the
    first trace of the train step, and tf.function then traces the step again: run_phase builds them first
    (`prebuild=False` shows the second trace it saves, so the test fails if the build stops working)."""
    import keras
    import tensorflow as tf

    traces = []

    class Counting(keras.Model):
        def train_step(self, data):
            traces.append(1)  # runs in Python only while tracing
            return super().train_step(data)

    inp = keras.Input((6,))
    model = Counting(inp, keras.layers.Dense(2, activation="softmax")(keras.layers.Dense(4)(inp)))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x, y, w = rng.normal(size=(20, 6)).astype(np.float32), rng.integers(0, 2, 20), np.ones(20, np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(8)
    if not prebuild:
        monkeypatch.setattr(common, "build_before_fit", lambda *a: False)
    rows, timing = common.run_phase(model, "head", ds, (x[:6], y[:6]), 0, 2, [], "float32", 0)
    assert [r["epoch"] for r in rows] == [1, 2] and timing["epochs"] == 2
    assert len(traces) == (1 if prebuild else 2)
    assert common.build_before_fit(model, (x, y)) is False  # not a tf.data.Dataset: left to Keras


@pytest.mark.parametrize("with_spec", [True, False])
def test_a_pydataset_with_a_batch_spec_is_built_before_fit(with_spec):
    """The cached-activation and patch-resampling PyDatasets say one batch's structure (`batch_spec`): run_phase builds
    from it, so their phases trace the train step once as well; a PyDataset without it keeps Keras's build (2)."""
    import keras

    traces = []

    class Counting(keras.Model):
        def train_step(self, data):
            traces.append(1)
            return super().train_step(data)

    rng = np.random.default_rng(1)
    x, y, w = rng.normal(size=(20, 6)).astype(np.float32), rng.integers(0, 2, 20), np.ones(20, np.float32)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8], w[i * 8:(i + 1) * 8]

    if with_spec:
        Batches.batch_spec = lambda self: common.batch_spec(self[0])
    inp = keras.Input((6,))
    model = Counting(inp, keras.layers.Dense(2, activation="softmax")(inp))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    rows, _ = common.run_phase(model, "head", Batches(), None, 0, 2, [], "float32", 0)
    assert len(rows) == 2 and len(traces) == (1 if with_spec else 2)
    spec = common.batch_spec((x[:8], {"out": y[:8]}, w[:8]))
    assert spec[0].shape.as_list() == [None, 6] and spec[1]["out"].dtype == y.dtype and spec[2].dtype == "float32"


def test_the_training_sequences_say_their_batch_without_drawing():
    """`batch_spec` of the cached and resampling sequences matches the batches they yield and changes nothing the
    next batch depends on (the augmenter is not called; batch 0 is the same before and after)."""
    import keras

    from core.training.classify import _CachedSequence, _ResamplingSequence

    rng = np.random.default_rng(2)
    cache = rng.normal(size=(3, 10, 4, 4, 5)).astype(np.float32)  # copies, images, activation map
    y, sw = rng.integers(0, 2, 10), np.ones(10, np.float32)
    seq = _CachedSequence(cache, np.eye(2, dtype=np.float32)[y], sw, 4, 0, mixup=0.2, aux=None)
    before = seq[1]
    spec = seq.batch_spec()
    assert [s.shape.as_list() for s in spec] == [[None, 4, 4, 5], [None, 2], [None]]  # mixup: target rows
    assert all(np.array_equal(a, b) for a, b in zip(before, seq[1]))
    calls = []
    aug = keras.layers.RandomFlip("horizontal", seed=0)
    res = _ResamplingSequence(lambda draw: rng.normal(size=(10, 8, 8, 3)), y, sw, 4, 0,
                              lambda t, training: calls.append(1) or aug(t, training=training))
    spec = res.batch_spec()
    assert not calls and spec[0].shape.as_list() == [None, 8, 8, 3] and spec[0].dtype == "float32"
    assert res[0][0].shape[1:] == (8, 8, 3) and calls == [1]


def test_the_commit_is_read_once_so_a_run_records_the_code_it_started_from(monkeypatch):
    """A commit landing while a run trains must not become the bundle's git_commit: the first answer stays."""
    import subprocess
    import types

    heads = iter(["a" * 40, "b" * 40])

    def fake_run(cmd, **kw):
        out = next(heads) if "rev-parse" in cmd else ""
        return types.SimpleNamespace(returncode=0, stdout=out + "\n")

    common.git_commit.cache_clear()
    monkeypatch.setattr(subprocess, "run", fake_run)
    try:
        assert common.git_commit() == "a" * 40
        assert common.git_commit() == "a" * 40  # HEAD has moved on to b...: still the run's starting commit
    finally:
        common.git_commit.cache_clear()
