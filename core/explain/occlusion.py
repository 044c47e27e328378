"""Occlusion (Zeiler & Fergus 2014): slide a baseline patch, record the drop in the target probability."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.explain.base import Explainer, baseline_image


@dataclass(frozen=True)
class OcclusionParams:
    window: int = 32  # patch side, work-image pixels (model resolution)
    stride: int = 16
    baseline: str = "blur"  # blur | mean | black
    batch_size: int = 128  # occluded images per classifier call


def _positions(size: int, window: int, stride: int) -> list[int]:
    pos = list(range(0, max(size - window, 0) + 1, stride))
    if pos[-1] + window < size:
        pos.append(size - window)
    return pos


class OcclusionExplainer(Explainer):
    name = "occlusion"
    Params = OcclusionParams
    slow = True

    def _attribute(self, image, target):
        p = self.params
        work = self.work_image(image)
        h, wd = work.shape[:2]
        w = int(min(p.window, h, wd))
        base = baseline_image(work, p.baseline)
        ys, xs = _positions(h, w, p.stride), _positions(wd, w, p.stride)
        coords = [(y, x) for y in ys for x in xs]
        predict = self.predict_fn()
        p0 = float(predict(work[None])[0, target])
        drops = np.zeros(len(coords), np.float32)
        for start in range(0, len(coords), p.batch_size):
            chunk = coords[start:start + p.batch_size]
            batch = np.repeat(work[None], len(chunk), axis=0)
            for i, (y, x) in enumerate(chunk):
                batch[i, y:y + w, x:x + w] = base[y:y + w, x:x + w]
            drops[start:start + len(chunk)] = p0 - predict(batch)[:, target]
            self.report(0.95 * (start + len(chunk)) / len(coords))
        total = np.zeros((h, wd), np.float32)
        count = np.zeros((h, wd), np.float32)
        for d, (y, x) in zip(drops, coords):
            total[y:y + w, x:x + w] += d
            count[y:y + w, x:x + w] += 1
        return total / np.maximum(count, 1), {"n_windows": len(coords), "resolved": {"window": w}}
