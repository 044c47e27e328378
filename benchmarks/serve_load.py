#!/usr/bin/env python
"""Load test of the REST service: N concurrent clients x M requests of POST /predict on localhost.

    python benchmarks/serve_load.py [--checkpoints checkpoints] [--checkpoint busi_densenet121] [IMAGE]

Starts `python -m core.serve` on a free port, warms it with one request, then prints p50 / p95 / max latency,
throughput, the error count and the single-client latency measured in the same run (their ratio is the figure
to compare across machines). Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", nargs="?", default=None)
    ap.add_argument("--checkpoints", default=str(ROOT / "checkpoints"))
    ap.add_argument("--checkpoint", default=None, help="bundle name (default: the service's first)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="per client")
    args = ap.parse_args()
    if args.image:
        data = Path(args.image).read_bytes()
    else:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buf, "PNG")
        data = buf.getvalue()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "core.serve", "--port", str(port), "--checkpoints",
                             args.checkpoints], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    url = f"http://127.0.0.1:{port}"
    form = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)

        def one(client) -> tuple[float, int]:
            t0 = time.perf_counter()
            r = client.post(url + "/predict", files={"file": ("x.png", data, "image/png")}, data=form, timeout=120)
            return time.perf_counter() - t0, r.status_code

        with httpx.Client() as c:
            one(c)  # loads the model
            single = [one(c)[0] for _ in range(10)]

        def client_run(_):
            with httpx.Client() as c:
                return [one(c) for _ in range(args.requests)]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = [r for batch in pool.map(client_run, range(args.clients)) for r in batch]
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(10)
    lat = np.array([r[0] for r in results])
    errors = sum(r[1] != 200 for r in results)
    out = {"clients": args.clients, "requests": len(results), "errors": int(errors),
           "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
           "p95_ms": round(float(np.percentile(lat, 95)) * 1000, 1), "max_ms": round(float(lat.max()) * 1000, 1),
           "throughput_rps": round(len(results) / wall, 2),
           "single_client_p50_ms": round(float(np.median(single)) * 1000, 1)}
    out["p50_vs_single_client"] = round(out["p50_ms"] / out["single_client_p50_ms"], 2)
    print(f"{out['clients']} clients x {args.requests} requests: p50 {out['p50_ms']} ms, p95 {out['p95_ms']} ms, "
          f"max {out['max_ms']} ms, {out['throughput_rps']} req/s, {errors} errors; one client alone: p50 "
          f"{out['single_client_p50_ms']} ms (ratio {out['p50_vs_single_client']})")
    print(json.dumps(out))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
