"""Every backbone builds as one flat graph; freezing, Grad-CAM layer, cut points, weights handling."""
from __future__ import annotations

import os

import numpy as np
import pytest

import keras

from core.errors import WeightsUnavailableError
from core.models import (BACKBONES, BackbonePreprocess, ModelConfig, backbone_layers, build_model, cut_point,
                         last_conv_layer, set_trainable)
from tests.conftest import DENSENET_WEIGHTS


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_builds_flat_at_tiny_size(backbone):
    model, prov = build_model(ModelConfig(backbone=backbone, num_classes=3, input_size=32, weights="none"))
    assert model.output_shape == (None, 3)
    assert not any(isinstance(l, keras.Model) for l in model.layers), "nested model breaks Grad-CAM"
    assert prov["source"] == "none"
    name = last_conv_layer(model)
    assert len(model.get_layer(name).output.shape) == 4
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    p = np.asarray(model(x))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)


def test_simple_cnn_is_the_seed_baseline():
    model, _ = build_model(ModelConfig(backbone="simple_cnn", num_classes=2, input_size=180, head_units=(128,),
                                       pooling="flatten"))
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [16, 32, 64]
    assert [l.units for l in model.layers if isinstance(l, keras.layers.Dense)] == [128, 2]


def test_head_defaults_follow_the_seeds():
    model, _ = build_model(ModelConfig(backbone="mobilenetv2", num_classes=2, input_size=32))
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    assert [d.units for d in dense] == [256, 128, 64, 2]
    assert all(d.kernel_regularizer is not None and abs(float(d.kernel_regularizer.l2) - 0.01) < 1e-9
               for d in dense[:3])
    assert [l.rate for l in model.layers if isinstance(l, keras.layers.Dropout)] == [0.5] * 3
    assert any(isinstance(l, keras.layers.BatchNormalization) and l.name.startswith("head_") for l in model.layers)


def test_set_trainable_last_n_keeps_batchnorm_frozen():
    model, _ = build_model(ModelConfig(backbone="resnet50", num_classes=2, input_size=32))
    bb = backbone_layers(model)
    assert set_trainable(model, 0) == 0
    assert all(not l.trainable for l in bb)
    assert all(l.trainable for l in model.layers if l.name.startswith("head_"))
    n = set_trainable(model, 10)
    last = bb[-10:]
    assert n == sum(not isinstance(l, keras.layers.BatchNormalization) for l in last)
    assert all(l.trainable != isinstance(l, keras.layers.BatchNormalization) for l in last)
    assert all(not l.trainable for l in bb[:-10])


def test_cut_point_tail_reproduces_full_model():
    model, _ = build_model(ModelConfig(backbone="densenet121", num_classes=2, input_size=32, dropout=0))
    set_trainable(model, 10)
    first = next(l.name for l in model.layers if l.trainable and l.weights)
    cut = cut_point(model, first)
    assert cut is not None
    names = [l.name for l in model.layers]
    assert names.index(cut) < names.index(first)
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    trunk = keras.Model(model.input, model.get_layer(cut).output)
    tail = keras.Model(model.get_layer(cut).output, model.output)
    np.testing.assert_allclose(np.asarray(tail(trunk(x))), np.asarray(model(x)), atol=1e-5)


def test_preprocess_modes_match_keras():
    x = np.random.default_rng(2).uniform(0, 255, (1, 8, 8, 3)).astype("float32")
    for mode, fn in (("caffe", keras.applications.resnet50.preprocess_input),
                     ("torch", keras.applications.densenet.preprocess_input),
                     ("tf", keras.applications.mobilenet_v2.preprocess_input)):
        np.testing.assert_allclose(np.asarray(BackbonePreprocess(mode)(x)), fn(x.copy()), atol=1e-4)


def test_imagenet_offline_fails_fast_naming_alternatives(monkeypatch, tmp_path):
    import core.models as cm

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(cm, "_online", lambda *a, **k: False)
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(ModelConfig(backbone="resnet50", input_size=32, weights="imagenet"))
    msg = str(info.value)
    assert "--weights PATH" in msg and "--weights none" in msg


def test_missing_weights_file_is_clear(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not found"):
        build_model(ModelConfig(backbone="densenet121", input_size=32, weights=str(tmp_path / "x.h5")))


@pytest.mark.skipif(not DENSENET_WEIGHTS.is_file(), reason="shared DenseNet121 weights not available")
def test_densenet_weights_file_loads_with_provenance():
    model, prov = build_model(ModelConfig(backbone="densenet121", input_size=32, weights=str(DENSENET_WEIGHTS)))
    assert prov["sha256"] == "0142d51240a0752a26a858c544e9b2e0ae5f0effbf961bd882100a345b1617d9"
    ref = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(32, 32, 3))
    ref.load_weights(str(DENSENET_WEIGHTS))
    np.testing.assert_array_equal(model.get_layer("conv1_conv").get_weights()[0], ref.get_layer("conv1_conv").get_weights()[0])


def test_a_weights_file_is_read_once_per_process_until_it_changes(tmp_path):
    """Cross-validation builds the network once per fold: the trunk's weights file is read once, and read again
    when it is rewritten."""
    from core import models as cm

    trunk = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "trunk.weights.h5"
    trunk.save_weights(path)
    cfg = ModelConfig(backbone="mobilenetv2", input_size=32, weights=str(path))
    before = cm._trunk_weights.cache_info()
    first, _ = build_model(cfg)
    second, _ = build_model(cfg)
    after = cm._trunk_weights.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    kernel = trunk.get_layer("Conv1").get_weights()[0]
    for m in (first, second):
        np.testing.assert_array_equal(m.get_layer("Conv1").get_weights()[0], kernel)
    trunk.get_layer("Conv1").set_weights([kernel + 1.0])
    trunk.save_weights(path)  # rewritten: a new modification time
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    third, prov = build_model(cfg)
    np.testing.assert_array_equal(third.get_layer("Conv1").get_weights()[0], kernel + 1.0)
    assert prov["sha256"] == cm.sha256_file(path)  # the provenance hash follows the rewrite too


def test_stain_standardise_maps_colour_casts_to_the_same_image():
    """Two stainings of one field (one paler and bluer) come out of StainStandardise alike; it round-trips
    through a saved model."""
    import keras

    from core.models import StainStandardise, stain_targets

    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 1.5, (1, 16, 16, 3)).astype(np.float32)  # optical density of a field
    a = 256 * np.exp(-base) - 1
    b = 256 * np.exp(-(0.6 * base * np.array([1.0, 0.8, 1.3], np.float32))) - 1  # paler, colour-cast copy
    targets = stain_targets(np.concatenate([a, b]).astype(np.uint8))
    layer = StainStandardise(*targets)
    ya, yb = np.asarray(layer(a)), np.asarray(layer(b))
    assert np.abs(a - b).mean() > 20 and np.abs(ya - yb).mean() < 1.0
    assert ya.min() >= 0 and ya.max() <= 255
    inp = keras.Input((16, 16, 3))
    model = keras.Model(inp, StainStandardise(*targets)(inp))
    model.save(tmp := __import__("tempfile").mkdtemp() + "/m.keras")
    again = keras.saving.load_model(tmp, safe_mode=True)
    np.testing.assert_allclose(np.asarray(again(a)), ya, atol=1e-4)


def test_extra_scales_share_the_trunk_in_one_flat_graph(tmp_path):
    """--scales: the same trunk layers run on the input and on a resized copy (one weight set, one flat graph,
    two calls per trunk layer, full size first); the pooled features of both are concatenated; save/load keeps it."""
    from core.explain.gradcam import layer_outputs

    one, _ = build_model(ModelConfig(backbone="simple_cnn", num_classes=2, input_size=48, head_units=()))
    two, _ = build_model(ModelConfig(backbone="simple_cnn", num_classes=2, input_size=48, head_units=(),
                                     scales=(32,)))
    assert not any(isinstance(l, keras.Model) for l in two.layers)
    conv_params = sum(l.count_params() for l in one.layers if isinstance(l, keras.layers.Conv2D))
    assert sum(l.count_params() for l in two.layers if isinstance(l, keras.layers.Conv2D)) == conv_params
    assert two.get_layer("head_concat").output.shape[-1] == 2 * one.get_layer("head_pool").output.shape[-1]
    assert [t.shape[1] for t in layer_outputs(two, last_conv_layer(two))] == [6, 4]  # 48 -> 6, 32 -> 4 after 3 pools
    # The small branch is the trunk applied to the resized image: its pooled features match a single-scale model
    # with the same weights run at 32 px.
    small, _ = build_model(ModelConfig(backbone="simple_cnn", num_classes=2, input_size=32, head_units=()))
    for l in small.layers:
        if isinstance(l, keras.layers.Conv2D):
            l.set_weights(two.get_layer(l.name).get_weights())
    x = np.random.default_rng(1).uniform(0, 255, (2, 48, 48, 3)).astype("float32")
    feats = np.asarray(keras.Model(two.input, two.get_layer("head_concat").output)(x))
    x32 = np.asarray(keras.layers.Resizing(32, 32)(x))
    ref = np.asarray(keras.Model(small.input, small.get_layer("head_pool").output)(x32))
    np.testing.assert_allclose(feats[:, feats.shape[1] // 2:], ref, rtol=1e-4, atol=1e-5)
    two.save(tmp_path / "m.keras")
    back = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(back(x)), np.asarray(two(x)), rtol=1e-5, atol=1e-6)
    assert len(layer_outputs(back, last_conv_layer(back))) == 2
    for bad in ((48,), (64,), (16,), (32, 32)):
        with pytest.raises(ValueError, match="scales"):
            build_model(ModelConfig(backbone="simple_cnn", num_classes=2, input_size=48, head_units=(), scales=bad))


def _trained_like(model, seed: int):
    """`model` with every weight redrawn (seeded), so two members of one architecture differ."""
    rng = np.random.default_rng(seed)
    for l in model.layers:
        if l.weights:
            l.set_weights([rng.normal(0, 0.3, w.shape).astype("float32") if "moving_variance" not in w.path
                           else np.ones(w.shape, "float32") for w in l.weights])
    return model


def test_ensemble_is_one_flat_model_with_the_mean_of_its_members_logits(tmp_path):
    """build_ensemble: members' layers copied under m1_/m2_ (shared layers stay shared), each member fed its own side,
    probabilities = softmax(mean of the members' logits), one Dense output; save/load keeps it."""
    from core.explain.gradcam import layer_outputs
    from core.models import build_ensemble

    a = _trained_like(build_model(ModelConfig(backbone="simple_cnn", num_classes=3, input_size=32,
                                              head_units=(8,), dropout=0.0))[0], 1)
    b = _trained_like(build_model(ModelConfig(backbone="simple_cnn", num_classes=3, input_size=48, head_units=(),
                                              scales=(32,)))[0], 2)
    ens = build_ensemble([a, b], 48)
    assert not any(isinstance(l, keras.Model) for l in ens.layers)
    names = [l.name for l in ens.layers]
    assert len(names) == len(set(names)) and "m1_resize" in names and "m2_resize" not in names
    assert isinstance(ens.layers[-1], keras.layers.Dense) and ens.get_layer("head_concat") is not None
    assert ens.count_params() == a.count_params() + b.count_params() - 3  # both kernels, one bias of K = 3
    assert len(layer_outputs(ens, "m2_" + last_conv_layer(b))) == 2  # member 2's scales are still shared calls
    x = np.random.default_rng(3).uniform(0, 255, (4, 48, 48, 3)).astype("float32")
    pa = np.asarray(a(np.asarray(keras.layers.Resizing(32, 32)(x)), training=False), np.float64)
    pb = np.asarray(b(x, training=False), np.float64)
    z = (np.log(pa) + np.log(pb)) / 2
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    got = np.asarray(ens(x, training=False))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(got, pa, atol=1e-3) and not np.allclose(got, pb, atol=1e-3)
    # The randomisation sanity checks randomise a stage in every member at once, and the head with the output.
    from core.explain.sanity import layer_blocks

    assert layer_blocks(ens) == [("stage 1", ["m1_conv1", "m2_conv1"]), ("stage 2", ["m1_conv2", "m2_conv2"]),
                                 ("stage 3", ["m1_conv3", "m2_conv3"]),
                                 ("head", ["m1_head_bn", "m1_head_dense1", "m2_head_bn", "head_predictions"])]
    ens.save(tmp_path / "e.keras")
    back = keras.saving.load_model(tmp_path / "e.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(back(x, training=False)), got, atol=1e-6)
    # A member that starts with another's exact layers (as two DenseNet121s start with the same frozen ImageNet
    # blocks) shares their computation: only its own layers are added, and the answer is unchanged.
    twin = build_model(ModelConfig(backbone="simple_cnn", num_classes=3, input_size=32, head_units=(4,),
                                   dropout=0.0))[0]
    for l in twin.layers:
        if isinstance(l, keras.layers.Conv2D):
            l.set_weights(a.get_layer(l.name).get_weights())
    _trained_like(keras.Model(twin.get_layer("head_bn").input, twin.output), 5)  # a head of its own
    pair = build_ensemble([a, twin], 32)
    assert not any(n.startswith("m2_conv") for n in (l.name for l in pair.layers))
    head = sum(l.count_params() for l in twin.layers if l.name.startswith("head_"))
    assert pair.count_params() == a.count_params() + head - 3
    x32 = x[:, :32, :32]
    z = (np.log(np.asarray(a(x32, training=False), np.float64)) +
         np.log(np.asarray(twin(x32, training=False), np.float64))) / 2
    np.testing.assert_allclose(np.asarray(pair(x32, training=False)), np.exp(z) / np.exp(z).sum(1, keepdims=True),
                               atol=1e-5)
    with pytest.raises(ValueError, match="two"):
        build_ensemble([a], 48)
    other = build_model(ModelConfig(backbone="simple_cnn", num_classes=2, input_size=32, head_units=()))[0]
    with pytest.raises(ValueError, match="classes"):
        build_ensemble([a, other], 48)


def test_attention_gate_against_hand_computed_values():
    """alpha = sigmoid(psi(ReLU(theta(skip) + phi(gate)))), the skip times alpha, with every 1x1 weight set to 1."""
    from core.models import attention_gate

    skip_in, gate_in = keras.Input((2, 2, 1)), keras.Input((2, 2, 1))
    model = keras.Model([skip_in, gate_in], attention_gate(skip_in, gate_in, 1, "g_"))
    for name in ("g_skip", "g_decoder", "g_alpha"):
        layer = model.get_layer(name)
        layer.set_weights([np.ones_like(w) if w.ndim == 4 else np.zeros_like(w) for w in layer.get_weights()])
    skip = np.array([2.0, -1.0, 0.5, 3.0], np.float32).reshape(1, 2, 2, 1)
    gate = np.array([-4.0, 0.5, 1.0, -3.0], np.float32).reshape(1, 2, 2, 1)
    alpha = 1 / (1 + np.exp(-np.maximum(skip + gate, 0)))  # [0.5, 0.5, 0.818, 0.5]
    np.testing.assert_allclose(model.predict([skip, gate], verbose=0), skip * alpha, rtol=1e-5)


def test_attention_unet_gates_every_skip_and_survives_a_save(tmp_path):
    """--seg-decoder attention: one gate per skip connection (4), the same output shape as the plain U-Net, and the
    saved file loads to the same lesion map; the plain U-Net has no gate."""
    from core.models import SegmenterConfig, build_segmenter

    plain, _ = build_segmenter(SegmenterConfig(input_size=32))
    gated, _ = build_segmenter(SegmenterConfig(input_size=32, attention=True))
    gates = [l.name for l in gated.layers if l.name.startswith("seg_gate") and l.name.endswith("_apply")]
    assert gates == [f"seg_gate{i}_apply" for i in (1, 2, 3, 4)]
    assert not any(l.name.startswith("seg_gate") for l in plain.layers)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    y = gated.predict(x, verbose=0)
    assert y.shape == plain.predict(x, verbose=0).shape == (2, 32, 32, 1) and ((y >= 0) & (y <= 1)).all()
    gated.save(tmp_path / "m.keras")
    np.testing.assert_allclose(keras.saving.load_model(tmp_path / "m.keras").predict(x, verbose=0), y, atol=1e-6)


def test_lesion_pool_against_hand_computed_values(tmp_path):
    """LesionPool: the feature map's mean weighted by the lesion map's share of each feature cell; where the map
    holds (almost) nothing, the plain mean; it survives a save and names the pooled layer for Grad-CAM."""
    from core.models import LesionPool

    feats = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)[None, ..., None].repeat(3, axis=0)  # (3, 2, 2, 1)
    maps = np.zeros((3, 4, 4, 1), np.float32)
    maps[0, :2, :2] = 1.0  # the lesion fills the top-left cell: that cell's feature, 1
    maps[1, :2, :2], maps[1, 2:, 2:] = 0.5, 1.0  # cells 0.5 and 1: (0.5 * 1 + 1 * 4) / 1.5 = 3
    # maps[2] is empty (a normal scan): the plain mean, 2.5
    pool = LesionPool("pool3_relu", name="lesion_pool")
    np.testing.assert_allclose(np.asarray(pool([feats, maps])), [[1.0], [3.0], [2.5]], rtol=1e-6)
    maps[2, 0, 0] = 1e-3  # below the floor (a share 1e-3 of the 4 cells): still the plain mean
    np.testing.assert_allclose(np.asarray(pool([feats, maps]))[2], [2.5], rtol=1e-6)

    fi, mi = keras.Input((2, 2, 1)), keras.Input((4, 4, 1))
    model = keras.Model([fi, mi], LesionPool("pool3_relu", name="lesion_pool")([fi, mi]))
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(np.asarray(again.predict([feats, maps], verbose=0)), [[1.0], [3.0], [2.5]], rtol=1e-6)
    assert again.get_layer("lesion_pool").feature_layer == "pool3_relu"
