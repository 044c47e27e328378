"""Batch explanations: the serial path and a 2-worker local Ray give the same results and files."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from core.batch import explain_folder, list_images, main
from tests.conftest import write_class_tree

PARAMS = {"lime": {"num_samples": 40, "n_segments": 8, "random_seed": 1}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = write_class_tree(tmp_path_factory.mktemp("batch") / "imgs", n_per_class=2, seed=9)
    (root / "broken.png").write_bytes(b"not an image")
    noise = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "noise.png")  # out of distribution for the tiny model
    return root


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_serial_run_writes_overlays_attributions_and_csv(tiny_bundle, folder, tmp_path):
    s = explain_folder(tiny_bundle, folder, ["gradcam", "lime"], tmp_path / "serial", PARAMS, serial=True,
                       log=lambda *_: None)
    assert s["images"] == 6 and s["errors"] == 1
    r = rows(tmp_path / "serial" / "results.csv")
    noise = next(x for x in r if x["path"] == "noise.png")  # no verdict, probabilities kept
    assert noise["out_of_distribution"] == "True" and noise["predicted"] == "" and float(noise["p_malignant"]) >= 0
    assert all(x["predicted"] in ("benign", "malignant") for x in r if x["out_of_distribution"] == "False")
    bad = next(x for x in r if x["path"] == "broken.png")
    assert "not an image" in bad["error"]
    good = [x for x in r if not x["error"]]
    assert all(0.0 <= float(x["gradcam_deletion_auc"]) <= 1.0 for x in good)
    assert {x["gradcam_weak_effect"] for x in good} == {"False"} and all(x["lime_weak_effect"] for x in good)
    a = np.load(tmp_path / "serial" / "attributions" / "benign" / "benign (1).lime.npy")
    assert a.dtype == np.float16 and a.shape == (48, 48)
    assert (tmp_path / "serial" / "overlays" / "malignant" / "malignant (2).gradcam.png").is_file()
    assert json.loads((tmp_path / "serial" / "summary.json").read_text())["mode"] == "serial"


def test_out_of_distribution_rows_name_the_installed_checkpoint_that_accepts_them(tiny_bundle, folder, tmp_path,
                                                                                  capsys):
    from tests.conftest import install_copies

    ck = install_copies(tiny_bundle, tmp_path / "ck", ("strict", "lenient", "also_strict"), accept_all=("lenient",))
    assert main([str(ck / "strict"), str(folder), "--methods", "gradcam", "--out", str(tmp_path / "o"),
                 "--serial"]) == 0
    r = {x["path"]: x for x in rows(tmp_path / "o" / "results.csv")}
    flagged = [p for p, x in r.items() if x["out_of_distribution"] == "True"]  # noise.png, and what else the tiny
    assert "noise.png" in flagged  # model's detector rejects (it is retrained each test session)
    n = len(flagged)
    out = capsys.readouterr().out
    assert f"{n} out of distribution: no verdict, {n} of them fit another installed checkpoint" in out
    assert all(r[p]["predicted"] == "" and r[p]["suitable_checkpoints"] == "lenient" for p in flagged)
    assert all(x["suitable_checkpoints"] == "" for p, x in r.items() if p not in flagged)
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["out_of_distribution"] == n and s["fit_another_checkpoint"] == n
    main([str(ck / "lenient"), str(folder), "--methods", "gradcam", "--out", str(tmp_path / "l"), "--serial"])
    r = {x["path"]: x for x in rows(tmp_path / "l" / "results.csv")}
    assert r["noise.png"]["predicted"] in ("benign", "malignant") and r["noise.png"]["suitable_checkpoints"] == ""


def test_ray_with_two_local_workers_equals_the_serial_path(tiny_bundle, folder, tmp_path, ray_local):
    serial = explain_folder(tiny_bundle, folder, ["gradcam", "lime"], tmp_path / "s", PARAMS, serial=True,
                            log=lambda *_: None)
    ray_run = explain_folder(tiny_bundle, folder, ["gradcam", "lime"], tmp_path / "r", PARAMS, workers=2,
                             log=lambda *_: None)
    assert ray_run["mode"] == "ray (local, 2 workers)" and serial["images"] == ray_run["images"]
    a, b = rows(tmp_path / "s" / "results.csv"), rows(tmp_path / "r" / "results.csv")
    assert [x["path"] for x in a] == [x["path"] for x in b]
    for x, y in zip(a, b):
        for k in x:
            if k.endswith("_seconds"):
                continue
            try:
                assert float(x[k]) == pytest.approx(float(y[k]), abs=1e-5), k
            except ValueError:
                assert x[k] == y[k], k
    for f in (tmp_path / "s" / "attributions").rglob("*.npy"):
        assert np.allclose(np.load(f), np.load(tmp_path / "r" / f.relative_to(tmp_path / "s")), atol=1e-3)


def test_cli_errors_are_messages(tiny_bundle, tmp_path, capsys):
    assert main([str(tiny_bundle), str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--serial"]) == 2
    assert "No folder" in capsys.readouterr().err
    assert main([str(tiny_bundle), str(tmp_path), "--methods", "magic", "--out", str(tmp_path / "o")]) == 2
    assert list_images(tmp_path) == []


def test_lesions_of_an_ultrasound_folder_with_the_masks_beside_the_scans(tiny_bundle, tiny_segmenter, tmp_path):
    """With a segmenter of the checkpoint's modality beside it: each accepted scan's predicted lesion (PNG equal to
    load_segmenter's mask), its size columns, Dice against the BUSI masks beside it computed by hand; none for a
    scan the check rejects; --no-lesions skips it all."""
    import shutil

    from core.checkpoints import load_segmenter
    from core.preprocessing import load_image, load_mask
    from core.segmentation import dice_iou, lesion_measurements
    from tests.conftest import install_copies, write_busi_tree

    scans = write_busi_tree(tmp_path / "scans", n_per_class=2, size=48, seed=11)
    noise = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(scans / "noise.png")  # no mask beside it
    ck = install_copies(tiny_bundle, tmp_path / "ck", ("us", "us_strict"), accept_all=("us",),
                        kinds={"us": "busi", "us_strict": "busi"})
    shutil.copytree(tiny_segmenter, ck / "seg")
    seg = load_segmenter(ck / "seg")
    s = explain_folder(ck / "us", scans, ["gradcam"], tmp_path / "o", serial=True, log=lambda *_: None)
    assert s["segmenter"] == "seg" and s["images"] == 7
    r = {x["path"]: x for x in rows(tmp_path / "o" / "results.csv")}
    scored = []
    for rel, x in r.items():
        img = load_image(scans / rel)
        pred = seg.predict_mask(img)
        saved = np.asarray(Image.open(tmp_path / "o" / "lesions" / rel)) == 255
        assert np.array_equal(saved, pred), rel
        m = lesion_measurements(pred)
        assert float(x["lesion_area_fraction"]) == pytest.approx(m["area_fraction"] if m else 0.0, abs=1e-6)
        assert x["lesion_orientation"] == (m["orientation"] if m else "")
        if rel == "noise.png":
            assert x["lesion_true_area_fraction"] == "" and x["lesion_dice"] == ""
            continue
        truth = load_mask([str(scans / rel).replace(".png", "_mask.png")], pred.shape)
        assert float(x["lesion_true_area_fraction"]) == pytest.approx(truth.mean(), abs=1e-6)
        if truth.any():
            d, j = dice_iou(pred, truth)
            assert float(x["lesion_dice"]) == pytest.approx(d) and float(x["lesion_iou"]) == pytest.approx(j)
            scored.append(d)
        else:  # a normal scan: no Dice to compute
            assert rel.startswith("normal") and x["lesion_dice"] == ""
    assert len(scored) == 4 and s["lesion_images_scored"] == 4
    assert s["lesion_dice_mean"] == pytest.approx(np.mean(scored))
    assert s["lesions_outlined"] == sum(float(x["lesion_area_fraction"]) > 0 for x in r.values())

    strict = explain_folder(ck / "us_strict", scans, ["gradcam"], tmp_path / "st", serial=True, log=lambda *_: None)
    x = next(x for x in rows(tmp_path / "st" / "results.csv") if x["path"] == "noise.png")
    assert x["out_of_distribution"] == "True" and x.get("lesion_area_fraction", "") == ""
    assert not (tmp_path / "st" / "lesions" / "noise.png").exists() and strict["segmenter"] == "seg"
    assert main([str(ck / "us"), str(scans), "--methods", "gradcam", "--out", str(tmp_path / "n"), "--serial",
                 "--no-lesions"]) == 0
    assert not any(k.startswith("lesion") for k in rows(tmp_path / "n" / "results.csv")[0])
    assert not (tmp_path / "n" / "lesions").exists()
