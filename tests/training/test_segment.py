"""Segmentation training (`train.py --task segmentation`): Dice / IoU, metrics, bundle, CV, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import train
from core.checkpoints import read_csv, write_json
from core.training.segment import (SEG_DECODERS, SHAPE_COLUMNS, check_seg_choices, choose_postprocessing, dice_iou,
                                   dice_loss, load_seg_arrays, predicted_shape, segmentation_loss, tversky_loss,
                                   segmentation_metrics)
from tests.conftest import BUSI, ROOT, needs_shared, write_class_tree


def test_dice_and_iou_against_hand_computed_values():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :4] = True  # 4 px
    b[0, 2:4] = b[1, 2:4] = True  # 4 px, 2 shared
    d, j = dice_iou(a, b)
    assert d == pytest.approx(2 * 2 / 8) and j == pytest.approx(2 / 6)
    assert dice_iou(a, a) == (1.0, 1.0)
    assert dice_iou(a, np.zeros_like(a)) == (0.0, 0.0)
    assert dice_iou(np.zeros_like(a), np.zeros_like(a)) == (None, None)  # undefined, not perfect
    with pytest.raises(ValueError, match="shapes"):
        dice_iou(a, np.zeros((3, 3), bool))


def test_predicted_shape_against_hand_computed_values():
    """The per-image rows' shape columns: a 20 x 10 px rectangle is twice as wide as deep with a convex (0) margin;
    two separate regions are counted; nothing predicted gives 0 regions and no shape."""
    m = np.zeros((40, 60), bool)
    m[5:15, 10:30] = True
    s = predicted_shape(m)
    assert s["pred_regions"] == 1 and s["pred_width_to_depth"] == pytest.approx(2.0)
    assert s["pred_margin_irregularity"] == pytest.approx(0.0) and 0.5 < s["pred_circularity"] <= 1.0
    m[30:35, 50:55] = True
    assert predicted_shape(m)["pred_regions"] == 2
    m[12:15, 12:28] = False  # a notch cut into the largest region: no longer convex
    assert predicted_shape(m)["pred_margin_irregularity"] > 0.1
    assert predicted_shape(np.zeros((8, 8), bool)) == {"pred_regions": 0, **{c: None for c in SHAPE_COLUMNS[1:]}}


def test_soft_dice_loss_over_every_image_or_lesion_images_only():
    """Hand-computed: a 2x2 lesion half found (Dice (2*2+1)/(4+2+1) = 5/7) and an empty scan with one stray
    pixel (Dice 1/2). Every image: the mean of both losses; lesion images only: the lesion's alone."""
    y = np.zeros((2, 4, 4, 1), np.float32)
    p = np.zeros_like(y)
    y[0, :2, :2] = 1.0
    p[0, :1, :2] = 1.0
    p[1, 3, 3] = 1.0
    lesion, empty = 1 - 5 / 7, 1 - 1 / 2
    assert float(dice_loss(y, p)) == pytest.approx((lesion + empty) / 2)
    assert float(dice_loss(y, p, lesion_images_only=True)) == pytest.approx(lesion)
    assert float(dice_loss(y[1:], p[1:], lesion_images_only=True)) == 0.0  # a batch of empty scans: BCE alone
    bce = float(np.mean(-np.log(1 - np.clip(p, 1e-7, 1 - 1e-7)) * (1 - y) - np.log(np.clip(p, 1e-7, 1)) * y))
    assert float(segmentation_loss("lesion_images")(y, p)) == pytest.approx(bce + lesion, rel=1e-4)
    with pytest.raises(ValueError, match="seg_dice must be one of"):
        segmentation_loss("batch")


def test_tversky_loss_weighs_missed_lesion_pixels_above_stray_ones():
    """Hand-computed: a 2x2 lesion half found (TP 2, FN 2) and an empty scan with one stray pixel (FP 1).
    Tversky index (TP + 1) / (TP + 0.3 FP + 0.7 FN + 1): 3 / 4.4 and 1 / 1.3; at 0.5 / 0.5 (smoothing 1/2) it is
    Dice."""
    y = np.zeros((2, 4, 4, 1), np.float32)
    p = np.zeros_like(y)
    y[0, :2, :2] = 1.0
    p[0, :1, :2] = 1.0
    p[1, 3, 3] = 1.0
    assert float(tversky_loss(y, p)) == pytest.approx(((1 - 3 / 4.4) + (1 - 1 / 1.3)) / 2)
    assert float(tversky_loss(y, p, 0.5, 0.5, smooth=0.5)) == pytest.approx(float(dice_loss(y, p)))  # = Dice
    # Same Dice (5/7), different Tversky: 2 of 4 lesion pixels missed (3 / 4.4) against a 2-pixel lesion found
    # with 2 stray pixels beside it (3 / 3.6).
    small = np.zeros_like(y[:1])
    small[0, :1, :2] = 1.0
    assert float(dice_loss(y[:1], p[:1])) == pytest.approx(float(dice_loss(small, y[:1])))
    assert float(tversky_loss(y[:1], p[:1])) == pytest.approx(1 - 3 / 4.4)
    assert float(tversky_loss(small, y[:1])) == pytest.approx(1 - 3 / 3.6)
    bce = float(np.mean(-np.log(1 - np.clip(p, 1e-7, 1 - 1e-7)) * (1 - y) - np.log(np.clip(p, 1e-7, 1)) * y))
    assert float(segmentation_loss("tversky")(y, p)) == pytest.approx(bce + float(tversky_loss(y, p)), rel=1e-4)


def test_ema_validates_stops_and_keeps_the_weights_moving_average():
    """With --ema the weights a phase ends with are the moving average of every step's weights (recorded here
    after each step and averaged by hand), restored by early stopping: not the last step's weights."""
    import keras

    from core.errors import ConfigError
    from core.training.classify import TrainConfig, check_inputs
    from core.training.segment import _compile, phase_callbacks

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4, 4, 1)).astype(np.float32)
    y = (x > 0.3).astype(np.float32)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
    momentum = 0.8
    _compile(model, 0.05, ema=momentum)
    steps = [[w.copy() for w in model.get_weights()]]  # then the weights after every step

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            steps.append([w.copy() for w in self.model.get_weights()])

    cbs = phase_callbacks(TrainConfig(ema=momentum, patience=50, lr_patience=50))
    assert isinstance(cbs[0], keras.callbacks.SwapEMAWeights)  # before EarlyStopping: it stores the average
    model.fit(x, y, validation_data=(x, y), batch_size=8, epochs=3, shuffle=False, verbose=0,
              callbacks=[Record(), *cbs])
    best = cbs[1].best_epoch
    average = steps[1]  # Keras starts the average at the first step's weights
    for w in steps[2:(best + 1) * 4 + 1]:  # 4 steps an epoch
        average = [momentum * a + (1 - momentum) * v for a, v in zip(average, w)]
    np.testing.assert_allclose(model.get_weights()[0], average[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(model.get_weights()[0], steps[(best + 1) * 4][0], atol=1e-4)
    with pytest.raises(ConfigError, match="--ema"):
        check_seg_choices(TrainConfig(ema=1.0))
    with pytest.raises(ConfigError, match="--ema .* segmentation"):
        check_inputs(TrainConfig(ema=0.99))  # a classifier


def test_segmentation_metrics_by_class_and_false_positive_area():
    rows = [{"class": "benign", "dice": 0.8, "iou": 0.7, "true_area": 0.1, "pred_area": 0.1},
            {"class": "malignant", "dice": 0.4, "iou": 0.25, "true_area": 0.2, "pred_area": 0.1},
            {"class": "normal", "dice": None, "iou": None, "true_area": 0.0, "pred_area": 0.05},
            {"class": "normal", "dice": None, "iou": None, "true_area": 0.0, "pred_area": 0.0}]
    m = segmentation_metrics(rows, ("benign", "malignant", "normal"), n_boot=200)
    assert m["n_lesion_images"] == 2 and m["dice"]["mean"] == pytest.approx(0.6)
    assert m["dice"]["ci95"][0] <= 0.6 <= m["dice"]["ci95"][1]
    assert m["by_class"]["malignant"]["iou"]["mean"] == pytest.approx(0.25) and "normal" not in m["by_class"]
    fp = m["no_lesion_images"]
    assert fp["n"] == 2 and fp["false_positive_area_mean"] == pytest.approx(0.025)
    assert fp["share_with_no_predicted_lesion"] == pytest.approx(0.5)


def test_post_processing_is_chosen_on_validation_maps():
    truth = np.zeros((20, 20), bool)
    truth[5:15, 5:15] = True
    m = np.zeros((20, 20), np.float32)
    m[5:15, 5:15] = 0.45  # the lesion sits just below 0.5
    m[0:2, 0:2] = 0.9  # a small bright false positive away from it
    best = choose_postprocessing([m], [truth])
    assert best["threshold"] < 0.45 and best["largest_region_only"] is True
    assert best["validation_score"] == pytest.approx(1.0)


def test_segmentation_bundle_end_to_end(tiny_segmenter, tiny_busi_tree):
    meta = json.loads((tiny_segmenter / "metadata.json").read_text())
    assert meta["kind"] == "segmenter" and meta["argv"][:2] == ["--task", "segmentation"]
    test = meta["metrics"]["test"]
    assert test["n_lesion_images"] > 0 and 0.0 <= test["dice"]["mean"] <= 1.0
    assert "no_lesion_images" in test and set(test["by_class"]) <= {"benign", "malignant"}
    assert meta["postprocessing"]["threshold"] in (0.3, 0.4, 0.5, 0.6, 0.7)
    rows = read_csv(tiny_segmenter / "predictions.csv")
    assert {r["split"] for r in rows} == {"val", "test"}
    normal = [r for r in rows if r["class"] == "normal"]
    assert normal
    # empty truth: Dice is undefined when nothing is predicted either, and 0 when the model outlines anything
    assert all(r["dice"] == ("" if float(r["pred_area"]) == 0 else "0.0000") for r in normal)


def test_segmenter_cross_validation_is_recorded(tiny_segmenter, tiny_busi_tree, tmp_path):
    import shutil

    bundle = tmp_path / "seg_tiny"
    shutil.copytree(tiny_segmenter, bundle)
    args = ["--task", "segmentation", "--dataset", "busi", "--data-dir", str(tiny_busi_tree), "--weights", "none",
            "--input-size", "32", "--head-epochs", "1", "--fine-tune-epochs", "0", "--batch-size", "8",
            "--dropout", "0", "--cv-folds", "2", "--cv-only", "--name", "seg_tiny", "--out-dir", str(tmp_path),
            "--quiet"]
    assert train.main(args) == 0
    cv = json.loads((bundle / "metadata.json").read_text())["cross_validation"]
    assert len(cv["folds"]) == 2 and sum(f["n_test"] for f in cv["folds"]) == 30
    assert cv["differs_from_checkpoint"]["fine_tune_epochs"] == {"checkpoint": 1, "cross_validation": 0}
    cv_rows = read_csv(bundle / "cv_predictions.csv")
    assert len(cv_rows) == 30 and all(c in cv_rows[0] for c in SHAPE_COLUMNS)
    # an image with a predicted lesion has its shape; one without has 0 regions and empty shape columns
    assert all((r["pred_width_to_depth"] == "") == (float(r["pred_area"]) == 0) for r in cv_rows)
    assert all((int(r["pred_regions"]) == 0) == (float(r["pred_area"]) == 0) for r in cv_rows)
    assert not (tmp_path / ".seg_tiny.cv").exists()


def test_committed_segmenter_rows_carry_the_predicted_shape():
    """The committed segmenter's validation and test rows (and its CV rows) carry the predicted lesion's shape:
    an image with no predicted lesion has 0 regions and no shape, every other a positive width-to-depth and a
    margin irregularity in [0, 1)."""
    bundle = ROOT / "checkpoints" / "busi_unet_densenet121"
    for name in ("predictions.csv", "cv_predictions.csv"):
        rows = read_csv(bundle / name)
        assert rows and all(c in rows[0] for c in SHAPE_COLUMNS)
        for r in rows:
            found = float(r["pred_area"]) > 0
            assert (int(r["pred_regions"]) > 0) == found, r["path"]
            if found:
                assert float(r["pred_width_to_depth"]) > 0 and 0 <= float(r["pred_margin_irregularity"]) < 1
            else:
                assert r["pred_width_to_depth"] == r["pred_margin_irregularity"] == r["pred_circularity"] == ""


def test_seg_decoder_names_its_architecture_and_an_unknown_one_is_refused():
    """Each decoder's architecture text: the committed segmenter's metadata says the one it was trained with, the
    plain U-Net's text is the one every bundle before the option recorded; an unknown decoder or Dice choice is a
    ConfigError."""
    from core.errors import ConfigError
    from core.training import TrainConfig

    committed = json.loads((ROOT / "checkpoints/busi_unet_densenet121/metadata.json").read_text())
    assert committed["architecture"] == SEG_DECODERS[committed["config"].get("seg_decoder", "unet")]
    assert TrainConfig().seg_decoder == "unet" and SEG_DECODERS["unet"].startswith(
        "U-Net: DenseNet121 encoder (skips conv1_relu, pool2_relu, pool3_relu, pool4_relu, relu), 5 decoder steps "
        "of bilinear 2x upsampling + concatenation + 2 x (3x3 conv, BatchNorm, ReLU)")
    assert SEG_DECODERS["attention"].startswith("Attention U-Net:") and "attention gate" in SEG_DECODERS["attention"]
    check_seg_choices(TrainConfig(seg_decoder="attention"))
    with pytest.raises(ConfigError, match="seg_decoder must be one of unet, attention"):
        check_seg_choices(TrainConfig(seg_decoder="transformer"))
    with pytest.raises(ConfigError, match="seg_dice"):
        check_seg_choices(TrainConfig(seg_dice="some_images"))
    from core.training import add_segmenter_cross_validation

    with pytest.raises(ConfigError, match="seg_decoder"):  # --cv-only refuses it too, before looking for the bundle
        add_segmenter_cross_validation(TrainConfig(seg_decoder="transformer", out_dir=str(ROOT / "no_such_folder")))


def test_segmentation_without_masks_is_a_clear_error(tmp_path, capsys):
    data = write_class_tree(tmp_path / "d", n_per_class=4, classes=("benign", "malignant", "normal"))
    rc = train.main(["--task", "segmentation", "--dataset", "busi", "--data-dir", str(data), "--weights", "none",
                     "--input-size", "32", "--out-dir", str(tmp_path / "out"), "--quiet"])
    assert rc == 2 and "No lesion masks" in capsys.readouterr().out


@needs_shared
def test_busi_masks_are_read_as_the_union_and_normals_are_empty():
    from core.data import load_busi

    m = load_busi(BUSI)
    pick = [next(i for i, s in enumerate(m.samples) if s.class_name == c) for c in ("benign", "malignant", "normal")]
    double = next(i for i, s in enumerate(m.samples) if len(s.mask_paths) > 1)
    _, y = load_seg_arrays(m.subset(pick + [double]), 64)
    assert y[0].any() and y[1].any() and not y[2].any() and y[3].any()


@pytest.mark.parametrize("task,extra,words", [
    ("binary", ["--backbone", "densenet121", "--input-size", "7"], "too small for densenet121: use 32 px"),
    ("binary", ["--backbone", "simple_cnn", "--input-size", "4"], "too small for simple_cnn: use 8 px"),
    ("segmentation", ["--input-size", "200"], "multiple of 32"),
    ("binary", ["--backbone", "simple_cnn", "--input-size", "16", "--weights", "missing.weights.h5"],
     "Weights file not found"),
])
def test_impossible_input_size_or_missing_weights_refused_before_decoding(tmp_path, capsys, task, extra, words):
    """A DATA folder that does not exist shows the refusal comes first: no image is read (it was a Keras
    traceback after decoding every image)."""
    args = ["--task", task, "--dataset", "busi", "--data-dir", str(tmp_path / "no_data"), "--weights", "none",
            "--out-dir", str(tmp_path / "out"), "--quiet", *extra]
    rc = train.main(args)
    out = capsys.readouterr().out
    assert rc == 2 and words in out and "folder not found" not in out


def _mini_unet(side: int = 32):
    """A few-layer stand-in for the U-Net with its decoder's layer names: an 'encoder' convolution to side/16, then
    four `seg_relu<step>_2` steps doubling the side, and the `seg_mask` sigmoid output at the input side."""
    import keras
    from keras import layers

    inp = keras.Input((side, side, 3), name="image")
    x = layers.ReLU(name="relu")(layers.Conv2D(4, 16, strides=16, name="enc")(inp))  # the encoder's last map
    for step in (1, 2, 3, 4):
        if step > 1:
            x = layers.UpSampling2D(2, name=f"seg_up{step}")(x)
        x = layers.Conv2D(4, 3, padding="same", name=f"seg_conv{step}_2")(x)
        x = layers.ReLU(name=f"seg_relu{step}_2")(x)
    x = layers.UpSampling2D(2, name="seg_up5")(x)
    return keras.Model(inp, layers.Conv2D(1, 1, activation="sigmoid", name="seg_mask")(x))


def test_deep_supervision_adds_weighted_side_outputs_for_training_only():
    """--deep-supervision: one full-size auxiliary map per decoder step 1-4; the training loss is the lesion map's
    loss + W x each auxiliary map's (checked against the loss computed by hand on the outputs); early stopping follows
    the lesion map's own loss; the model trained and kept has its one output."""
    import keras

    from core.errors import ConfigError
    from core.training.classify import TrainConfig, check_inputs
    from core.training.segment import _compile, deep_supervision_outputs, fit_segmenter, phase_callbacks

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (8, 32, 32, 3)).astype(np.float32)
    y = np.zeros((8, 32, 32, 1), np.float32)
    y[:4, 8:20, 10:24] = 1.0  # four lesion images, four empty
    model = _mini_unet()
    outs = deep_supervision_outputs(model)
    assert list(outs) == ["seg_mask", "ds1", "ds2", "ds3", "ds4"]
    assert all(tuple(t.shape) == (None, 32, 32, 1) for t in outs.values())
    net = keras.Model(model.input, outs)
    _compile(net, 1e-3, deep_supervision=0.3)
    logs = net.evaluate(x, {n: y for n in outs}, batch_size=8, verbose=0, return_dict=True)
    pred = net.predict(x, verbose=0)
    each = {n: float(segmentation_loss()(y, pred[n])) for n in outs}
    assert logs["seg_mask_loss"] == pytest.approx(each["seg_mask"], rel=1e-4)
    assert logs["loss"] == pytest.approx(each["seg_mask"] + 0.3 * sum(each[f"ds{s}"] for s in (1, 2, 3, 4)), rel=1e-4)

    cfg = TrainConfig(deep_supervision=0.3, head_epochs=2, fine_tune_epochs=0, batch_size=4, patience=5, augment=False,
                      precision="float32", verbose=0)
    assert [c.monitor for c in phase_callbacks(cfg)] == ["val_seg_mask_loss"] * 2
    before = model.get_layer("seg_conv1_2").get_weights()[0].copy()
    history, _ = fit_segmenter(model, cfg, x.astype(np.uint8), y, x[:4].astype(np.uint8), y[:4])
    assert len(history) == 2 and {"iou", "val_iou", "val_seg_mask_loss", "val_ds1_loss"} <= set(history[0])
    assert not np.allclose(model.get_layer("seg_conv1_2").get_weights()[0], before)  # trained through the wrapper
    assert len(model.outputs) == 1 and not any(l.name.startswith("ds") for l in model.layers)
    with pytest.raises(ConfigError, match="--deep-supervision"):
        check_seg_choices(TrainConfig(deep_supervision=-1.0))
    with pytest.raises(ConfigError, match="--deep-supervision .* segmentation"):
        check_inputs(TrainConfig(deep_supervision=0.5))  # a classifier


def test_seg_classify_trains_an_image_class_head_for_training_only():
    """--seg-classify: a softmax over the image classes on the encoder's last map beside the lesion map; the training
    loss is the lesion map's loss + W x the class cross-entropy (checked by hand on the outputs); early stopping
    follows the lesion map's own loss; the class loss reaches the encoder; the model kept has its one output."""
    import keras

    from core.errors import ConfigError
    from core.training.classify import TrainConfig, check_inputs
    from core.training.segment import _compile, class_head_output, fit_segmenter, phase_callbacks

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, (9, 32, 32, 3)).astype(np.float32)
    y = np.zeros((9, 32, 32, 1), np.float32)
    y[:6, 8:20, 10:24] = 1.0  # six lesion images (benign, malignant), three normal
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    model = _mini_unet()
    head = class_head_output(model, 3)
    assert tuple(head.shape) == (None, 3)
    net = keras.Model(model.input, {"seg_mask": model.output, "cls": head})
    _compile(net, 1e-3, seg_classify=0.4)
    small = x / 255.0  # moderate logits, so the cross-entropy by hand needs no clipping
    logs = net.evaluate(small, {"seg_mask": y, "cls": labels}, batch_size=9, verbose=0, return_dict=True)
    pred = net.predict(small, verbose=0)
    seg = float(segmentation_loss()(y, pred["seg_mask"]))
    ce = float(-np.mean(np.log(pred["cls"][np.arange(9), labels])))
    assert logs["seg_mask_loss"] == pytest.approx(seg, rel=1e-4)
    assert logs["loss"] == pytest.approx(seg + 0.4 * ce, rel=1e-4)

    cfg = TrainConfig(seg_classify=0.4, head_epochs=2, fine_tune_epochs=0, batch_size=3, patience=5, augment=False,
                      precision="float32", verbose=0)
    assert [c.monitor for c in phase_callbacks(cfg)] == ["val_seg_mask_loss"] * 2
    model = _mini_unet()
    with pytest.raises(ValueError, match="--seg-classify needs"):
        fit_segmenter(model, cfg, x.astype(np.uint8), y, x[:3].astype(np.uint8), y[:3])
    history, _ = fit_segmenter(model, cfg, x.astype(np.uint8), y, x[::3].astype(np.uint8), y[::3],
                               labels=(labels, labels[::3]), n_classes=3)
    assert len(history) == 2 and {"iou", "val_iou", "val_seg_mask_loss", "val_cls_loss", "cls_accuracy"} <= set(
        history[0])
    assert len(model.outputs) == 1 and not any(l.name.startswith("cls") for l in model.layers)

    # the class loss reaches the encoder when it is fine-tuned: the same start and batches move it differently
    tune = TrainConfig(**{**cfg.__dict__, "head_epochs": 0, "fine_tune_epochs": 2, "fine_tune_layers": -1})
    seg_only, with_cls = _mini_unet(), _mini_unet()
    with_cls.set_weights(seg_only.get_weights())
    enc0 = seg_only.get_layer("enc").get_weights()[0].copy()
    keras.utils.set_random_seed(0)
    fit_segmenter(seg_only, TrainConfig(**{**tune.__dict__, "seg_classify": 0.0}), x.astype(np.uint8), y,
                  x[::3].astype(np.uint8), y[::3])
    keras.utils.set_random_seed(0)
    fit_segmenter(with_cls, tune, x.astype(np.uint8), y, x[::3].astype(np.uint8), y[::3],
                  labels=(labels, labels[::3]), n_classes=3)
    moved = [np.abs(m.get_layer("enc").get_weights()[0] - enc0).sum() for m in (seg_only, with_cls)]
    assert moved[0] > 0 and moved[1] > 0 and not np.isclose(moved[0], moved[1])
    with pytest.raises(ConfigError, match="--seg-classify"):
        check_seg_choices(TrainConfig(seg_classify=-0.1))
    with pytest.raises(ConfigError, match="--seg-classify .* segmentation"):
        check_inputs(TrainConfig(seg_classify=0.5))  # a classifier


def test_elastic_deformation_bends_the_mask_with_the_image():
    """--elastic: without rotation, zoom and shift keep a rectangular lesion's mask a filled axis-aligned rectangle;
    the elastic deformation bends it (mask area differs from its bounding box) on some images, the image alike;
    a magnitude outside [0, 1], --no-augment and a classifier run are refused."""
    from core.errors import ConfigError
    from core.training.classify import TrainConfig, check_inputs
    from core.training.segment import make_joint_augmenter

    img = np.full((16, 64, 64, 3), 40.0, np.float32)
    masks = np.zeros((16, 64, 64, 1), np.float32)
    img[:, 16:44, 12:50] = 220.0
    masks[:, 16:44, 12:50] = 1.0

    def bent(elastic: float) -> int:
        augment = make_joint_augmenter(5, flip="none", rotation=0.0, elastic=elastic)
        out, m = (np.asarray(a) for a in augment(img, masks))
        n = 0
        for o, k in zip(out, m[..., 0] > 0):
            rows, cols = np.where(k)
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            n += k.sum() < 0.97 * box
            assert o[k].mean() > 150 > o[~k].mean()  # the lesion is still where its mask says
        return n

    assert bent(0.0) == 0
    assert bent(1.0) >= 3
    with pytest.raises(ConfigError, match="--elastic"):
        check_seg_choices(TrainConfig(elastic=-1.0))
    with pytest.raises(ConfigError, match="--elastic"):
        check_seg_choices(TrainConfig(elastic=1.5))  # Keras's elastic transform takes magnitudes up to 1
    with pytest.raises(ConfigError, match="--no-augment"):
        check_seg_choices(TrainConfig(elastic=0.5, augment=False))  # would be silently off
    with pytest.raises(ConfigError, match="--elastic .* segmentation"):
        check_inputs(TrainConfig(elastic=1.0))  # a classifier


def test_a_classifier_starts_from_a_segmenters_encoder_on_its_split_only(tiny_segmenter, tiny_busi_tree, tmp_path,
                                                                          capsys, monkeypatch):
    """--weights SEGMENTER_BUNDLE: the classifier's DenseNet121 trunk holds the segmenter's encoder weights layer by
    layer and its provenance names the bundle and model hash; a split that moves the segmenter's images is refused
    (it would score images the encoder trained on); `python train.py` retrains a segmenter that is not here first,
    for such a classifier and for such an ensemble member."""
    from dataclasses import replace

    import train
    from core.checkpoints import load_classifier, load_segmenter, read_metadata
    from core.errors import ConfigError
    from core.training.classify import check_inputs

    base = ["--dataset", "busi", "--data-dir", str(tiny_busi_tree), "--backbone", "densenet121",
            "--weights", str(tiny_segmenter), "--input-size", "32", "--trunk-layer", "pool4_relu", "--head-units", "0",
            "--logistic-c", "0.01", "--fine-tune-epochs", "0", "--no-augment", "--out-dir", str(tmp_path), "--quiet"]
    assert train.main(base + ["--split-file", str(tiny_segmenter / "split.csv"), "--name", "enc"]) == 0
    meta, seg_meta = read_metadata(tmp_path / "enc"), read_metadata(tiny_segmenter)
    assert meta["weights"]["source"] == "segmenter encoder" and meta["weights"]["sha256"] == seg_meta["model_sha256"]
    assert meta["weights"]["segmenter_command"] == seg_meta["command"]
    assert meta["weights"]["segmenter_argv"] == seg_meta["argv"]
    clf, seg = load_classifier(tmp_path / "enc", backend="keras"), load_segmenter(tiny_segmenter, backend="keras")
    for name in ("conv1_conv", "conv3_block12_2_conv", "conv4_block24_2_conv"):
        for a, b in zip(clf.model.get_layer(name).get_weights(), seg.keras_model().get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)

    assert train.main(base + ["--name", "moved", "--seed", "7"]) == 2  # another split than the segmenter's
    out = capsys.readouterr()
    assert "in another split than for the segmenter" in out.out + out.err
    cfg = train.config_from_args(train.build_parser().parse_args(base + ["--name", "x"]))
    check_inputs(replace(cfg, cv_folds=3))  # cross-validation retrains the encoder per fold (next test)

    # `python train.py` (refresh every checkpoint): the segmenter is retrained first where its bundle is not here
    calls = []
    monkeypatch.setattr(train, "main", lambda a: calls.append(a) or 0)
    assert train.encoder_first(meta, meta["argv"], tmp_path) == (meta["argv"], 0) and not calls  # it is here
    gone = [a if a != str(tiny_segmenter) else str(tmp_path / "gone") for a in meta["argv"]]
    argv, failed = train.encoder_first(meta, gone, tmp_path)
    assert failed == 0 and calls == [[*seg_meta["argv"], "--out-dir", str(tmp_path / ".encoders"), "--name",
                                      "seg_tiny"]]
    assert argv[argv.index("--weights") + 1] == str(tmp_path / ".encoders" / "seg_tiny")
    # ... and so is an ensemble member's, before the member is retrained and the ensemble joined again
    calls.clear()
    root = tmp_path / "refresh"
    (root / "ens").mkdir(parents=True)
    write_json(root / "ens" / "metadata.json", {"name": "ens", "argv": ["--ensemble", "m1", "m2", "--name", "ens"],
                                                "ensemble": {"members": [
                                                    {"name": "plain", "argv": ["--name", "plain"], "weights": {}},
                                                    {"name": "enc", "argv": gone, "weights": meta["weights"]}]}})
    assert train.refresh_all(root) == 0
    assert calls[0][:2] == ["--name", "plain"] and len(calls) == 4
    assert calls[1] == [*seg_meta["argv"], "--out-dir", str(root / ".encoders"), "--name", "seg_tiny"]
    assert calls[2][calls[2].index("--weights") + 1] == str(root / ".encoders" / "seg_tiny")
    assert calls[3][:3] == ["--ensemble", str(root / ".members" / "ens_member1"), str(root / ".members" / "ens_member2")]
    with pytest.raises(ConfigError, match="starts a classifier"):
        check_inputs(cfg, segmentation=True)


def test_cross_validation_retrains_the_segmenters_encoder_in_every_fold(tiny_segmenter, tiny_busi_tree, tmp_path,
                                                                       monkeypatch):
    """With --weights SEGMENTER_BUNDLE each fold's trunk is the segmenter's recipe retrained on that fold's training
    masks (never the bundle's encoder, which learned from held-out masks); a resumed run reuses the fold's encoder
    file; the recorded method says so. With --pooling lesion the folds' whole segmenters (kept beside the encoders)
    are reused, not retrained."""
    from dataclasses import replace

    import keras

    import train
    from core.checkpoints import load_segmenter
    from core.models import encoder_weights
    from core.training import classify
    from core.training.segment import encoder_recipe

    seen = []
    real = classify.train_model

    def spy(cfg, *args, **kwargs):
        seen.append(cfg.weights)
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(classify, "train_model", spy)
    argv = ["--dataset", "busi", "--data-dir", str(tiny_busi_tree), "--backbone", "densenet121",
            "--weights", str(tiny_segmenter), "--input-size", "32", "--trunk-layer", "pool4_relu", "--head-units",
            "0", "--logistic-c", "0.01", "--fine-tune-epochs", "0", "--no-augment", "--out-dir", str(tmp_path),
            "--name", "encv", "--cv-folds", "2", "--quiet"]
    cfg = train.config_from_args(train.build_parser().parse_args(argv))
    manifest = classify.load_manifest(cfg)
    cv = classify.cross_validate(cfg, manifest, work_dir=tmp_path / "cv")
    assert len(seen) == 2 and len(set(seen)) == 2 and str(tiny_segmenter) not in seen
    files = sorted((tmp_path / ".fold-encoders").glob("*.weights.h5"))
    assert [Path(w) for w in seen] == files and [f.name[:7] for f in files] == ["fold_1_", "fold_2_"]
    assert "retrained on that fold's training masks by seg_tiny's recipe (its checkpoint's configuration)" in \
        cv["method"]
    assert len(cv["predictions"]) == len(manifest.samples)
    recipe, _ = encoder_recipe(tiny_segmenter)
    assert recipe.task == "segmentation" and recipe.cv_folds == 0 and recipe.verbose == 0

    trunk = keras.applications.DenseNet121(include_top=False, weights=None)
    trunk.load_weights(str(files[0]))
    bundle = encoder_weights(load_segmenter(tiny_segmenter, backend="keras").keras_model())
    mine = [l.get_weights() for l in trunk.layers if l.weights]
    assert len(mine) == len(bundle)
    assert not all(np.array_equal(a, b) for m, r in zip(mine, bundle) for a, b in zip(m, r))

    stamps = [f.stat().st_mtime_ns for f in files]
    for f in (tmp_path / "cv").glob("fold_*.npz"):
        f.unlink()  # the folds' predictions are redone; their encoders are reused
    seen.clear()
    classify.cross_validate(cfg, manifest, work_dir=tmp_path / "cv")
    assert [Path(w) for w in seen] == files and [f.stat().st_mtime_ns for f in files] == stamps

    # --pooling lesion on the same folds: each fold's whole segmenter, the one its encoder came from (not retrained)
    whole = sorted((tmp_path / ".fold-encoders").glob("*.keras"))
    assert [f.with_suffix("").name for f in whole] == [f.name[:-len(".weights.h5")] for f in files]
    stamps = [f.stat().st_mtime_ns for f in whole]
    seen.clear()
    lesion = replace(cfg, pooling="lesion", name="lpcv")
    cv = classify.cross_validate(lesion, manifest, work_dir=tmp_path / "lpcv")
    assert [Path(w) for w in seen] == whole and [f.stat().st_mtime_ns for f in whole] == stamps
    assert len(cv["predictions"]) == len(manifest.samples)
    assert "in every fold the whole segmenter (its lesion map and encoder) is retrained on that fold's" in cv["method"]


def test_a_classifier_pools_the_segmenters_features_over_its_predicted_lesion(tiny_segmenter, tiny_busi_tree,
                                                                              tmp_path, capsys, monkeypatch):
    """--pooling lesion: the whole segmenter runs inside the classifier and its encoder map is averaged over the
    segmenter's own lesion map (checked against the segmenter's outputs by hand); Grad-CAM targets the pooled map;
    the provenance names the bundle; a classifier without a segmenter is refused before any image is decoded; a
    refresh retrains a missing segmenter first (cross-validation:
    `test_cross_validation_retrains_the_segmenters_encoder_in_every_fold`)."""
    import keras

    import train
    from core.checkpoints import load_classifier, load_segmenter, read_metadata
    from core.explain import explain
    from core.models import LESION_POOL_NAME

    base = ["--dataset", "busi", "--data-dir", str(tiny_busi_tree), "--backbone", "densenet121",
            "--weights", str(tiny_segmenter), "--input-size", "32", "--pooling", "lesion", "--trunk-layer",
            "pool4_relu", "--head-units", "0", "--logistic-c", "0.01", "--fine-tune-epochs", "0", "--no-augment",
            "--out-dir", str(tmp_path), "--quiet"]
    assert train.main(base + ["--split-file", str(tiny_segmenter / "split.csv"), "--name", "lp"]) == 0
    meta, seg_meta = read_metadata(tmp_path / "lp"), read_metadata(tiny_segmenter)
    assert meta["weights"]["source"] == "segmenter" and meta["weights"]["sha256"] == seg_meta["model_sha256"]
    assert meta["gradcam_layer"] == "pool4_relu" and meta["head"]["pooling"] == "lesion"

    clf, seg = load_classifier(tmp_path / "lp", backend="keras"), load_segmenter(tiny_segmenter, backend="keras")
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    s = seg.keras_model()
    feats, lesion = (np.asarray(t) for t in keras.Model(s.input, [s.get_layer("pool4_relu").output, s.output])(x))
    cells = lesion[..., 0].reshape(3, 2, 16, 2, 16).mean(axis=(2, 4))  # the lesion's share of each 2 x 2 cell
    w = np.where(cells.sum((1, 2), keepdims=True) >= 4e-3, cells / np.maximum(cells.sum((1, 2), keepdims=True), 1e-6),
                 0.25)
    pooled = np.asarray(keras.Model(clf.model.input, clf.model.get_layer(LESION_POOL_NAME).output)(x))
    np.testing.assert_allclose(pooled, (feats * w[..., None]).sum((1, 2)), rtol=1e-4, atol=1e-5)
    assert clf.predict_proba(x[0].astype(np.uint8)).shape == (1, 3)
    gc = explain(clf, x[0].astype(np.uint8), "gradcam")
    assert gc.attribution.shape == (32, 32) and np.isfinite(gc.attribution).all()

    for argv in (["--weights", "imagenet"], ["--trunk-layer", ""]):  # no segmenter / nothing to pool
        bad = list(base)
        bad[bad.index(argv[0]) + 1] = argv[1]
        assert train.main(bad + ["--name", "bad"]) == 2
        out = capsys.readouterr()
        assert "--pooling lesion averages an encoder map" in out.out + out.err

    # `python train.py` (refresh every checkpoint) retrains its segmenter first when the bundle is not here
    calls = []
    monkeypatch.setattr(train, "main", lambda a: calls.append(a) or 0)
    gone = [a if a != str(tiny_segmenter) else str(tmp_path / "gone") for a in meta["argv"]]
    argv, failed = train.encoder_first(meta, gone, tmp_path)
    assert failed == 0 and calls == [[*seg_meta["argv"], "--out-dir", str(tmp_path / ".encoders"), "--name",
                                      "seg_tiny"]]
    assert argv[argv.index("--weights") + 1] == str(tmp_path / ".encoders" / "seg_tiny")
