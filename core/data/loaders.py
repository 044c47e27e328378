"""Loaders for a generic class-folder tree, BUSI, BreakHis and UCSB breast H&E images."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

from core.data.manifest import Manifest, Sample
from core.errors import DatasetError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}

BUSI_CITATION = ("Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. "
                 "Data in Brief 28:104863 (2020).")
BREAKHIS_CITATION = ("Spanhol F, Oliveira L, Petitjean C, Heutte L. A dataset for breast cancer "
                     "histopathological image classification. IEEE TBME 63(7):1455-1462 (2016).")
UCSB_CITATION = ("Drelie Gelasca E, Obara B, Fedorov D, Kvilekval K, Manjunath BS. A biosegmentation "
                 "benchmark for evaluation of bioimage analysis methods. BMC Bioinformatics 10:368 (2009).")
IDC_CITATION = ("Janowczyk A, Madabhushi A. Deep learning for digital pathology image analysis: a comprehensive "
                "tutorial with selected use cases. J Pathol Inform 7:29 (2016); data from Cruz-Roa A et al., "
                "SPIE Medical Imaging 2014.")

#: BreakHis subtype code -> (folder name, benign?)
BREAKHIS_SUBTYPES = {
    "A": ("adenosis", True), "F": ("fibroadenoma", True), "PT": ("phyllodes_tumor", True),
    "TA": ("tubular_adenoma", True), "DC": ("ductal_carcinoma", False), "LC": ("lobular_carcinoma", False),
    "MC": ("mucinous_carcinoma", False), "PC": ("papillary_carcinoma", False),
}
BREAKHIS_SUBTYPE_NAMES = tuple(v[0] for v in BREAKHIS_SUBTYPES.values())
_BREAKHIS_RE = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<code>[A-Z]+)-(?P<year>\d+)-(?P<slide>[0-9A-Za-z]+)-(?P<mag>\d+)-(?P<seq>\d+)$")
_IDC_RE = re.compile(r"^(?P<patient>[0-9A-Za-z]+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<cls>[01])$")
IDC_PATCH_SIDE = 50
#: Datasets of fixed-size patches: dataset kind -> patch side in pixels (models trained on them read fields by tiles).
PATCH_SIDES = {"idc": IDC_PATCH_SIDE}
_UCSB_RE = re.compile(r"^(?P<group>ytma\d+_\d+)_(?P<cls>benign|malignant)(?P<k>\d+)_ccd$", re.I)
_BUSI_MASK_RE = re.compile(r"_mask(_\d+)?$")


def masks_beside(image: str | Path) -> tuple[str, ...]:
    """The lesion mask files next to an image in BUSI's layout (`X.png` -> `X_mask.png`, `X_mask_1.png`, ...)."""
    image = Path(image)
    if not image.parent.is_dir():
        return ()
    prefix = image.stem + "_mask"
    return tuple(str(p) for p in sorted(image.parent.iterdir()) if p.stem.startswith(prefix) and p.is_file()
                 and p.suffix.lower() in IMAGE_SUFFIXES and _BUSI_MASK_RE.fullmatch(p.stem[len(image.stem):]))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _require_dir(root: str | Path, what: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{what} folder not found: {root}")
    return root


def _dataset_dir(root: str | Path, official: str, what: str) -> Path:
    """The dataset folder: `root` itself, or its `official` sub-folder when `root` is the folder above it."""
    root = Path(root)
    if (root / official).is_dir():
        root = root / official
    return _require_dir(root, what)


def load_folder(root: str | Path, class_names: Optional[list[str]] = None, name: str = "folder") -> Manifest:
    """Generic layout `root/<class>/**/*.png|jpg|tif|bmp`; classes are the sub-folders, sorted.

    Files whose stem ends in `_mask` or `_mask_<k>` are treated as masks of the image beside them.
    """
    root = _require_dir(root, "Dataset")
    if class_names is None:
        class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_names) < 2:
        raise DatasetError(f"{root} needs at least two class sub-folders (found {class_names}).")
    samples = []
    for label, cls in enumerate(class_names):
        files = _images(root / cls)
        masks: dict[str, list[str]] = {}
        for f in files:
            m = _BUSI_MASK_RE.search(f.stem)
            if m:
                masks.setdefault(str(f.with_name(f.stem[: m.start()] + f.suffix)), []).append(str(f))
        for f in files:
            if _BUSI_MASK_RE.search(f.stem):
                continue
            rel = f.relative_to(root).as_posix()
            samples.append(Sample(str(f), label, cls, group=rel, mask_paths=tuple(sorted(masks.get(str(f), [])))))
    if not samples:
        raise DatasetError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}.")
    return Manifest(name, str(root), tuple(class_names), tuple(samples))


def load_busi(root: str | Path, near_duplicates: bool = True) -> Manifest:
    """BUSI `Dataset_BUSI_with_GT/{benign,malignant,normal}/<class> (N).png` with masks beside them.

    Accepts the dataset folder itself or a parent that contains `Dataset_BUSI_with_GT`.
    Classes are ordered benign, malignant, normal (label 0, 1, 2). BUSI publishes no patient ids:
    with `near_duplicates` (default), images whose difference hashes are within
    `core.data.duplicates.NEAR_DUPLICATE_BITS` share a group (named after its first file), so repeated
    scans of one lesion never straddle a split; otherwise each image is its own group.
    """
    root = _dataset_dir(root, "Dataset_BUSI_with_GT", "BUSI")
    classes = ["benign", "malignant", "normal"]
    missing = [c for c in classes if not (root / c).is_dir()]
    if missing:
        raise DatasetError(f"{root} is not a BUSI folder: missing {', '.join(missing)} sub-folder(s).")
    m = load_folder(root, classes, name="busi")
    if not near_duplicates:
        return m
    from dataclasses import replace

    from core.data.duplicates import near_duplicate_components

    comp = near_duplicate_components([s.path for s in m.samples])
    first: dict[int, str] = {}
    for c, s in zip(comp, m.samples):
        first.setdefault(int(c), s.group)
    return replace(m, samples=tuple(replace(s, group=first[int(c)]) for c, s in zip(comp, m.samples)))


def _leading_digits(slide: str) -> str:
    """'23060AB' -> '23060'; an id without leading digits stays as it is."""
    digits = re.match(r"\d*", slide).group()
    return digits or slide


def parse_breakhis_name(filename: str) -> dict:
    """Parse an official BreakHis file name, e.g. `SOB_M_DC-14-2523-40-010.png`.

    Returns dict(binary='benign'|'malignant', subtype, code, slide='14-2523', patient='14-2523',
    magnification=40, seq=10). `patient` keeps only the digits of the slide id: BreakHis files slides of one
    patient under ids that share the number (`23060AB` / `23060CD`, `29960AB` in fibroadenoma and `29960CD`
    in adenosis), so grouping on `patient` keeps every slide of a patient in one split.
    Raises DatasetError if the name does not follow the BreakHis convention.
    """
    stem = Path(filename).stem
    m = _BREAKHIS_RE.match(stem)
    if not m or m.group("code") not in BREAKHIS_SUBTYPES:
        raise DatasetError(f"Not a BreakHis file name: {filename}")
    subtype, benign = BREAKHIS_SUBTYPES[m.group("code")]
    if benign != (m.group("cls") == "B"):
        raise DatasetError(f"BreakHis file name has inconsistent class and subtype: {filename}")
    return {
        "binary": "benign" if benign else "malignant",
        "subtype": subtype,
        "code": m.group("code"),
        "slide": f"{m.group('year')}-{m.group('slide')}",
        "patient": f"{m.group('year')}-{_leading_digits(m.group('slide'))}",
        "magnification": int(m.group("mag")),
        "seq": int(m.group("seq")),
    }


def load_breakhis(root: str | Path, task: str = "binary", magnification: Optional[int] = None) -> Manifest:
    """BreakHis v1 official tree (`BreaKHis_v1/histology_slides/breast/...`), any level of it as root.

    task: 'binary' (benign/malignant) or 'subtype' (8 classes). magnification: 40, 100, 200, 400 or None.
    Group = patient (the digits of the slide id in the file name), so splits and CV folds keep each
    patient in one part. Any image suffix (official PNG, JPEG copies) and any size.
    """
    if task not in ("binary", "subtype"):
        raise DatasetError(f"BreakHis task must be 'binary' or 'subtype', not {task!r}.")
    if magnification is not None and int(magnification) not in (40, 100, 200, 400):
        raise DatasetError(f"BreakHis magnification must be 40, 100, 200 or 400, not {magnification}.")
    root = _require_dir(root, "BreakHis")
    class_names = ("benign", "malignant") if task == "binary" else BREAKHIS_SUBTYPE_NAMES
    samples = []
    for f in _images(root):
        try:
            info = parse_breakhis_name(f.name)
        except DatasetError:
            continue
        if magnification is not None and info["magnification"] != int(magnification):
            continue
        cls = info["binary"] if task == "binary" else info["subtype"]
        samples.append(Sample(str(f), class_names.index(cls), cls, group=info["patient"],
                              magnification=info["magnification"], subtype=info["subtype"]))
    if not samples:
        raise DatasetError(f"No BreakHis images (SOB_*.png) found under {root}"
                           + (f" at {magnification}X." if magnification else "."))
    return Manifest("breakhis", str(root), tuple(class_names), tuple(samples))


def load_idc(root: str | Path) -> Manifest:
    """IDC patches (Janowczyk & Madabhushi 2016), official layout
    `IDC_regular_ps50_idx5/<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<k>.png`.

    Accepts that folder or a parent holding it. Label from the `<0|1>` folder (0 = non-IDC, 1 = IDC),
    group = patient folder, `position` = the patch's (x, y) in its slide. Classes: ("non_idc", "idc").
    """
    root = _dataset_dir(root, "IDC_regular_ps50_idx5", "IDC")
    class_names = ("non_idc", "idc")
    samples = []
    for patient in sorted(p for p in root.iterdir() if p.is_dir()):
        for label in (0, 1):
            for f in _images(patient / str(label)):
                m = _IDC_RE.match(f.stem)
                pos = (int(m.group("x")), int(m.group("y"))) if m else None
                samples.append(Sample(str(f), label, class_names[label], group=patient.name, position=pos))
    if not samples:
        raise DatasetError(f"No IDC patches (<patient>/<0|1>/*.png) found under {root}.")
    return Manifest("idc", str(root), class_names, tuple(samples), patch_side=IDC_PATCH_SIDE)


def load_ucsb(root: str | Path) -> Manifest:
    """UCSB breast H&E: `ytma<NN>_<MMDDYY>_<benign|malignant><k>_ccd.png`; group = microarray/date."""
    root = _dataset_dir(root, "BreastCancerCell_dataset", "UCSB")
    class_names = ("benign", "malignant")
    samples = []
    for f in _images(root):
        m = _UCSB_RE.match(f.stem)
        if m:
            cls = m.group("cls").lower()
            samples.append(Sample(str(f), class_names.index(cls), cls, group=m.group("group").lower()))
    if not samples:
        raise DatasetError(f"No UCSB images (ytma*_benign*_ccd.png) found under {root}.")
    return Manifest("ucsb", str(root), class_names, tuple(samples))


DATASETS: dict[str, Callable[..., Manifest]] = {
    "folder": load_folder, "busi": load_busi, "breakhis": load_breakhis, "ucsb": load_ucsb, "idc": load_idc,
}
CITATIONS = {"busi": BUSI_CITATION, "breakhis": BREAKHIS_CITATION, "ucsb": UCSB_CITATION, "idc": IDC_CITATION}
#: What keeps an image's group together in splits and CV folds, as "held out ... <phrase>" (each loader's `group`).
GROUP_PHRASES = {
    "busi": "together with its repeat scans (near-duplicate images of one lesion; BUSI has no patient ids)",
    "breakhis": "together with the patient's other images", "idc": "together with the patient's other patches",
    "ucsb": "together with the other images of its tissue microarray"}


def group_phrase(kind: str) -> str:
    """How a dataset kind's images are grouped when held out, for model cards: a phrase after "held out once"."""
    return GROUP_PHRASES.get(kind, "together with its whole group")


def load_dataset(kind: str, root: str | Path, **options) -> Manifest:
    """Dispatch to a loader by name ('folder', 'busi', 'breakhis', 'ucsb', 'idc')."""
    if kind not in DATASETS:
        raise DatasetError(f"Unknown dataset kind {kind!r}; choose one of {', '.join(DATASETS)}.")
    if kind != "breakhis":
        options = {k: v for k, v in options.items() if k not in ("task", "magnification")}
    return DATASETS[kind](root, **options)
