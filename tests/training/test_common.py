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
