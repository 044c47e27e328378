"""REST service (FastAPI): predictions and explanations for hospital viewers, teaching platforms and scripts.

    python -m core.serve [--host 127.0.0.1] [--port 8000] [--checkpoints DIR]    # or: uvicorn core.serve:app

GET /healthz, GET /checkpoints (model cards), POST /predict (multipart `file` -> calibrated probabilities,
out-of-distribution check, operating point; for an out-of-distribution image, `suitable_checkpoints`: the other
checkpoints whose detector accepts it), POST /explain (`file`, `method`, `params` JSON -> heatmap PNG and
float16 attribution `.npy`, both base64, with parameters, seeds and timings), POST /segment (`file` -> the lesion
segmenter's predicted lesion: mask PNG, outline, size and shape, what the segmenter's test split says of it; no mask
for an image the same modality's classifier finds unlike its training data). OpenAPI docs at /docs.
Uploads pass the dashboard's checks (`core.preprocessing.decode_image`: formats, 50 MB and 40 MP caps); bad
input gets a 4xx JSON error. With $BREASTXAI_API_KEY set, every endpoint but /healthz needs the header
`X-API-Key`. The service listens on localhost unless told otherwise.
"""
import argparse
import base64
import functools
import hashlib
import hmac
import io
import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse

from core.checkpoints import CHECKPOINTS_DIR, InstalledClassifiers, InstalledSegmenters, read_metadata
from core.errors import BreastXAIError, CheckpointError, CheckpointNotFoundError, InvalidImageError

API_KEY_ENV = "BREASTXAI_API_KEY"


def model_card(path: Path) -> dict:
    """The parts of a bundle's metadata a client needs to judge a prediction."""
    from core.gallery import modality_of

    meta = read_metadata(path)
    test = meta.get("metrics", {}).get("test", {})
    cv = meta.get("cross_validation") or {}
    card = {"name": path.name, "class_names": meta.get("class_names"), "input_size": meta.get("input_size"),
            "backbone": meta.get("backbone"), "model_sha256": meta.get("model_sha256"),
            "dataset": (meta.get("dataset") or {}).get("kind"),
            "modality": modality_of(meta),
            "citation": (meta.get("dataset") or {}).get("citation"), "created": meta.get("created"),
            "git_commit": meta.get("git_commit"),
            "test": {k: test.get(k) for k in ("n", "accuracy", "accuracy_ci95", "balanced_accuracy", "roc_auc_macro",
                                              "roc_auc_ci95", "ece")},
            "cross_validation": ({k: cv.get(k) for k in ("pooled_accuracy", "pooled_balanced_accuracy",
                                                         "pooled_roc_auc", "pooled_recall")} | {"folds": len(cv.get(
                                                             "folds", []))}) if cv else None,
            "operating_point": meta.get("operating_point"),
            "temperature": (meta.get("calibration") or {}).get("temperature")}
    if cv:
        card["cross_validation"]["by_subtype"] = _by_subtype(path)
    return card


def _by_subtype(path: Path) -> Optional[list[dict]]:
    """The cross-validation's images right per tumour subtype (None without subtypes or out-of-fold predictions)."""
    from core.evaluation import subtypes_from_bundle

    rows = subtypes_from_bundle(path, "cv") or []
    return [{k: r[k] for k in ("subgroup", "class", "images", "images_correct", "recall")} for r in rows] or None


def operating_point(meta: dict, probs: np.ndarray, class_names: Sequence[str]) -> Optional[dict]:
    op = meta.get("operating_point")
    if not op or op.get("positive_class") not in class_names:
        return None
    p = float(probs[list(class_names).index(op["positive_class"])])
    return {"positive_class": op["positive_class"], "threshold": op["threshold"], "probability": p,
            "flagged": p >= op["threshold"], "test_sensitivity": op["test"]["sensitivity"],
            "test_specificity": op["test"]["specificity"], "rule": op["rule"]}


def _read(upload) -> bytes:
    """The upload's bytes, at most one byte over the decoder's size cap (so a huge upload is refused, not read)."""
    import core.preprocessing as P

    return upload.file.read(P.MAX_BYTES + 1)


def _decode(data: bytes) -> np.ndarray:
    import core.preprocessing as P

    if not data:
        raise InvalidImageError("The upload is empty (0 bytes).")
    return P.decode_image(data, max_bytes=P.MAX_BYTES).array


def _png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _npy_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, np.float16), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def lesion_result(seg, image: np.ndarray, mm_per_pixel: Optional[float] = None, predicted_class: Optional[str] = None,
                  on_negative=None) -> dict:
    """The segmenter's predicted lesion on one image: mask (bool (H, W) -> PNG, 255 = lesion), the outline of its
    largest region as (x, y) points, `core.segmentation.lesion_measurements` and its sentence, and the caveat the
    Explain page shows (`lesion_caveat`: the segmenter's test misses and, when the classifier called the scan normal
    (`predicted_class`), what outlines on such scans meant, `on_negative`)."""
    from core.segmentation import describe_lesion, lesion_caveat, lesion_measurements, outline, read_missed_lesions

    mask = seg.predict_mask(image)
    m = lesion_measurements(mask, mm_per_pixel)
    dice = (seg.metadata.get("metrics", {}).get("test", {}).get("dice") or {}).get("mean")
    missed = read_missed_lesions(seg.path, "test") if seg.path is not None else None
    caveat = " ".join(filter(None, [
        "A model's prediction, not a ground truth.",
        f"On its test split it outlined lesions with mean Dice {dice:.2f}." if dice is not None else None,
        lesion_caveat(missed, on_negative, predicted_class or "", mask)]))
    return {"mask_png": _png_b64(mask.astype(np.uint8) * 255), "mask_shape": list(mask.shape),
            "outline": outline(mask)[0].tolist() if m is not None else [],
            "lesion": m, "description": describe_lesion(m), "caveat": caveat,
            "threshold": seg.threshold, "test_dice": dice}


def create_app(checkpoints: Optional[str | Path] = None, api_key: Optional[str] = None):
    """The FastAPI app over the classifier bundles in `checkpoints` (default: $BREASTXAI_CHECKPOINTS or
    checkpoints/); `api_key` (default: $BREASTXAI_API_KEY) makes every endpoint but /healthz need it."""
    from core.evaluation import subtype_caution, subtypes_from_bundle
    from core.explain import EXPLAINERS, MAX_PERTURBATION_TILES, PERTURBATION_METHODS, explain
    from core.explain.visualise import overlay

    root = Path(checkpoints or os.environ.get("BREASTXAI_CHECKPOINTS") or CHECKPOINTS_DIR)
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    models = InstalledClassifiers(root)
    segmenters = InstalledSegmenters(root)
    subtype_rows = functools.lru_cache(maxsize=64)(subtypes_from_bundle)  # the bundles' CSVs, read once each
    app = FastAPI(title="BreastXAI", version="1", description=(
        "Predictions with calibrated probabilities and explanations (Grad-CAM, Grad-CAM++, LIME, SHAP, occlusion, "
        "integrated gradients) for breast histopathology and ultrasound images. Research and teaching aid, not a "
        "diagnostic device."))

    def check_key(x_api_key: Optional[str] = Header(default=None)) -> None:
        # constant-time comparison: the response time does not tell how much of a guessed key is right
        if key and not hmac.compare_digest((x_api_key or "").encode(), key.encode()):
            raise HTTPException(401, "Missing or wrong X-API-Key header.")

    @app.exception_handler(InvalidImageError)
    async def _bad_image(request: Request, exc: InvalidImageError):
        status = 413 if "limit" in str(exc) else 400  # size caps: 413 Content Too Large
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(CheckpointNotFoundError)
    async def _not_found(request: Request, exc: CheckpointNotFoundError):
        return JSONResponse({"detail": str(exc.args[0] if exc.args else exc)}, status_code=404)

    @app.exception_handler(CheckpointError)
    async def _broken(request: Request, exc: CheckpointError):
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(BreastXAIError)
    async def _other(request: Request, exc: BreastXAIError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.get("/healthz")
    def healthz() -> dict:
        """Liveness: the service runs and how many checkpoints it can serve."""
        return {"status": "ok", "checkpoints": len(models.names())}

    @app.get("/checkpoints", dependencies=[Depends(check_key)])
    def checkpoints_() -> list[dict]:
        """Every classifier's model card: classes, measured quality, operating point, hashes."""
        return [model_card(root / n) for n in models.names()]

    def predict_one(data: bytes, checkpoint: Optional[str]) -> tuple[object, np.ndarray, dict]:
        clf = models.get(checkpoint)
        image = _decode(data)
        t0 = time.perf_counter()
        probs = clf.predict_proba(image)[0]
        ood = (clf.ood_check([image]) or [None])[0]
        names = list(clf.class_names)
        verdict_ok = not (ood or {}).get("out_of_distribution", False)
        out = {"checkpoint": clf.name, "model_sha256": clf.metadata.get("model_sha256"),
               "image_sha256": hashlib.sha256(data).hexdigest(), "class_names": names,
               "probabilities": {c: float(p) for c, p in zip(names, probs)},
               "predicted": names[int(np.argmax(probs))] if verdict_ok else None,
               "out_of_distribution": ood, "operating_point": operating_point(clf.metadata, probs, names)
               if verdict_ok else None,
               "note": None if verdict_ok else "The image does not resemble the training data: no verdict.",
               "caution": subtype_caution(root / clf.name, probs, names, clf.metadata, rows=subtype_rows)
               if verdict_ok else None,
               "suitable_checkpoints": None if verdict_ok else models.fitting(image, clf.name),
               "seconds": round(time.perf_counter() - t0, 4)}
        return clf, image, out

    @app.post("/predict", dependencies=[Depends(check_key)])
    def predict(file: UploadFile = File(..., description="breast histopathology or ultrasound image"),
                checkpoint: Optional[str] = Form(default=None)) -> dict:
        """Calibrated probabilities, the out-of-distribution check (no verdict when it fires), the operating point,
        and `caution`: the tumour subtypes the cross-validation most often gave this call (BreakHis), or null."""
        return predict_one(_read(file), checkpoint)[2]

    @app.post("/explain", dependencies=[Depends(check_key)])
    def explain_(file: UploadFile = File(...), method: str = Form("gradcam"),
                 params: str = Form("{}", description='JSON object of method parameters, e.g. {"num_samples": 300}'),
                 target: Optional[int] = Form(default=None, description="class index (default: the predicted class)"),
                 checkpoint: Optional[str] = Form(default=None)) -> dict:
        """One explanation: heatmap overlay PNG and float16 attribution (.npy), both base64; parameters, seeds, time."""
        if method not in EXPLAINERS:
            raise HTTPException(400, f"Unknown method {method!r}; choose one of {', '.join(EXPLAINERS)}.")
        try:
            kwargs = json.loads(params or "{}")
        except json.JSONDecodeError as exc:
            raise HTTPException(400, f"params must be a JSON object: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise HTTPException(400, "params must be a JSON object.")
        clf, image, pred = predict_one(_read(file), checkpoint)
        if target is not None and not 0 <= target < len(clf.class_names):
            raise HTTPException(400, f"target must be a class index in [0, {len(clf.class_names) - 1}].")
        if method in PERTURBATION_METHODS and clf.n_tiles(image) > MAX_PERTURBATION_TILES:
            raise HTTPException(413, f"The image is {clf.n_tiles(image)} tiles of the model's patch size; {method} "
                                "would re-classify all of them for every sample. Send one patch or a smaller region.")
        try:
            e = explain(clf, image, method, target, **kwargs)
        except TypeError as exc:  # unknown parameter names
            raise HTTPException(400, str(exc)) from exc
        except ValueError as exc:  # out-of-range parameter values
            raise HTTPException(400, f"Bad parameter value: {exc}") from exc
        plain = {k: v for k, v in e.params.items() if isinstance(v, (int, float, str, bool, type(None)))}
        return {**{k: pred[k] for k in ("checkpoint", "model_sha256", "image_sha256", "probabilities",
                                        "out_of_distribution")},
                "method": e.method, "target": e.target, "class_name": e.class_name, "probability": e.probability,
                "has_positive_evidence": e.has_positive_evidence, "params": plain,
                "perturbed_probability": list(e.perturbed_range) if e.perturbed_range else None,
                "weak_effect": e.weak_effect,
                "seeds": {k: v for k, v in plain.items() if "seed" in k}, "seconds": round(e.seconds, 4),
                "heatmap_png": _png_b64(overlay(image, e.heatmap(), 0.5)),
                "attribution_npy": _npy_b64(e.attribution), "attribution_shape": list(e.attribution.shape)}

    @functools.lru_cache(maxsize=16)
    def negative_outlines(classifier: str, segmenter: str):
        """What outlines meant on scans the classifier called normal (the two bundles' files, read once)."""
        from core.segmentation import read_outline_on_negative

        return read_outline_on_negative(root / classifier, root / segmenter)

    def modality_classifier(seg_name: str) -> Optional[str]:
        """The first classifier under `root` of the segmenter `seg_name`'s imaging modality (its detector checks
        uploads); from the bundles' cached summaries, so a request parses no metadata.json."""
        from core.checkpoints import bundle_summary
        from core.gallery import MODALITY

        modality = lambda name: MODALITY.get(bundle_summary(root / name)[1])  # noqa: E731
        want = modality(seg_name)
        return next((n for n in models.names() if want is not None and modality(n) == want), None)

    @app.get("/segmenters", dependencies=[Depends(check_key)])
    def segmenters_() -> list[dict]:
        """Every lesion segmenter: name, input size, test Dice on lesion images, the classifier that vets uploads."""
        out = []
        for n in segmenters.names():
            meta = read_metadata(root / n)
            out.append({"name": n, "input_size": meta.get("input_size"), "model_sha256": meta.get("model_sha256"),
                        "dataset": (meta.get("dataset") or {}).get("kind"),
                        "test_dice": ((meta.get("metrics", {}).get("test", {}).get("dice")) or {}).get("mean"),
                        "checked_by": modality_classifier(n)})
        return out

    @app.post("/segment", dependencies=[Depends(check_key)])
    def segment(file: UploadFile = File(..., description="breast ultrasound image"),
                segmenter: Optional[str] = Form(default=None, description="segmenter bundle (default: the first)"),
                mm_per_pixel: Optional[float] = Form(default=None, gt=0, description="pixel size, for sizes in mm"),
                ) -> dict:
        """The predicted lesion (a model's outline, not a ground truth). When a classifier of the segmenter's
        modality is installed, its out-of-distribution check runs first and an image unlike its training data gets
        no mask (`mask_png` null, `note` says why); otherwise its predicted class is `classifier_prediction` and the
        caveat says what outlines meant on scans it called normal."""
        data = _read(file)
        seg = segmenters.get(segmenter)
        image = _decode(data)
        t0 = time.perf_counter()
        vetter = modality_classifier(seg.name)
        out = {"segmenter": seg.name, "model_sha256": seg.metadata.get("model_sha256"),
               "image_sha256": hashlib.sha256(data).hexdigest(), "checked_by": vetter, "out_of_distribution": None,
               "classifier_prediction": None}
        predicted = on_negative = None
        if vetter:
            clf = models.get(vetter)
            out["out_of_distribution"] = (clf.ood_check([image]) or [None])[0]
            if (out["out_of_distribution"] or {}).get("out_of_distribution", False):
                return {**out, "mask_png": None, "lesion": None, "seconds": round(time.perf_counter() - t0, 4),
                        "note": f"The image does not resemble {vetter}'s training data: no lesion outlined."}
            predicted = out["classifier_prediction"] = clf.class_names[int(np.argmax(clf.predict_proba(image)[0]))]
            on_negative = negative_outlines(vetter, seg.name)
        return {**out, **lesion_result(seg, image, mm_per_pixel, predicted, on_negative), "note": None,
                "seconds": round(time.perf_counter() - t0, 4)}

    return app


def __getattr__(name: str):
    """`uvicorn core.serve:app`: the app over $BREASTXAI_CHECKPOINTS (or checkpoints/), made on first access."""
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)


def ray_serve_app(checkpoints: Optional[str | Path] = None, replicas: int = 2, api_key: Optional[str] = None):
    """The same FastAPI app as a Ray Serve deployment with `replicas` copies (each loads its own models).

        import ray; from ray import serve
        serve.run(ray_serve_app("checkpoints", replicas=4), route_prefix="/")    # or: python -m core.serve --ray 4
    """
    from ray import serve

    api = create_app(checkpoints, api_key)

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 1})
    @serve.ingress(api)
    class BreastXAIService:
        pass

    return BreastXAIService.bind()


def main(argv: Optional[Sequence[str]] = None) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m core.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="listen address (default: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--checkpoints", default=None, help="folder of checkpoint bundles (default: checkpoints/)")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (each loads its own models)")
    ap.add_argument("--ray", type=int, default=0, metavar="N",
                    help="serve with Ray Serve, N replicas (on a running cluster with RAY_ADDRESS, else on this machine)")
    args = ap.parse_args(argv)
    if args.checkpoints:
        os.environ["BREASTXAI_CHECKPOINTS"] = args.checkpoints
    if args.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(API_KEY_ENV):
        print(f"warning: listening on {args.host} without an API key; set ${API_KEY_ENV} to require one.")
    if args.ray:
        import ray
        from ray import serve

        ray.init(address=os.environ.get("RAY_ADDRESS"))
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(ray_serve_app(args.checkpoints, args.ray), route_prefix="/", blocking=True)
        return 0
    uvicorn.run("core.serve:app", host=args.host, port=args.port, workers=args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
