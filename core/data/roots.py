"""Where a checkpoint's data lives: recorded dataset roots resolved on this machine, and a bundle's splits."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from core.data.manifest import Manifest

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_root(root: str | Path, bundle: Path) -> Path:
    """A recorded (possibly relative) data folder, tried relative to the CWD, the repo root and the bundle."""
    root = Path(root)
    for cand in (root, REPO_ROOT / root, Path(bundle) / root):
        if cand.is_dir():
            return cand
    return root


def resolve_data_root(meta: dict, bundle: Path, override: Optional[str] = None) -> Path:
    """The dataset root recorded in metadata, tried relative to the CWD, the repo root and the bundle."""
    if override:
        return Path(override)
    return resolve_root(meta["dataset"]["root"], bundle)


def bundle_splits(bundle: str | Path, meta: dict, data_dir: Optional[str] = None) -> dict[str, Manifest]:
    """A bundle's `split.csv` as manifests over the data found here (`Manifest.read` pads IDC edge patches)."""
    from core.data.loaders import PATCH_SIDES
    from core.data.split import read_split

    bundle = Path(bundle)
    kind = meta.get("dataset", {}).get("kind", "dataset")
    return read_split(bundle / "split.csv", resolve_data_root(meta, bundle, data_dir), meta["class_names"], kind,
                      PATCH_SIDES.get(kind))
