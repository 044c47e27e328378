from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_classifier():
    """A tiny deterministic simple_cnn (32 px, random weights fixed by seed) behind the Classifier contract."""
    import keras

    from core.checkpoints import Classifier
    from core.models import ModelConfig, build_model

    keras.utils.set_random_seed(1234)
    model, _ = build_model(ModelConfig(backbone="simple_cnn", num_classes=2, input_size=32, head_units=(8,),
                                       dropout=0.0, l2=0.0))
    return Classifier(model=model, class_names=("benign", "malignant"), input_size=32, metadata={})


@pytest.fixture(scope="session")
def test_image():
    rng = np.random.default_rng(5)
    img = rng.integers(0, 80, (40, 52, 3)).astype(np.uint8)
    img[10:25, 12:30] = 220
    return img
