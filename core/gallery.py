"""Example images for the dashboard, found through the core loaders in a user-chosen data folder."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core.data import load_breakhis, load_busi, load_ucsb
from core.errors import DatasetError

ENV_VAR = "BREASTXAI_DATA"
REPO_ROOT = Path(__file__).resolve().parent.parent
WHERE_TO_GET = (
    "No data folder found. The app works from uploads alone. For examples, download BUSI "
    "(Al-Dhabyani et al. 2020, 'Dataset of breast ultrasound images', Data in Brief) and/or BreakHis "
    "(Spanhol et al. 2016, web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/) "
    f"and point the sidebar setting or the {ENV_VAR} environment variable at the folder that holds them.")


#: Dataset kind -> imaging modality; the dashboard offers only examples of the active checkpoint's modality.
MODALITY = {"busi": "ultrasound", "breakhis": "histopathology", "ucsb": "histopathology", "idc": "histopathology"}


#: Dataset kind -> the images a checkpoint trained on it was made for (said when the dashboard suggests one).
DATASET_IMAGES = {"busi": "breast ultrasound scans (BUSI)", "breakhis": "H&E fields (BreakHis)",
                  "ucsb": "H&E tissue-microarray fields (UCSB)",
                  "idc": "H&E patches of 50 px at 2.5x (IDC); a larger region is read as a grid of patches"}


def modality_of(metadata: dict) -> Optional[str]:
    """The imaging modality a bundle was trained on, from its metadata's dataset kind (None: unknown)."""
    return MODALITY.get((metadata.get("dataset") or {}).get("kind", ""))


def same_modality(dataset: str, checkpoint_dataset: Optional[str]) -> bool:
    """True when an example of `dataset` suits a checkpoint trained on `checkpoint_dataset` (unknown: True)."""
    a, b = MODALITY.get(dataset), MODALITY.get(checkpoint_dataset or "")
    return a is None or b is None or a == b


@dataclass(frozen=True)
class Example:
    path: str
    dataset: str  # busi | breakhis | ucsb
    class_name: str
    mask_paths: tuple[str, ...] = ()
    detail: str = ""  # where it comes from ("test split"), shown in its label
    subtype: str = ""  # "mucinous carcinoma, 200X" for BreakHis: what a teacher reveals with the class

    @property
    def label(self) -> str:
        extra = " · ".join(x for x in (self.detail, self.subtype) if x)
        return f"{self.dataset.upper()} · {self.class_name}{' · ' + extra if extra else ''} · {Path(self.path).name}"

    @property
    def truth(self) -> str:
        """The class, with the subtype when known: 'malignant (mucinous carcinoma, 200X)'."""
        return f"{self.class_name} ({self.subtype})" if self.subtype else self.class_name


def _subtype(sample) -> str:
    if not sample.subtype:
        return ""
    return sample.subtype.replace("_", " ") + (f", {sample.magnification}X" if sample.magnification else "")


def default_data_dir() -> Optional[Path]:
    """$BREASTXAI_DATA if set, else ../shared/data beside the repository when it exists."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    cand = REPO_ROOT.parent / "shared" / "data"
    return cand if cand.is_dir() else None


def _find(root: Path, name: str, max_depth: int = 3) -> Optional[Path]:
    if root.name == name:
        return root
    frontier = [root]
    for _ in range(max_depth):
        nxt = []
        for d in frontier:
            try:
                children = [c for c in d.iterdir() if c.is_dir()]
            except OSError:
                continue
            for c in children:
                if c.name == name:
                    return c
            nxt.extend(children)
        frontier = nxt
    return None


def find_examples(data_dir: str | Path | None, per_class: int = 6) -> list[Example]:
    """Up to `per_class` examples per class of each recognised dataset (BUSI, BreakHis, UCSB) under data_dir."""
    if data_dir is None or not Path(data_dir).is_dir():
        return []
    root = Path(data_dir)
    out: list[Example] = []
    finders = (("Dataset_BUSI_with_GT", "busi", lambda p: load_busi(p, near_duplicates=False)),
               ("BreaKHis_v1", "breakhis", lambda p: load_breakhis(p)),
               ("BreastCancerCell_dataset", "ucsb", lambda p: load_ucsb(p)))
    for folder, kind, loader in finders:
        found = _find(root, folder)
        if found is None:
            continue
        try:
            manifest = loader(found)
        except DatasetError:
            continue
        counts: dict[str, int] = {}
        for s in sorted(manifest.samples, key=lambda s: _natural(s.path)):
            if counts.get(s.class_name, 0) >= per_class:
                continue
            counts[s.class_name] = counts.get(s.class_name, 0) + 1
            out.append(Example(s.path, kind, s.class_name, s.mask_paths, subtype=_subtype(s)))
    return out


def _natural(path: str):
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def test_split_examples(bundle: str | Path, per_class: int = 6, data_dir: Optional[str] = None) -> list[Example]:
    """Examples from a checkpoint's own test split (images the model never trained on), if the data is here."""
    from core.checkpoints import read_metadata
    from core.data.roots import bundle_splits, resolve_data_root

    bundle = Path(bundle)
    try:
        meta = read_metadata(bundle)
        root = resolve_data_root(meta, bundle, data_dir)
        if not root.is_dir() or not (bundle / "split.csv").is_file():
            return []
        test = bundle_splits(bundle, meta, data_dir)["test"]
    except Exception:  # a missing or foreign dataset simply means no examples
        return []
    out, counts = [], {}
    kind = meta.get("dataset", {}).get("kind", "data")
    for s in sorted(test.samples, key=lambda s: _natural(s.path)):
        if counts.get(s.class_name, 0) >= per_class or not Path(s.path).is_file():
            continue
        counts[s.class_name] = counts.get(s.class_name, 0) + 1
        out.append(Example(s.path, kind, s.class_name, s.mask_paths, "test split", _subtype(s)))
    return out
