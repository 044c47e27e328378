"""BreakHis end to end on a temporary official-layout tree built from the 12 real samples; ResNet50 from scratch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from core.checkpoints import load_classifier, read_csv
from core.data import load_breakhis, parse_breakhis_name
from tests.conftest import BREAKHIS, needs_shared


@pytest.fixture(scope="module")
def breakhis_tree(tmp_path_factory) -> Path:
    """Each real sample cut into 4 crops saved as consecutive sequence numbers of the same patient/slide."""
    root = tmp_path_factory.mktemp("bh") / "BreaKHis_v1"
    for f in sorted(BREAKHIS.rglob("SOB_*.png")):
        rel = f.relative_to(BREAKHIS)
        info = parse_breakhis_name(f.name)
        img = np.asarray(Image.open(f).convert("RGB"))
        h, w = img.shape[:2]
        for k, (y, x) in enumerate([(0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2)]):
            crop = img[y:y + h // 2, x:x + w // 2]
            name = f.name.replace(f"-{info['seq']:03d}.png", f"-{info['seq'] * 10 + k:03d}.png")
            out = root / rel.parent / name
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop).resize((64, 42)).save(out)
    return root


@needs_shared
@pytest.mark.parametrize("task", ["binary", "subtype"])
def test_breakhis_train_patient_level_split(breakhis_tree, tmp_path, task):
    m = load_breakhis(breakhis_tree, task=task)
    assert len(m) == 48 and len({s.group for s in m}) == 9
    rc = train.main(["--dataset", "breakhis", "--data-dir", str(breakhis_tree), "--task", task,
                     "--backbone", "simple_cnn", "--input-size", "32", "--head-epochs", "1",
                     "--fine-tune-epochs", "0", "--head-units", "8", "--out-dir", str(tmp_path), "--name", "bh",
                     "--quiet"])
    assert rc == 0
    rows = read_csv(tmp_path / "bh" / "split.csv")
    by_split = {s: {r["group"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert all(by_split[s] for s in by_split)
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"]) \
        and not (by_split["val"] & by_split["test"]), "a patient appears in two splits"
    meta = json.loads((tmp_path / "bh" / "metadata.json").read_text())
    assert len(meta["class_names"]) == (2 if task == "binary" else 8)
    assert meta["dataset"]["task"] == task


@needs_shared
def test_breakhis_magnification_filter_and_seed_defaults(breakhis_tree):
    m40 = load_breakhis(breakhis_tree, magnification=40)
    assert m40 and all(s.magnification == 40 for s in m40)
    args = train.build_parser().parse_args(["--dataset", "breakhis"])
    cfg = train.config_from_args(args)
    assert (cfg.input_size, cfg.fine_tune_layers, cfg.l2, cfg.dropout, cfg.lr, cfg.patience, cfg.lr_factor) == \
        (150, 10, 0.01, 0.5, 1e-4, 10, 0.2)


@pytest.mark.slow
def test_resnet50_from_scratch_trains_and_gradcam_works(tiny_tree, tmp_path):
    from core.explain import explain

    rc = train.main(["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "resnet50",
                     "--weights", "none", "--input-size", "32", "--head-epochs", "1", "--fine-tune-epochs", "0",
                     "--batch-size", "8", "--out-dir", str(tmp_path), "--name", "r50", "--quiet"])
    assert rc == 0
    clf = load_classifier(tmp_path / "r50")
    assert clf.metadata["gradcam_layer"] == "conv5_block3_out"
    img = np.asarray(Image.open(next((tiny_tree / "benign").glob("*.png"))).convert("RGB"))
    e = explain(clf, img, "gradcam")
    assert e.attribution.shape == img.shape[:2] and np.isfinite(e.attribution).all()
    assert e.params["layer"] == "conv5_block3_out"


def test_imagenet_offline_message_from_train(tiny_tree, tmp_path, monkeypatch, capsys):
    import core.models as cm

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(cm, "_online", lambda *a, **k: False)
    rc = train.main(["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "resnet50",
                     "--weights", "imagenet", "--input-size", "32", "--out-dir", str(tmp_path), "--quiet"])
    assert rc == 2
    out = capsys.readouterr().out
    assert "--weights PATH" in out and "--weights none" in out
    assert not (tmp_path / "folder_resnet50").exists()
