"""python -m core.explain IMAGE --checkpoint C --method lime [--param k=v ...] --out overlay.png"""
from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional, Sequence


def parse_params(items: Sequence[str]) -> dict:
    """['n_segments=80', 'hide_color=blur', 'positive_only=true'] -> {'n_segments': 80, 'hide_color': 'blur',
    'positive_only': True}: Python literals, true / false / yes / no / none in any case, else the text."""
    words = {"true": True, "yes": True, "false": False, "no": False, "none": None, "null": None}
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--param expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        if v.strip().lower() in words:
            out[k.strip()] = words[v.strip().lower()]
            continue
        try:
            out[k.strip()] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k.strip()] = v
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from core.explain import EXPLAINERS

    ap = argparse.ArgumentParser(prog="python -m core.explain", description="Explain one image with one method.")
    ap.add_argument("image", help="PNG/JPEG/TIFF/BMP image")
    ap.add_argument("--checkpoint", default="checkpoints/busi_densenet121", help="checkpoint bundle folder")
    ap.add_argument("--method", default="gradcam", choices=sorted(EXPLAINERS))
    ap.add_argument("--target", type=int, default=None, help="class index (default: the predicted class)")
    ap.add_argument("--param", action="append", default=[], metavar="K=V",
                    help="method parameter, repeatable; e.g. --param n_segments=80 --param random_seed=1")
    ap.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    ap.add_argument("--out", default="overlay.png", help="where to write the overlay PNG")
    args = ap.parse_args(argv)

    from PIL import Image

    from core.checkpoints import load_classifier
    from core.errors import BreastXAIError
    from core.explain import explain
    from core.explain.visualise import boundaries, overlay
    from core.preprocessing import load_image

    try:
        params = parse_params(args.param)
        image = load_image(args.image)
        clf = load_classifier(args.checkpoint)
        e = explain(clf, image, args.method, target=args.target, **params)
    except (BreastXAIError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if isinstance(exc, TypeError):
            names = [f.name for f in fields(EXPLAINERS[args.method].Params)]
            print(f"{args.method} parameters: {', '.join(names)}", file=sys.stderr)
        return 2
    out = overlay(image, e.heatmap(), args.alpha)
    if e.segments is not None:
        out = boundaries(out, e.segments)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out).save(args.out)
    probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(clf.class_names, e.probabilities))
    print(f"prediction: {clf.class_names[int(e.probabilities.argmax())]} ({probs})")
    print(f"explained class: {e.class_name} (p = {e.probability:.3f}) with {e.method} in {e.seconds:.2f} s")
    print(f"parameters: {e.params}")
    print(f"overlay written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
