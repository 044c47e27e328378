"""Per-tile probability maps and IDC slide mosaics (core.tiles) with a tiny brightness model."""
from __future__ import annotations

import numpy as np
import pytest

from core.data import Sample
from core.tiles import colour_map, slide_mosaic, tile_probability_map, tile_side


@pytest.fixture(scope="module")
def brightness_classifier():
    """P(idc) rises with a tile's mean brightness: logits = ±(mean - 128) / 8, exactly."""
    import keras

    from core.checkpoints import Classifier
    from core.patches import PatchConfig

    inp = keras.Input((10, 10, 3))
    x = keras.layers.GlobalAveragePooling2D()(inp)
    x = keras.layers.Dense(1, use_bias=True, kernel_initializer=keras.initializers.Constant(1 / 3),
                           bias_initializer="zeros")(x)  # mean over channels
    logits = keras.layers.Dense(2, kernel_initializer=keras.initializers.Constant([[-1 / 8, 1 / 8]]),
                                bias_initializer=keras.initializers.Constant([16.0, -16.0]))(x)
    model = keras.Model(inp, keras.layers.Softmax()(logits))
    return Classifier(model=model, class_names=("non_idc", "idc"), input_size=10,  # as load_classifier gives IDC
                      metadata={"dataset": {"kind": "idc"}}, patches=PatchConfig(50, 10, 50, min_tissue=0.0),
                      backend="keras")


def test_tile_map_finds_the_bright_quadrant(brightness_classifier):
    clf = brightness_classifier
    assert tile_side(clf) == 50
    img = np.full((100, 150, 3), 20, np.uint8)
    img[:50, 100:] = 200  # the top-right tile is bright (tissue, not glass)
    tm = tile_probability_map(clf, img)
    assert clf.predict_proba(img)[0, 1] == pytest.approx(tm.probs[:, 1].mean(), abs=1e-5)  # mean of the grid
    assert tm.probs.shape == (6, 2) and tm.boxes == ((0, 0), (0, 50), (0, 100), (50, 0), (50, 50), (50, 100))
    assert np.argmax(tm.probs[:, 1]) == 2 and tm.probs[2, 1] > 0.99 and tm.probs[[0, 1, 3, 4, 5], 1].max() < 0.01
    pm = tm.pixel_map(1)
    assert pm.shape == (100, 150) and pm[10, 120] > 0.99 and pm[80, 20] < 0.01
    assert tm.share_above(1) == pytest.approx(1 / 6)
    assert tile_probability_map(clf, img[:50, :50]) is None  # one tile: nothing to map
    img[50:, :50] = 255  # glass: not classified when tissue is required
    glass = tile_probability_map(clf, img, min_tissue=0.5)
    assert np.isnan(glass.probs[3]).all() and not np.isnan(glass.probs[2]).any()
    assert glass.share_above(1) == pytest.approx(1 / 5)
    whole = type(clf)(model=clf.model, class_names=clf.class_names, input_size=10, metadata={})
    assert tile_side(whole) is None and tile_probability_map(whole, img) is None


def test_slide_mosaic_places_patches_and_truth(brightness_classifier):
    patches = {(1001, 501): 240, (1051, 501): 20, (1001, 601): 200}
    samples = [Sample(f"p_{x}_{y}.png", int(v > 100), "idc" if v > 100 else "non_idc", "8863", position=(x, y))
               for (x, y), v in patches.items()]
    read = lambda s: np.full((50, 50, 3), patches[s.position], np.uint8)  # noqa: E731
    mo = slide_mosaic(samples, read, scale=0.5, margin=0)
    assert mo.image.shape == (75, 50, 3) and mo.side == 25
    assert mo.boxes == ((0, 0), (0, 25), (50, 0))
    assert (mo.truth[:25, :25] == 1).all() and (mo.truth[:25, 25:] == 0).all() and (mo.truth[25:50] == -1).all()
    assert (mo.image[30, 10] == 255).all() and mo.image[5, 5, 0] == 240
    probs = brightness_classifier.predict_proba([read(s) for s in samples])[:, 1]
    painted = mo.paint(probs)
    assert painted[5, 5] > 0.99 and painted[5, 30] < 0.01 and np.isnan(painted[30, 10])
    rgb = colour_map(painted)
    assert rgb.shape == (75, 50, 3) and (rgb[30, 10] == 245).all() and rgb[5, 5, 0] > rgb[5, 5, 2]
    with pytest.raises(ValueError):
        slide_mosaic([Sample("a.png", 0, "non_idc", "1")], read)
