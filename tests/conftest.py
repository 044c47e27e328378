"""Shared fixtures: tiny generated datasets, a tiny trained bundle, and the ../shared data location."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("BREASTXAI_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
BUSI = DATA / "busi" / "Dataset_BUSI_with_GT"
BREAKHIS = DATA / "breakhis_samples" / "BreaKHis_v1"
UCSB = DATA / "ucsb_breast" / "BreastCancerCell_dataset"
BREAKHIS_200X = DATA / "breakhis_200x"
IDC = DATA / "idc"
DENSENET_WEIGHTS = SHARED / "weights" / "densenet121_imagenet_notop.weights.h5"

needs_shared = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not available")


def make_class_image(label: int, rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """Class 0: dark background with a bright square; class 1: bright background with a dark disc."""
    img = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
    c = rng.integers(size // 4, 3 * size // 4, 2)
    r = size // 6
    yy, xx = np.mgrid[:size, :size]
    if label == 0:
        img[max(c[0] - r, 0):c[0] + r, max(c[1] - r, 0):c[1] + r] = 230
    else:
        img[:] = 200 + img // 4
        img[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 < r * r] = 20
    return img


def write_class_tree(root: Path, n_per_class: int = 12, size: int = 48, seed: int = 0,
                     classes=("benign", "malignant"), masks: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = make_class_image(label % 2, rng, size)
            Image.fromarray(img).save(root / cls / f"{cls} ({i + 1}).png")
            if masks:
                m = np.zeros((size, size), np.uint8)
                m[size // 4: size // 2, size // 4: size // 2] = 255
                Image.fromarray(m).save(root / cls / f"{cls} ({i + 1})_mask.png")
    return root


# The suite runs on two processes (pytest-xdist, `-n 2 --dist loadgroup` in pyproject.toml); each builds the
# session fixtures it needs. The costly ones train a model: the tests that use one run on one process, so it is
# trained once (tiny_segmenter, a DenseNet121 U-Net: ~100 s here).
SHARED_FIXTURES = ("tiny_segmenter", "tiny_idc_bundle", "tiny_patch_bundle")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    """Groups as above; then the costliest first (the segmenter's group, then tests marked `slow`), so that the
    two processes do not end on one long test each while the other waits."""
    for item in items:
        used = [f for f in SHARED_FIXTURES if f in getattr(item, "fixturenames", ())]
        if used:
            item.add_marker(pytest.mark.xdist_group(used[0]))
    items.sort(key=lambda i: 0 if "tiny_segmenter" in getattr(i, "fixturenames", ()) else
               1 if i.get_closest_marker("slow") else 2)  # stable: the collection order within each rank


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory) -> Path:
    return write_class_tree(tmp_path_factory.mktemp("tiny") / "data", n_per_class=14)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_tree) -> Path:
    """A real bundle trained by train.py for 2 epochs on the tiny tree with simple_cnn at 32 px."""
    import train

    out = tmp_path_factory.mktemp("ckpt")
    rc = train.main(["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "simple_cnn",
                     "--input-size", "32", "--head-epochs", "2", "--fine-tune-epochs", "0",
                     "--head-units", "16", "--dropout", "0", "--lr", "3e-3", "--batch-size", "8",
                     "--name", "tiny", "--out-dir", str(out), "--quiet"])
    assert rc == 0
    return out / "tiny"


def install_copies(bundle: Path, root: Path, names, accept_all=(), kinds: dict | None = None) -> Path:
    """Copies of `bundle` under `root` named `names` (one checkpoints folder); those in `accept_all` get an
    out-of-distribution threshold no image crosses, `kinds` (name -> dataset kind) sets what each was trained on."""
    import shutil
    from dataclasses import replace

    from core.checkpoints import read_metadata, update_metadata
    from core.ood import OODDetector

    dataset = read_metadata(bundle)["dataset"]
    for name in names:
        shutil.copytree(bundle, root / name)
        update_metadata(root / name, {"name": name, "dataset": {**dataset, "kind": (kinds or {}).get(
            name, dataset.get("kind"))}})
        if name in accept_all:
            lenient = replace(OODDetector.load(root / name / "ood.npz"), threshold=1e12)
            update_metadata(root / name, {}, files={"ood.npz": lenient.save})
    return root


def write_large_tree(root: Path, n: int = 6, size=(120, 150)) -> Path:
    """Two classes of large images: tissue-like patterns on a white background, like slides."""
    rng = np.random.default_rng(0)
    for label, cls in enumerate(("benign", "malignant")):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            img = np.full((*size, 3), 240, np.uint8)
            img[20:80, 30:90] = make_class_image(label, rng, 60)
            img[50:110, 80:140] = make_class_image(label, rng, 60)
            Image.fromarray(img).save(root / cls / f"{cls}_{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_patch_bundle(tmp_path_factory) -> Path:
    """A patch checkpoint trained by train.py: 3 crops of 48 px per image, 24 px model input, simple_cnn."""
    import train

    data = write_large_tree(tmp_path_factory.mktemp("large") / "data")
    out = tmp_path_factory.mktemp("pckpt")
    rc = train.main(["--dataset", "folder", "--data-dir", str(data), "--backbone", "simple_cnn", "--weights", "none",
                     "--input-size", "24", "--patches", "3", "--patch-size", "48", "--head-epochs", "1",
                     "--fine-tune-epochs", "1", "--batch-size", "8", "--name", "patchy", "--out-dir", str(out),
                     "--quiet"])
    assert rc == 0
    return out / "patchy"


def write_idc_tree(root: Path, patients=("8863", "9036", "10253", "12345", "13666", "14191"), n: int = 8) -> Path:
    """IDC official layout: per patient a 4 x 4 block of 50 px patches, IDC (dark discs) in the left columns."""
    rng = np.random.default_rng(3)
    for p in patients:
        for k in range(n):
            x, y = 1001 + 50 * (k % 4), 501 + 50 * (k // 4)
            label = int(k % 4 < 2)
            d = root / "IDC_regular_ps50_idx5" / p / str(label)
            d.mkdir(parents=True, exist_ok=True)
            img = make_class_image(label, rng, 50)
            Image.fromarray(img).save(d / f"{p}_idx5_x{x}_y{y}_class{label}.png")
    return root / "IDC_regular_ps50_idx5"


@pytest.fixture(scope="session")
def tiny_idc_bundle(tmp_path_factory) -> Path:
    """An IDC-style patch-set bundle trained by train.py on a generated tree (simple_cnn, 16 px input)."""
    import train

    data = write_idc_tree(tmp_path_factory.mktemp("idc"))
    out = tmp_path_factory.mktemp("idcckpt")
    rc = train.main(["--dataset", "idc", "--data-dir", str(data), "--backbone", "simple_cnn", "--weights", "none",
                     "--input-size", "16", "--head-epochs", "2", "--fine-tune-epochs", "0", "--head-units", "8",
                     "--dropout", "0", "--lr", "3e-3", "--batch-size", "8", "--split", "0.5", "0.25", "0.25",
                     "--name", "idc_tiny", "--out-dir", str(out), "--quiet"])
    assert rc == 0
    return out / "idc_tiny"


def write_busi_tree(root: Path, n_per_class: int = 10, size: int = 64, seed: int = 5) -> Path:
    """BUSI layout with masks: benign/malignant scans hold a dark lesion (an ellipse, its mask beside the image);
    normal scans have none (an all-black mask, as in BUSI)."""
    import cv2

    rng = np.random.default_rng(seed)
    for cls in ("benign", "malignant", "normal"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = rng.integers(90, 160, (size, size)).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            if cls != "normal":
                c = tuple(int(v) for v in rng.integers(size // 3, 2 * size // 3, 2))
                axes = (int(rng.integers(size // 8, size // 4)), int(rng.integers(size // 10, size // 6)))
                cv2.ellipse(mask, c, axes, 0 if cls == "benign" else 70, 0, 360, 255, -1)
                img[mask > 0] = rng.integers(10, 40, int((mask > 0).sum()))
            Image.fromarray(np.stack([img] * 3, -1)).save(root / cls / f"{cls} ({i + 1}).png")
            Image.fromarray(mask).save(root / cls / f"{cls} ({i + 1})_mask.png")
    return root


@pytest.fixture(scope="session")
def tiny_busi_tree(tmp_path_factory) -> Path:
    return write_busi_tree(tmp_path_factory.mktemp("busi") / "Dataset_BUSI_with_GT")


@pytest.fixture(scope="session")
def tiny_segmenter(tmp_path_factory, tiny_busi_tree) -> Path:
    """A segmenter bundle trained by `train.py --task segmentation` (DenseNet121 U-Net, random weights, 32 px)."""
    import train

    out = tmp_path_factory.mktemp("segckpt")
    rc = train.main(["--task", "segmentation", "--dataset", "busi", "--data-dir", str(tiny_busi_tree),
                     "--weights", "none", "--input-size", "32", "--head-epochs", "1", "--fine-tune-epochs", "1",
                     "--fine-tune-layers", "-1", "--batch-size", "8", "--dropout", "0", "--lr", "1e-3",
                     "--name", "seg_tiny", "--out-dir", str(out), "--quiet"])
    assert rc == 0
    return out / "seg_tiny"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) shared by the tests that use it; started once, stopped at the end."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


SUBTYPE_CV = [("tubular_adenoma", "benign", 0.1), ("tubular_adenoma", "benign", 0.3),
              ("mucinous_carcinoma", "malignant", 0.9), ("mucinous_carcinoma", "malignant", 0.2),
              ("papillary_carcinoma", "malignant", 0.4), ("papillary_carcinoma", "malignant", 0.45)]


def write_subtype_cv(bundle: Path, images=SUBTYPE_CV, file: str = "cv_predictions.csv") -> None:
    """Out-of-fold predictions (`file`: cv_predictions.csv or calibration_predictions.csv) and a split.csv with
    BreakHis subtypes in `bundle`: (subtype, true class, P(malignant)) per image, two images per patient.
    Default: tubular adenoma 2 of 2 right, mucinous carcinoma 1 of 2, papillary carcinoma 0 of 2."""
    import csv

    with open(bundle / file, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fold", "path", "group", "true", "predicted", "p_benign", "p_malignant"])
        for i, (_, true, p) in enumerate(images):
            w.writerow([1, f"im{i}.png", f"pt{i // 2}", true, "malignant" if p > 0.5 else "benign", 1 - p, p])
    with open(bundle / "split.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["split", "path", "label", "class_name", "group", "mask_paths", "magnification", "subtype"])
        for i, (sub, true, _) in enumerate(images):
            w.writerow(["train", f"im{i}.png", int(true == "malignant"), true, f"pt{i // 2}", "", 200, sub])
