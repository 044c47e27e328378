#!/usr/bin/env python
"""The lesion segmenter's forward pass: Keras float32 against OpenVINO float32, each in a fresh process, one run.

    python benchmarks/segmenter.py [checkpoints/busi_unet_densenet121] [--images 12]

Per backend: seconds from a fresh interpreter to a loaded segmenter (imports included), the first map, and the median
of the following maps, on BUSI test images (random textures without the dataset). OpenVINO is measured warm (its
converted model and self-check cached, as on every start after the first); a conversion run comes first.
Agreement: max |Δp| over every pixel and the pixels whose predicted-lesion mask changes. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import numpy as np
from core.checkpoints import load_segmenter
seg = load_segmenter({bundle!r}, backend={backend!r})
t1 = time.perf_counter()
images = [x for x in np.load({images!r}, allow_pickle=True)]
maps, times = [], []
for im in images:
    a = time.perf_counter()
    maps.append(seg.predict_proba_map(im))
    times.append(time.perf_counter() - a)
np.save({out!r}, np.array(maps, dtype=object), allow_pickle=True)
print(json.dumps({{"load_s": t1 - t0, "first_map_s": times[0], "map_s": float(np.median(times[1:])),
                  "backend": seg.backend_info.get("backend", "keras float32") if seg.backend_info else None,
                  "threshold": seg.threshold, "largest_region_only": seg.largest_region_only,
                  "tensorflow_imported": "tensorflow" in sys.modules}}))
"""


def child(bundle: str, backend: str, images: Path, out: Path) -> dict:
    code = CHILD.format(root=str(ROOT), bundle=bundle, backend=backend, images=str(images), out=str(out))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{backend} run failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_images(bundle: Path, n: int):
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from core.checkpoints import read_metadata
    from core.data.roots import bundle_splits

    try:
        man = bundle_splits(bundle, read_metadata(bundle))["test"]
        return [man.read(s) for s in list(man)[:n]], "BUSI test images"
    except Exception as exc:  # no dataset here: random textures of ultrasound size
        print(f"test images not available ({type(exc).__name__}): random textures")
        rng = np.random.default_rng(0)
        return [rng.integers(0, 255, (480, 560, 3)).astype(np.uint8) for _ in range(n)], "random textures"


def main() -> int:
    import tempfile

    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", default=str(ROOT / "checkpoints/busi_unet_densenet121"))
    ap.add_argument("--images", type=int, default=12)
    args = ap.parse_args()
    images, source = test_images(Path(args.checkpoint), max(args.images, 2))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "images.npy", np.array(images, dtype=object), allow_pickle=True)
        child(args.checkpoint, "auto", tmp / "images.npy", tmp / "warmup.npy")  # converts and checks once
        keras = child(args.checkpoint, "keras", tmp / "images.npy", tmp / "keras.npy")
        ov = child(args.checkpoint, "auto", tmp / "images.npy", tmp / "ov.npy")
        mk = np.load(tmp / "keras.npy", allow_pickle=True)
        mo = np.load(tmp / "ov.npy", allow_pickle=True)
    from core.segmentation import postprocess

    dp = max(float(np.abs(a - b).max()) for a, b in zip(mk, mo))
    post = (keras["threshold"], keras["largest_region_only"])
    changed = sum(int((postprocess(a, *post) != postprocess(b, *post)).sum()) for a, b in zip(mk, mo))
    pixels = sum(a.size for a in mk)
    fig = {"images": len(images), "source": source, "backend": ov["backend"],
           "keras_load_s": round(keras["load_s"], 3), "openvino_load_s": round(ov["load_s"], 3),
           "load_ratio": round(ov["load_s"] / keras["load_s"], 3),
           "keras_first_map_s": round(keras["first_map_s"], 3), "openvino_first_map_s": round(ov["first_map_s"], 3),
           "keras_map_s": round(keras["map_s"], 4), "openvino_map_s": round(ov["map_s"], 4),
           "map_ratio": round(ov["map_s"] / keras["map_s"], 3),
           "openvino_imports_tensorflow": ov["tensorflow_imported"],
           "max_abs_dp": dp, "mask_pixels_changed": changed, "pixels": pixels}
    print(f"{len(images)} {source}; OpenVINO backend: {ov['backend']}")
    print(f"load (fresh process): keras {keras['load_s']:.2f} s, openvino {ov['load_s']:.2f} s "
          f"(ratio {fig['load_ratio']:.2f}; TensorFlow imported: {ov['tensorflow_imported']})")
    print(f"first map: keras {keras['first_map_s']:.3f} s, openvino {ov['first_map_s']:.3f} s")
    print(f"per map (median): keras {keras['map_s']:.3f} s, openvino {ov['map_s']:.3f} s (ratio {fig['map_ratio']:.2f})")
    print(f"agreement: max |dp| {dp:.2e}; mask pixels changed {changed} of {pixels}")
    print(json.dumps(fig))
    return 0


if __name__ == "__main__":
    sys.exit(main())
