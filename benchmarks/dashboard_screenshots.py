#!/usr/bin/env python
"""Screenshots of one checkpoint explaining uploaded images in the real dashboard (headless Chromium).

    python benchmarks/dashboard_screenshots.py checkpoints/histo_densenet121 IMAGE [IMAGE ...] [--out DIR]
        [--also checkpoints/busi_unet_densenet121]

Serves only that checkpoint, saves the model card, then for each image: upload on Explain, run the
default methods (Grad-CAM + LIME), print the time to the overlays and the number of exception boxes,
save a screenshot; finally the Evaluation page.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from dashboard_latency import dashboard, idle, wait_for


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--out", default=str(ROOT / "screenshots"))
    ap.add_argument("--also", action="append", default=[], metavar="BUNDLE",
                    help="serve this bundle too (e.g. the lesion segmenter that outlines ultrasound lesions)")
    args = ap.parse_args()
    from selenium.webdriver.common.by import By

    bundle = Path(args.checkpoint).resolve()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = Path(tempfile.mkdtemp())
    (only / bundle.name).symlink_to(bundle)
    for extra in args.also:
        (only / Path(extra).resolve().name).symlink_to(Path(extra).resolve())
    h3 = lambda d: [h.text for h in d.find_elements(By.CSS_SELECTOR, "h3")]  # noqa: E731
    with dashboard({"BREASTXAI_CHECKPOINTS": str(only)}, window="1400,2400") as (drv, url):
        drv.get(url)
        wait_for(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "h1"))
        time.sleep(2)
        wait_for(drv, idle)
        drv.save_screenshot(str(out / f"{bundle.name}_home.png"))
        for image in map(Path, args.images):
            drv.get(url + "/Explain")
            wait_for(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "input[type=file]"))
            drv.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(image.resolve()))
            wait_for(drv, lambda d: any(t.startswith(("Prediction:", "Out of distribution")) for t in h3(d)))
            wait_for(drv, idle)
            t0 = time.time()
            drv.find_element(By.XPATH, "//button[.//p[text()='Explain']]").click()
            wait_for(drv, lambda d: any(t.startswith("Grad-CAM") for t in h3(d)), 600)  # LIME may be skipped
            wait_for(drv, idle)
            time.sleep(1)
            pred = next(t for t in h3(drv) if t.startswith(("Prediction:", "Out of distribution")))
            n_exc = len(drv.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'))
            print(f"{image.name}: {pred}; Grad-CAM + LIME on screen in {time.time() - t0:.1f} s; exceptions {n_exc}")
            drv.save_screenshot(str(out / f"{bundle.name}_explain_{image.stem}.png"))
        drv.get(url + "/Evaluation")
        wait_for(drv, lambda d: d.find_elements(By.CSS_SELECTOR, "h1"))
        time.sleep(2)
        wait_for(drv, idle)
        drv.save_screenshot(str(out / f"{bundle.name}_evaluation.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
