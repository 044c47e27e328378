"""Occlusion (Zeiler & Fergus 2014): slide a baseline patch, record the drop in the target probability."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.explain.base import BATCH_MAX, Explainer, baseline_image, bounded, one_of
from core.patches import grid_boxes, stitch


@dataclass(frozen=True)
class OcclusionParams:
    window: int = bounded(32, 1, 4096)  # patch side, work-image pixels (model resolution)
    stride: int = bounded(16, 1, 4096)
    baseline: str = one_of("blur", "mean", "black")
    batch_size: int = bounded(128, 1, BATCH_MAX)  # occluded images per classifier call


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
        coords = grid_boxes((h, wd), w, p.stride)
        if self.tiled():
            drops = self._tiled_drops(work, base, coords, w, target)
        else:
            drops = self._drops(work, base, coords, w, target)
        # each window's drop spread over its pixels, averaged where windows overlap
        attribution = stitch(np.broadcast_to(drops[:, None, None], (len(coords), w, w)), (h, wd), w, p.stride)
        return attribution, {"n_windows": len(coords), "resolved": {"window": w}}

    def _drops(self, work, base, coords, w, target) -> np.ndarray:
        """p(target) of the image minus p(target) with each window replaced by the baseline."""
        p = self.params
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
        return drops

    def _tiled_drops(self, work, base, coords, w, target) -> np.ndarray:
        """The same drops for a patch model, recomputing only the grid tiles a window touches.

        The prediction is calibrate(mean of tile softmax); a window changes only the tiles it overlaps,
        so each occluded image costs its 1-4 touched tiles instead of the whole grid (exact).
        """
        clf, p = self.classifier, self.params
        s = clf.input_size
        boxes = grid_boxes(work.shape[:2], s, clf.tile_stride)
        raw0 = clf.forward(clf.tiles(work))  # (T, K) uncalibrated
        total0, n_tiles = raw0.sum(axis=0), len(boxes)
        probs0 = clf.calibrate((total0 / n_tiles)[None])
        self.observe(probs0)
        p0 = float(probs0[0, target])
        jobs = []  # (window index, tile index)
        for i, (y, x) in enumerate(coords):
            for t, (ty, tx) in enumerate(boxes):
                if y < ty + s and ty < y + w and x < tx + s and tx < x + w:
                    jobs.append((i, t))
        new_sum = np.zeros((len(coords), raw0.shape[1]), np.float64)
        old_sum = np.zeros_like(new_sum)
        for start in range(0, len(jobs), p.batch_size):
            chunk = jobs[start:start + p.batch_size]
            batch = np.empty((len(chunk), s, s, 3), np.uint8)
            for j, (i, t) in enumerate(chunk):
                (y, x), (ty, tx) = coords[i], boxes[t]
                occluded = work[ty:ty + s, tx:tx + s].copy()
                y0, y1, x0, x1 = max(y, ty), min(y + w, ty + s), max(x, tx), min(x + w, tx + s)
                occluded[y0 - ty:y1 - ty, x0 - tx:x1 - tx] = base[y0:y1, x0:x1]
                batch[j] = occluded
            out = clf.forward(clf.tiles(batch))  # each is one whole tile: CLAHE etc. as in prediction
            for (i, t), row in zip(chunk, out):
                new_sum[i] += row
                old_sum[i] += raw0[t]
            self.report(0.95 * (start + len(chunk)) / len(jobs))
        probs = clf.calibrate((total0[None] - old_sum + new_sum) / n_tiles)
        self.observe(probs)
        return (p0 - probs[:, target]).astype(np.float32)
