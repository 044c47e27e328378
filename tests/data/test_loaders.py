"""Loaders (generic tree, BUSI layout, BreakHis names and tree, UCSB) and group-aware splits."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.data import (load_breakhis, load_busi, load_dataset, load_folder, load_idc, load_ucsb,
                       parse_breakhis_name)
from core.data import read_split, split_manifest, write_split
from core.errors import DatasetError
from tests.conftest import BREAKHIS, BUSI, UCSB, needs_shared, write_class_tree


def test_folder_loader_classes_labels_and_masks(tmp_path):
    root = write_class_tree(tmp_path / "d", n_per_class=3, classes=("a", "b", "c"), masks=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "a" / "a (1)_mask_1.png")
    m = load_folder(root)
    assert m.class_names == ("a", "b", "c") and len(m) == 9
    assert m.class_counts() == {"a": 3, "b": 3, "c": 3}
    first = next(s for s in m if s.path.endswith("a (1).png"))
    assert first.label == 0 and len(first.mask_paths) == 2
    assert all(len(s.mask_paths) == 1 for s in m if not s.path.endswith("a (1).png"))


def test_folder_loader_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_folder(tmp_path / "missing")
    (tmp_path / "only").mkdir()
    with pytest.raises(DatasetError, match="two class"):
        load_folder(tmp_path)
    with pytest.raises(DatasetError, match="Unknown dataset"):
        load_dataset("mnist", tmp_path)


def test_busi_layout_generated(tmp_path):
    root = write_class_tree(tmp_path / "Dataset_BUSI_with_GT", n_per_class=2,
                            classes=("benign", "malignant", "normal"), masks=True)
    m = load_busi(tmp_path)  # parent folder accepted
    assert m.class_names == ("benign", "malignant", "normal") and len(m) == 6
    assert all(s.mask_paths for s in m)
    (root / "normal").rename(root / "other")
    with pytest.raises(DatasetError, match="normal"):
        load_busi(root)


@needs_shared
def test_busi_real_counts_and_double_masks():
    m = load_busi(BUSI)
    assert m.class_counts() == {"benign": 371, "malignant": 178, "normal": 113}
    assert all(len(s.mask_paths) >= 1 for s in m)
    assert any(len(s.mask_paths) >= 2 for s in m)  # some images have _mask_1


def test_parse_breakhis_name():
    info = parse_breakhis_name("SOB_M_DC-14-2523-40-010.png")
    assert info == {"binary": "malignant", "subtype": "ductal_carcinoma", "code": "DC", "slide": "14-2523",
                    "patient": "14-2523", "magnification": 40, "seq": 10}
    ab = parse_breakhis_name("SOB_B_A-14-22549AB-40-001.png")
    assert (ab["slide"], ab["patient"]) == ("14-22549AB", "14-22549")
    assert parse_breakhis_name("SOB_B_PT-14-21998AB-100-005.png")["subtype"] == "phyllodes_tumor"
    for bad in ("benign (1).png", "SOB_X_DC-14-2523-40-010.png", "SOB_B_DC-14-2523-40-010.png"):
        with pytest.raises(DatasetError):
            parse_breakhis_name(bad)


@needs_shared
def test_breakhis_real_samples():
    m = load_breakhis(BREAKHIS)
    assert len(m) == 12 and m.class_names == ("benign", "malignant")
    assert len({s.subtype for s in m}) == 8
    assert len({s.group for s in m}) == 9
    assert {s.magnification for s in m} == {40, 100, 200, 400}
    for s in m:
        info = parse_breakhis_name(s.path.rsplit("/", 1)[-1])
        assert s.class_name == info["binary"] and s.group == info["patient"]
        assert f"/{info['subtype']}/" in s.path and f"/{s.magnification}X/" in s.path
    sub = load_breakhis(BREAKHIS, task="subtype")
    assert len(sub.class_names) == 8 and all(s.class_name == s.subtype for s in sub)
    m40 = load_breakhis(BREAKHIS, magnification=40)
    assert 0 < len(m40) < 12 and all(s.magnification == 40 for s in m40)
    with pytest.raises(DatasetError):
        load_breakhis(BREAKHIS, magnification=50)


@needs_shared
def test_ucsb_real_groups():
    m = load_ucsb(UCSB.parent)
    assert m.class_counts() == {"benign": 32, "malignant": 26}
    assert len({s.group for s in m}) == 10


def _grouped_manifest(tmp_path, n_groups=20, per_group=4):
    root = tmp_path / "g"
    (root / "benign").mkdir(parents=True)
    (root / "malignant").mkdir(parents=True)
    from core.data import Manifest, Sample
    samples = []
    for g in range(n_groups):
        cls = "benign" if g % 3 else "malignant"
        for i in range(per_group):
            samples.append(Sample(str(root / cls / f"p{g}_{i}.png"), int(cls == "malignant"), cls, f"p{g}"))
    return Manifest("x", str(root), ("benign", "malignant"), tuple(samples))


def test_split_is_group_aware_stratified_and_seeded(tmp_path):
    m = _grouped_manifest(tmp_path)
    s1 = split_manifest(m, seed=3)
    s2 = split_manifest(m, seed=3)
    groups = {k: {x.group for x in v} for k, v in s1.items()}
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"]) \
        and not (groups["val"] & groups["test"])
    assert sum(len(v) for v in s1.values()) == len(m)
    for k in s1:
        assert [x.path for x in s1[k]] == [x.path for x in s2[k]]
        assert set(s1[k].labels) == {0, 1}  # every split holds both classes
    assert [x.path for x in split_manifest(m, seed=4)["test"]] != [x.path for x in s1["test"]]


def test_ungrouped_split_fractions_exact(tmp_path):
    root = write_class_tree(tmp_path / "d", n_per_class=50)
    s = split_manifest(load_folder(root))
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (70, 15, 15)
    assert s["test"].class_counts() in ({"benign": 8, "malignant": 7}, {"benign": 7, "malignant": 8})


def test_split_roundtrip(tmp_path):
    m = _grouped_manifest(tmp_path)
    s = split_manifest(m, seed=1)
    write_split(s, tmp_path / "split.csv")
    back = read_split(tmp_path / "split.csv", m.root, m.class_names)
    for k in s:
        assert [(x.path, x.label, x.group) for x in back[k]] == [(x.path, x.label, x.group) for x in s[k]]


def test_split_rejects_bad_fractions(tmp_path):
    with pytest.raises(DatasetError):
        split_manifest(_grouped_manifest(tmp_path), (0.5, 0.5, 0.5))


@needs_shared
def test_breakhis_patient_split_real():
    m = load_breakhis(BREAKHIS)
    s = split_manifest(m, seed=0)
    groups = [{x.group for x in s[k]} for k in ("train", "val", "test")]
    assert sum(map(len, groups)) == 9 and len(set().union(*groups)) == 9


def _ultrasound_like(seed: int, size=(120, 160)) -> np.ndarray:
    """Speckle texture with a dark elliptical lesion; different seeds give unrelated scenes."""
    import cv2

    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 255, size).astype(np.uint8), (0, 0), 3)
    cy, cx = rng.integers(30, 90), rng.integers(40, 120)
    cv2.ellipse(img, (int(cx), int(cy)), (18, 12), 0, 0, 360, 10, -1)
    return np.stack([img] * 3, -1)


def test_dhash_separates_repeats_from_other_scenes():
    from core.data.duplicates import NEAR_DUPLICATE_BITS, dhash

    a = _ultrasound_like(1)
    marked = a.copy()
    marked[40:43, 50:60] = 255  # calipers drawn on the same scan
    shifted = np.roll(a, 2, axis=1)
    assert (dhash(a) != dhash(a)).sum() == 0
    assert (dhash(a) != dhash(marked)).sum() <= NEAR_DUPLICATE_BITS
    assert (dhash(a) != dhash(shifted)).sum() <= NEAR_DUPLICATE_BITS
    assert all((dhash(a) != dhash(_ultrasound_like(s))).sum() > NEAR_DUPLICATE_BITS for s in range(2, 8))


def test_busi_near_duplicates_share_a_group_and_a_split(tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    for k, c in enumerate(("benign", "malignant", "normal")):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(_ultrasound_like(100 + 10 * k + i)).save(root / c / f"{c} ({i + 1}).png")
    scan = _ultrasound_like(99)
    Image.fromarray(scan).save(root / "benign" / "benign (7).png")
    repeat = scan.copy()
    repeat[10:12, 10:30] = 255
    Image.fromarray(repeat).save(root / "malignant" / "malignant (7).png")  # same scan filed twice
    (root / "normal" / "normal (7).png").write_bytes(b"not an image")  # own group, reported at decode time
    m = load_busi(root)
    group = {s.path.split("/")[-1]: s.group for s in m}
    assert group["malignant (7).png"] == group["benign (7).png"] == "benign/benign (7).png"
    assert group["normal (7).png"] == "normal/normal (7).png"
    assert len(set(group.values())) == len(m) - 1
    assert len({s.group for s in load_busi(root, near_duplicates=False)}) == len(m)
    for seed in range(5):
        sp = split_manifest(m, (0.5, 0.25, 0.25), seed)
        where = {s.path.split("/")[-1]: name for name, part in sp.items() for s in part}
        assert where["malignant (7).png"] == where["benign (7).png"]


@needs_shared
def test_busi_real_cross_class_duplicate_is_one_group():
    m = load_busi(BUSI)
    group = {s.path.split("/")[-1]: s.group for s in m}
    assert group["malignant (145).png"] == group["benign (433).png"]  # the identical scan filed under two classes
    assert len({s.group for s in m}) < len(m)


def _write_breakhis_tree(root, slides, n=3, size=(46, 70), ext=".png"):
    """Official BreakHis tree: `(benign?, code, subtype folder, slide id, magnification)` per slide."""
    rng = np.random.default_rng(0)
    for benign, code, sub, slide, mag in slides:
        cls = "benign" if benign else "malignant"
        d = root / "BreaKHis_v1/histology_slides/breast" / cls / "SOB" / sub / f"SOB_{cls[0].upper()}_{code}_14-{slide}" / f"{mag}X"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 255, (*size, 3)).astype(np.uint8)
            Image.fromarray(img).save(d / f"SOB_{cls[0].upper()}_{code}-14-{slide}-{mag}-{i + 1:03d}{ext}")
    return root


def test_breakhis_groups_slides_of_one_patient_any_suffix_and_size(tmp_path):
    """23060AB / 23060CD and 29960AB (fibroadenoma) / 29960CD (adenosis) are one patient each; JPEG copies
    at 224 px and official PNGs at 700 x 460 load alike; no patient is on both sides of a split or CV fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    slides = [(True, "F", "fibroadenoma", "23060AB", 200), (True, "F", "fibroadenoma", "23060CD", 200),
              (True, "F", "fibroadenoma", "29960AB", 200), (True, "A", "adenosis", "29960CD", 200),
              (True, "TA", "tubular_adenoma", "3411F", 200), (True, "PT", "phyllodes_tumor", "21998AB", 200),
              (False, "DC", "ductal_carcinoma", "2523", 200), (False, "MC", "mucinous_carcinoma", "18842", 200),
              (False, "MC", "mucinous_carcinoma", "18842D", 200), (False, "LC", "lobular_carcinoma", "16196", 200),
              (False, "PC", "papillary_carcinoma", "9146", 200), (False, "DC", "ductal_carcinoma", "4372", 200),
              (False, "DC", "ductal_carcinoma", "2523", 40)]
    _write_breakhis_tree(tmp_path, slides[:7], ext=".jpg", size=(224, 224))
    _write_breakhis_tree(tmp_path, slides[7:], ext=".png", size=(46, 70))
    m = load_breakhis(tmp_path, magnification=200)
    assert len(m) == 12 * 3 and {s.magnification for s in m} == {200}
    assert {s.group for s in m} == {"14-23060", "14-29960", "14-3411", "14-21998", "14-2523", "14-18842",
                                    "14-16196", "14-9146", "14-4372"}
    assert {s.subtype for s in m if s.group == "14-29960"} == {"fibroadenoma", "adenosis"}
    assert sum(s.group == "14-23060" for s in m) == 6 and sum(s.group == "14-18842" for s in m) == 6
    assert len(load_breakhis(tmp_path)) == 13 * 3  # no magnification filter: 40X too
    sub = load_breakhis(tmp_path, task="subtype", magnification=200)
    assert len(sub.class_names) == 8 and {s.class_name for s in sub} == {s.subtype for s in m}
    for seed in range(3):
        parts = split_manifest(m, seed=seed)
        groups = [{x.group for x in parts[k]} for k in ("train", "val", "test")]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    for _, held in StratifiedGroupKFold(3, shuffle=True, random_state=0).split(m.labels, m.labels, m.groups):
        held_groups = {m.samples[i].group for i in held}
        assert all((s.group in held_groups) == (i in set(held)) for i, s in enumerate(m.samples))


def test_idc_official_layout_groups_labels_positions_and_edge_patches(tmp_path):
    root = tmp_path / "IDC_regular_ps50_idx5"
    rng = np.random.default_rng(0)
    expected = []
    for patient in ("8863", "10253", "12345"):
        for label in (0, 1):
            (root / patient / str(label)).mkdir(parents=True)
            for x, y in ((51, 101), (1001, 2951)):
                h = 8 if (y == 2951 and label == 0) else 50  # an edge patch cut by the slide border
                Image.fromarray(rng.integers(0, 255, (h, 50, 3)).astype(np.uint8)).save(
                    root / patient / str(label) / f"{patient}_idx5_x{x}_y{y}_class{label}.png")
                expected.append((patient, label, (x, y)))
    m = load_idc(tmp_path)  # the parent folder works too
    assert m.class_names == ("non_idc", "idc") and load_dataset("idc", root).name == "idc"
    assert sorted((s.group, s.label, s.position) for s in m) == sorted(expected)
    edge = next(s for s in m if s.label == 0 and s.position == (1001, 2951))
    img = m.read(edge)
    assert img.shape == (50, 50, 3) and (img[8:] == 255).all()
    parts = split_manifest(m, (0.34, 0.33, 0.33), seed=0)
    assert sorted(len({x.group for x in parts[k]}) for k in parts) == [1, 1, 1]
    write_split(parts, tmp_path / "split.csv")
    back = read_split(tmp_path / "split.csv", m.root, m.class_names, "idc", m.patch_side)
    assert [(x.path, x.position) for x in back["test"]] == [(x.path, x.position) for x in parts["test"]]
    assert back["test"].read(back["test"].samples[0]).shape == (50, 50, 3)
    with pytest.raises(DatasetError):
        load_idc(tmp_path / "IDC_regular_ps50_idx5" / "8863" / "0")


def test_group_phrase_names_each_datasets_grouping():
    """Model cards say how an image is held out: with its patient (BreakHis, IDC), its repeat scans (BUSI, which has
    no patient ids), its tissue microarray (UCSB), else its group."""
    from core.data.loaders import group_phrase

    assert "patient" in group_phrase("breakhis") and "patient" in group_phrase("idc")
    assert group_phrase("busi").startswith("together with its repeat scans") and "no patient ids" in group_phrase("busi")
    assert "tissue microarray" in group_phrase("ucsb") and group_phrase("folder") == "together with its whole group"
