"""Batch work: explain and score a whole folder, serially or on a Ray cluster.

    python -m core.batch CHECKPOINT FOLDER --methods gradcam,lime --out DIR [--address auto|ray://HOST:10001]
                                           [--workers N] [--serial]

Per image and method: an overlay PNG and the attribution as float16 `.npy`; one `results.csv` of predictions,
out-of-distribution checks, run times and explanation metrics (deletion / insertion AUC); an image the check
flags gets its probabilities but no predicted class, as in the dashboard and the REST API, and
`suitable_checkpoints` names the other checkpoints installed beside CHECKPOINT whose check accepts it (in a folder
that mixes ultrasound scans and H&E fields, the scans name the ultrasound checkpoint). Without `--address`
Ray starts on this machine (`--workers` actors, each loading the model once); with one it joins a running
cluster. `--serial` runs in this process. Every path computes the same numbers (`process_image` is the one unit
of work; explainers are seeded), so a cluster run equals a serial one.

When a lesion segmenter of the checkpoint's modality is installed beside it (ultrasound: `busi_unet_densenet121`),
every image the check accepts also gets its predicted lesion (a model's outline, not a ground truth): `lesions/` holds
each mask as a PNG (255 = lesion) and `results.csv` its size and shape (`lesion_*`, as on the Explain page); where
BUSI-style masks lie beside the image (`X_mask.png`, `X_mask_1.png`), `lesion_dice` and `lesion_iou` score the outline
against them (on images whose mask is empty, `lesion_true_area_fraction` 0 tells an outline there is a false one).
`--no-lesions` skips it.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class ImageResult:
    """What one image gives: a CSV row, per method the overlay (uint8 RGB) and attribution (float32), and the
    predicted lesion (bool (H, W); None without a segmenter or for an image the check rejects)."""

    row: dict
    overlays: dict = field(default_factory=dict)
    attributions: dict = field(default_factory=dict)
    lesion: Optional[np.ndarray] = None


#: `results.csv`'s lesion columns -> their key in `core.segmentation.lesion_measurements` (empty: no lesion predicted).
LESION_COLUMNS = {"lesion_area_fraction": "area_fraction", "lesion_width_px": "width_px", "lesion_depth_px": "depth_px",
                  "lesion_orientation": "orientation", "lesion_margin_irregularity": "margin_irregularity",
                  "lesion_regions": "n_regions"}


def lesion_row(seg, image: np.ndarray, path: str | Path) -> tuple[dict, np.ndarray]:
    """The predicted lesion of one image -> (its `LESION_COLUMNS`; where BUSI-style masks lie beside `path`, the true
    lesion's area fraction and, when it is not empty, `lesion_dice` / `lesion_iou`; the bool mask (H, W))."""
    from core.data.loaders import masks_beside
    from core.preprocessing import load_mask
    from core.segmentation import dice_iou, lesion_measurements

    mask = seg.predict_mask(image)
    m = lesion_measurements(mask) or {}
    row = {c: (round(m[k], 6) if isinstance(m.get(k), float) else m.get(k, "")) for c, k in LESION_COLUMNS.items()}
    row["lesion_area_fraction"] = row["lesion_area_fraction"] or 0.0
    files = masks_beside(path)
    truth = load_mask(files, mask.shape) if files else None
    row["lesion_true_area_fraction"] = round(float(truth.mean()), 6) if truth is not None else ""
    d, j = dice_iou(mask, truth) if truth is not None and truth.any() else ("", "")
    row["lesion_dice"], row["lesion_iou"] = d, j
    return row, mask


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (recursively), in a stable order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No folder {folder}.")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and "_mask" not in p.stem)


def process_image(clf, path: str | Path, methods: Sequence[str], params: dict, root: str | Path,
                  curve_steps: int = 10, seg=None) -> ImageResult:
    """Predict, check and explain one image file; deletion / insertion AUC of each map at the work resolution;
    with a segmenter `seg`, the predicted lesion of an image the check accepts (`lesion_row`)."""
    from core.errors import InvalidImageError
    from core.explain import MAX_PERTURBATION_TILES, PERTURBATION_METHODS, explain
    from core.explain import metrics as M
    from core.explain.visualise import overlay
    from core.preprocessing import load_image, resize

    rel = os.path.relpath(path, root)
    try:
        image = load_image(path)
    except InvalidImageError as exc:
        return ImageResult({"path": rel, "error": str(exc)})
    probs = clf.predict_proba(image)[0]
    ood = (clf.ood_check([image]) or [{}])[0]
    names = list(clf.class_names)
    flagged = bool(ood.get("out_of_distribution"))
    row = {"path": rel, "error": "", "predicted": "" if flagged else names[int(np.argmax(probs))],  # no verdict
           **{f"p_{c}": round(float(p), 6) for c, p in zip(names, probs)},
           "out_of_distribution": ood.get("out_of_distribution"), "ood_score": ood.get("score"),
           "suitable_checkpoints": ""}  # filled for flagged images by suggest_checkpoints
    res = ImageResult(row)
    if seg is not None and not flagged:
        lesion, res.lesion = lesion_row(seg, image, path)
        row.update(lesion)
    work = clf.work_image(image)
    predict = lambda x: clf.predict_work(np.asarray(x))  # noqa: E731
    for m in methods:
        if m in PERTURBATION_METHODS and clf.n_tiles(image) > MAX_PERTURBATION_TILES:
            row[f"{m}_error"] = f"{clf.n_tiles(image)} tiles: too large for {m}"
            continue
        e = explain(clf, image, m, **params.get(m, {}))
        a = resize(e.attribution, work.shape[:2])
        row[f"{m}_seconds"] = round(e.seconds, 4)
        row[f"{m}_deletion_auc"] = round(M.deletion_auc(predict, work, a, e.target, curve_steps), 6)
        row[f"{m}_insertion_auc"] = round(M.insertion_auc(predict, work, a, e.target, curve_steps), 6)
        row[f"{m}_has_positive_evidence"] = e.has_positive_evidence
        row[f"{m}_weak_effect"] = e.weak_effect
        res.overlays[m] = overlay(image, e.heatmap(), 0.5)
        res.attributions[m] = e.attribution
    return res


def suggest_checkpoints(checkpoint: str | Path, rows: Sequence[dict], root: str | Path) -> None:
    """In each row the check flagged, `suitable_checkpoints`: the other checkpoints installed beside `checkpoint`
    whose detector accepts the image, best fit first, ';'-separated (core.ood.find_fitting; empty: none does)."""
    from core.checkpoints import InstalledClassifiers
    from core.preprocessing import load_image

    ckpt = Path(checkpoint)
    installed = InstalledClassifiers(ckpt.resolve().parent)
    for r in rows:
        r["suitable_checkpoints"] = ";".join(installed.fitting(load_image(Path(root) / r["path"]), ckpt.name))


def write_result(res: ImageResult, out_dir: Path) -> None:
    """The overlay PNG and float16 attribution of every method, beside the image's relative path."""
    from PIL import Image

    stem = Path(res.row["path"]).with_suffix("")
    for m, ov in res.overlays.items():
        dest = out_dir / "overlays" / f"{stem}.{m}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ov).save(dest)
    for m, a in res.attributions.items():
        dest = out_dir / "attributions" / f"{stem}.{m}.npy"
        dest.parent.mkdir(parents=True, exist_ok=True)
        np.save(dest, np.asarray(a, np.float16), allow_pickle=False)
    if res.lesion is not None:
        dest = out_dir / "lesions" / f"{stem}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(res.lesion.astype(np.uint8) * 255).save(dest)


def write_csv(rows: Sequence[dict], path: Path) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows(rows)


def run_serial(checkpoint: str | Path, paths: Sequence[Path], methods, params, root,
               progress: Optional[Callable[[int, int], None]] = None,
               segmenter: Optional[str | Path] = None) -> Iterable[ImageResult]:
    from core.checkpoints import load_classifier, load_segmenter

    clf = load_classifier(checkpoint)
    seg = load_segmenter(segmenter) if segmenter is not None else None
    for i, p in enumerate(paths):
        yield process_image(clf, p, methods, params, root, seg=seg)
        if progress:
            progress(i + 1, len(paths))


def ray_map(checkpoint: str | Path, fn: Callable, items: Sequence, address: Optional[str] = None,
            workers: int = 2, segmenter: Optional[str | Path] = None) -> Iterator:
    """`fn(classifier, item)` for every item on Ray actors that each load `checkpoint` once and take items as they
    free up; results come back in the input order. `address`: None or "local" starts Ray here with `workers` CPUs
    (and shuts it down after); "auto" or "ray://HOST:10001" joins a running cluster. With `segmenter` (a segmenter
    bundle) each actor loads it too and calls `fn(classifier, item, segmenter)`."""
    import ray
    from ray.util import ActorPool

    started = not ray.is_initialized()
    if started:
        kwargs = ({"num_cpus": workers, "include_dashboard": False} if address in (None, "local")
                  else {"address": address})
        ray.init(**kwargs, log_to_driver=False, runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "3"}})

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self, ckpt: str, seg: Optional[str]):
            import os as _os
            import sys as _sys

            root_dir = str(Path(__file__).resolve().parent.parent)
            if root_dir not in _sys.path:
                _sys.path.insert(0, root_dir)
            _os.environ.setdefault("OMP_NUM_THREADS", "1")
            from core.checkpoints import load_classifier, load_segmenter

            self.clf = load_classifier(ckpt)
            self.seg = load_segmenter(seg) if seg else None

        def run(self, item):
            return fn(self.clf, item) if self.seg is None else fn(self.clf, item, self.seg)

    try:
        seg_path = str(segmenter) if segmenter is not None else None
        pool = ActorPool([Worker.remote(str(checkpoint), seg_path) for _ in range(max(workers, 1))])
        yield from pool.map(lambda a, item: a.run.remote(item), list(items))
    finally:
        if started:
            ray.shutdown()


def run_ray(checkpoint: str | Path, paths: Sequence[Path], methods, params, root, address: Optional[str] = None,
            workers: int = 2, progress: Optional[Callable[[int, int], None]] = None,
            segmenter: Optional[str | Path] = None) -> Iterable[ImageResult]:
    """The same work on Ray (`ray_map`): `workers` actors each load the model once and take images as they free up.
    Results come back in the input order. `address`: None starts Ray here; "auto" or "ray://HOST:10001" joins."""
    def one(clf, path: str, seg=None) -> ImageResult:
        return process_image(clf, path, methods, params, root, seg=seg)

    for i, res in enumerate(ray_map(checkpoint, one, [str(p) for p in paths], address, workers, segmenter)):
        yield res
        if progress:
            progress(i + 1, len(paths))


def explain_folder(checkpoint: str | Path, folder: str | Path, methods: Sequence[str], out_dir: str | Path,
                   params: Optional[dict] = None, address: Optional[str] = None, workers: int = 2,
                   serial: bool = False, log=print, lesions: bool = True) -> dict:
    """Explain every image under `folder`; writes overlays, attributions and results.csv into `out_dir`; with
    `lesions`, also the predicted lesions when a segmenter of the checkpoint's modality is installed beside it."""
    from core.checkpoints import read_metadata, segmenter_for
    from core.explain import EXPLAINERS, FAST_PARAMS

    unknown = [m for m in methods if m not in EXPLAINERS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(EXPLAINERS)}.")
    params = FAST_PARAMS if params is None else params
    paths = list_images(folder)
    if not paths:
        raise FileNotFoundError(f"No images under {folder}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Path(checkpoint)
    seg = segmenter_for(read_metadata(ckpt), ckpt.resolve().parent) if lesions else None
    if seg is not None:
        log(f"Predicted lesions by {seg.name} (a model's outline, not a ground truth): {out / 'lesions'}")
    t0 = time.perf_counter()
    report = lambda i, n: log(f"[{i}/{n}] {time.perf_counter() - t0:.1f} s")  # noqa: E731
    it = (run_serial(checkpoint, paths, methods, params, folder, report, seg) if serial else
          run_ray(checkpoint, paths, methods, params, folder, address, workers, report, seg))
    rows = []
    for res in it:
        write_result(res, out)
        rows.append(res.row)
    flagged = [r for r in rows if not r.get("error") and bool(r.get("out_of_distribution"))]
    if flagged:
        log(f"{len(flagged)} image(s) out of distribution: checking the other installed checkpoints")
        suggest_checkpoints(checkpoint, flagged, folder)
    write_csv(rows, out / "results.csv")
    summary = {"checkpoint": str(checkpoint), "folder": str(folder), "images": len(rows),
               "errors": sum(bool(r.get("error")) for r in rows), "out_of_distribution": len(flagged),
               "fit_another_checkpoint": sum(bool(r["suitable_checkpoints"]) for r in flagged),
               "methods": list(methods), **lesion_summary(rows, seg),
               "params": {m: params.get(m, {}) for m in methods}, "mode": "serial" if serial else
               f"ray ({address or 'local'}, {workers} workers)", "wall_seconds": round(time.perf_counter() - t0, 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def lesion_summary(rows: Sequence[dict], seg: Optional[Path]) -> dict:
    """summary.json's lesion part: the segmenter, how many images got an outline, and the mean Dice over the images
    whose masks beside them hold a lesion (None without any)."""
    if seg is None:
        return {"segmenter": None}
    done = [r for r in rows if "lesion_area_fraction" in r]
    scored = [float(r["lesion_dice"]) for r in done if r.get("lesion_dice") not in ("", None)]
    return {"segmenter": seg.name, "lesions_outlined": sum(float(r["lesion_area_fraction"]) > 0 for r in done),
            "lesion_images_scored": len(scored), "lesion_dice_mean": float(np.mean(scored)) if scored else None,
            "no_lesion_images_outlined": sum(r.get("lesion_true_area_fraction") == 0.0
                                             and float(r["lesion_area_fraction"]) > 0 for r in done)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.batch", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("folder")
    ap.add_argument("--methods", default="gradcam,lime", help="comma-separated method names")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--address", default=None, help="Ray cluster: 'auto' or ray://HOST:10001 (default: start Ray here)")
    ap.add_argument("--workers", type=int, default=2, help="Ray actors (each loads the model once)")
    ap.add_argument("--serial", action="store_true", help="no Ray: one process, one image after another")
    ap.add_argument("--no-lesions", action="store_true",
                    help="skip the predicted lesions (done when a segmenter of the checkpoint's modality is installed)")
    args = ap.parse_args(argv)
    from core.errors import BreastXAIError

    try:
        s = explain_folder(args.checkpoint, args.folder, [m.strip() for m in args.methods.split(",") if m.strip()],
                           args.out, address=args.address, workers=args.workers, serial=args.serial,
                           lesions=not args.no_lesions)
    except (BreastXAIError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{s['images']} images ({s['errors']} unreadable, {s['out_of_distribution']} out of distribution: no "
          f"verdict, {s['fit_another_checkpoint']} of them fit another installed checkpoint, see "
          f"suitable_checkpoints) in {s['wall_seconds']} s, {s['mode']}; results in {args.out}/results.csv")
    if s["segmenter"]:
        dice = s["lesion_dice_mean"]
        print(f"Predicted lesions ({s['segmenter']}): {s['lesions_outlined']} images outlined"
              + (f", mean Dice {dice:.3f} over the {s['lesion_images_scored']} whose masks beside them hold a lesion"
                 if dice is not None else "") + f"; masks in {args.out}/lesions/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
