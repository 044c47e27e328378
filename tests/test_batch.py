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
