#!/usr/bin/env python
"""Several browser sessions explaining different images at once, against one session alone, in one run.

    python benchmarks/dashboard_sessions.py [--sessions 4] [--out screenshots]

Starts the real server (`benchmarks/dashboard_latency.dashboard`) with one committed checkpoint and opens one
headless Chromium per session. Each session uploads its own BUSI image on Explain and waits for the prediction.
First one session explains a further image alone (Grad-CAM + LIME 300, the page's default), then every session
presses Explain at the same moment. Each figure is the time from the click to the session's last page change
with both overlays on screen, and beside it the time until its Grad-CAM map was on screen (drawn while LIME runs). Also the CPU seconds the server and the browsers took during the concurrent part
(Linux /proc): here the browsers run on the server's cores, which a real deployment's clients do not. Ends with one
JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dashboard_latency import ROOT, chromium, dashboard, explain_now, only_checkpoints, upload  # noqa: E402

sys.path.insert(0, str(ROOT))

BUSI = ROOT.parent / "shared/data/busi/Dataset_BUSI_with_GT"


def cpu_seconds() -> dict:
    """CPU seconds (user + system) used so far by the running Streamlit server and Chromium processes; {} off Linux."""
    if not os.path.isdir("/proc"):
        return {}
    tick, out = os.sysconf("SC_CLK_TCK"), {"server": 0.0, "browsers": 0.0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        who = "server" if b"streamlit" in cmd else "browsers" if b"chrom" in cmd else None
        if who:
            out[who] += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
    return out


def secs(t: float | None) -> str:
    return "n/a" if t is None else f"{t:.1f} s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--checkpoint", default="busi_densenet121", help="the one checkpoint the app serves")
    ap.add_argument("--out", default=str(ROOT / "screenshots"))
    args = ap.parse_args()
    per_class = [sorted((p for p in (BUSI / c).glob("*.png") if "_mask" not in p.name), key=lambda p: p.name)
                 for c in ("benign", "malignant")] if BUSI.is_dir() else [[], []]
    images = [p for pair in zip(*per_class) for p in pair][:args.sessions + 1]  # benign and malignant in turn
    if len(images) < args.sessions + 1:
        print(f"needs {args.sessions + 1} BUSI images under {BUSI}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with only_checkpoints(args.checkpoint) as env, dashboard(env) as (first, url):
        drivers = [first] + [chromium() for _ in range(args.sessions - 1)]
        try:
            upload(first, url, images[-1])
            single, single_map = explain_now(first)
            print(f"one session alone: Grad-CAM + LIME 300 in {single:.1f} s (Grad-CAM map after {secs(single_map)})")
            for drv, image in zip(drivers, images):
                upload(drv, url, image)
            barrier = threading.Barrier(len(drivers))
            took: list = [None] * len(drivers)
            maps: list = [None] * len(drivers)

            def run(i: int) -> None:
                barrier.wait()
                took[i], maps[i] = explain_now(drivers[i])

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(drivers))]
            t0, cpu0 = time.time(), cpu_seconds()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.time() - t0
            cpu = {k: round(v - cpu0[k], 1) for k, v in cpu_seconds().items()}
            for i, (drv, image) in enumerate(zip(drivers, images)):
                drv.save_screenshot(str(out / f"sessions_{i + 1}.png"))
                print(f"session {i + 1} ({image.name}): {took[i]:.1f} s (Grad-CAM map after {secs(maps[i])})")
        finally:
            for drv in drivers[1:]:
                drv.quit()
    worst = max(took)
    print(f"{len(drivers)} sessions at once: slowest {worst:.1f} s (target 20 s), {worst / single:.1f}x one session "
          f"alone; all done {wall:.1f} s after the clicks")
    if cpu:
        print(f"CPU seconds meanwhile: server {cpu['server']}, browsers {cpu['browsers']} "
              f"(of {wall * (os.cpu_count() or 1):.0f} on {os.cpu_count()} cores)")
    print(json.dumps({"checkpoint": args.checkpoint, "sessions": len(drivers), "each_s": [round(t, 2) for t in took],
                      "each_gradcam_map_s": [None if t is None else round(t, 2) for t in maps],
                      "single_gradcam_map_s": None if single_map is None else round(single_map, 2),
                      "max_s": round(worst, 2), "single_s": round(single, 2), "max_vs_single": round(worst / single, 2),
                      "server_cpu_s": cpu.get("server"), "browser_cpu_s": cpu.get("browsers")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
