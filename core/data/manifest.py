"""The manifest: one row per image, whatever the dataset."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional, Sequence


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    `group` keeps related images together in splits (BreakHis and IDC patient, UCSB microarray);
    it defaults to the image's own id where nothing better is known.
    """

    path: str
    label: int
    class_name: str
    group: str
    mask_paths: tuple[str, ...] = ()
    magnification: Optional[int] = None
    subtype: Optional[str] = None
    position: Optional[tuple[int, int]] = None  # (x, y) of a patch in its slide, in slide pixels (IDC)


@dataclass(frozen=True)
class Manifest:
    """A dataset: its samples and class names (index = label)."""

    name: str
    root: str
    class_names: tuple[str, ...]
    samples: tuple[Sample, ...] = field(default_factory=tuple)
    patch_side: Optional[int] = None  # fixed-size patch sets (IDC: 50): smaller edge patches are padded to it

    def read(self, sample: Sample):
        """The sample's image as uint8 RGB (H, W, 3) via `load_image`; for a patch set, edge patches cut by the
        slide border (IDC's 50 x 8, say) are padded with white glass to `patch_side` on the bottom/right."""
        from core.preprocessing import load_image, pad_patch

        if self.patch_side is None:
            return load_image(sample.path)
        return pad_patch(load_image(sample.path, min_side=1), self.patch_side)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    @property
    def groups(self) -> list[str]:
        return [s.group for s in self.samples]

    def class_counts(self) -> dict[str, int]:
        counts = Counter(s.class_name for s in self.samples)
        return {c: counts.get(c, 0) for c in self.class_names}

    def subset(self, indices: Sequence[int]) -> "Manifest":
        return replace(self, samples=tuple(self.samples[i] for i in indices))

    def extend(self, samples: Sequence[Sample]) -> "Manifest":
        return replace(self, samples=self.samples + tuple(samples))
