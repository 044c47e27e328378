"""Dataset loaders returning one manifest type, and seeded group-aware stratified splits."""
from core.data.manifest import Manifest, Sample
from core.data.loaders import (DATASETS, load_breakhis, load_busi, load_dataset, load_folder,
                               load_idc, load_ucsb, parse_breakhis_name)
from core.data.split import SPLITS, read_split, split_manifest, write_split

__all__ = ["Manifest", "Sample", "DATASETS", "load_breakhis", "load_busi", "load_dataset", "load_folder",
           "load_idc", "load_ucsb", "parse_breakhis_name", "SPLITS", "read_split", "split_manifest", "write_split"]
