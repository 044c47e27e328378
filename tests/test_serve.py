"""REST service: every endpoint with FastAPI's TestClient on the tiny bundle; bad input is a 4xx, never a 500."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_class_image

pytest.importorskip("fastapi")


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client(tiny_bundle):
    from fastapi.testclient import TestClient

    from core.serve import create_app

    return TestClient(create_app(tiny_bundle.parent, api_key=""), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def image() -> bytes:
    return png(make_class_image(1, np.random.default_rng(0), 48))


def test_health_checkpoints_and_docs(client):
    assert client.get("/healthz").json() == {"status": "ok", "checkpoints": 1}
    cards = client.get("/checkpoints").json()
    assert cards[0]["name"] == "tiny" and cards[0]["class_names"] == ["benign", "malignant"]
    assert len(cards[0]["model_sha256"]) == 64 and "accuracy" in cards[0]["test"]
    assert client.get("/docs").status_code == 200
    assert "/explain" in client.get("/openapi.json").json()["paths"]


def test_predict_matches_the_classifier(client, image, tiny_bundle):
    from core.checkpoints import load_classifier
    from core.preprocessing import load_image

    r = client.post("/predict", files={"file": ("case.png", image, "image/png")})
    assert r.status_code == 200
    body = r.json()
    expected = load_classifier(tiny_bundle).predict_proba(load_image(io.BytesIO(image)))[0]
    assert np.allclose([body["probabilities"][c] for c in body["class_names"]], expected, atol=1e-5)
    assert body["out_of_distribution"]["out_of_distribution"] in (True, False)
    assert (body["predicted"] is None) == body["out_of_distribution"]["out_of_distribution"]
    assert len(body["image_sha256"]) == 64 and "case.png" not in json.dumps(body)


def test_explain_returns_png_and_float16_attribution(client, image):
    r = client.post("/explain", files={"file": ("x.png", image, "image/png")},
                    data={"method": "lime", "params": json.dumps({"num_samples": 40, "n_segments": 10,
                                                                  "random_seed": 3})})
    assert r.status_code == 200, r.text
    body = r.json()
    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert heat.size == (48, 48)
    attr = np.load(io.BytesIO(base64.b64decode(body["attribution_npy"])))
    assert attr.dtype == np.float16 and attr.shape == (48, 48) == tuple(body["attribution_shape"])
    assert body["seeds"] == {"random_seed": 3} and body["params"]["num_samples"] == 40 and body["seconds"] > 0
    g = client.post("/explain", files={"file": ("x.png", image, "image/png")}, data={"method": "gradcam",
                                                                                       "target": "0"}).json()
    assert g["method"] == "gradcam" and g["target"] == 0 and g["class_name"] == "benign"
    lo, hi = body["perturbed_probability"]  # how far LIME's perturbations moved p; a gradient method has none
    assert 0 <= lo <= hi <= 1 and lo - 1e-4 <= body["probability"] <= hi + 1e-4  # its first sample: the image
    assert body["weak_effect"] == (hi - lo < 0.01)
    assert g["perturbed_probability"] is None and g["weak_effect"] is False


@pytest.mark.parametrize("files,data,status,words", [
    ({"file": ("a.png", b"", "image/png")}, {}, 400, "empty"),
    ({"file": ("a.png", b"not an image at all", "image/png")}, {}, 400, "not an image"),
    ({"file": ("a.pdf", b"%PDF-1.4 ...", "application/pdf")}, {}, 400, "PDF"),
    (None, {}, 422, ""),
    ({"file": ("a.png", "IMAGE", "image/png")}, {"checkpoint": "nope"}, 404, "Unknown checkpoint"),
    ({"file": ("a.png", "IMAGE", "image/png")}, {"method": "magic"}, 400, "Unknown method"),
    ({"file": ("a.png", "IMAGE", "image/png")}, {"method": "lime", "params": "{oops"}, 400, "JSON"),
    ({"file": ("a.png", "IMAGE", "image/png")}, {"method": "lime", "params": '{"bogus": 1}'}, 400, "bogus"),
    ({"file": ("a.png", "IMAGE", "image/png")}, {"method": "gradcam", "target": "7"}, 400, "target"),
    ({"file": ("a.png", "IMAGE", "image/png")}, {"method": "lime", "params": '{"num_samples": 0}'}, 400,
     "num_samples must be a whole number from 10 to 20000"),  # was an IndexError inside lime, served as 404
    ({"file": ("a.png", "IMAGE", "image/png")}, {"method": "lime", "params": '{"num_samples": 100000000}'}, 400,
     "num_samples"),  # was a 500 (out of memory) after allocating
    ({"file": ("a.png", "IMAGE", "image/png")}, {"method": "integrated_gradients", "params": '{"steps": 0}'}, 400,
     "steps"),  # was a 200 with a NaN attribution
    ({"file": ("a.png", "IMAGE", "image/png")}, {"method": "occlusion", "params": '{"baseline": "red"}'}, 400,
     "baseline must be one of"),
])
def test_bad_input_is_a_4xx_json_error(client, image, files, data, status, words):
    if files and files["file"][1] == "IMAGE":
        files = {"file": (files["file"][0], image, "image/png")}
    endpoint = "/explain" if "method" in data or "target" in data else "/predict"
    r = client.post(endpoint, files=files, data=data)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"] if words else r.json()["detail"]


def test_oversized_upload_is_413(client, monkeypatch):
    import core.preprocessing as P

    monkeypatch.setattr(P, "MAX_BYTES", 1000)
    big = png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    r = client.post("/predict", files={"file": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_api_key_required_when_set(tiny_bundle, image):
    from fastapi.testclient import TestClient

    from core.serve import create_app

    c = TestClient(create_app(tiny_bundle.parent, api_key="s3cret"))
    assert c.get("/healthz").status_code == 200
    assert c.get("/checkpoints").status_code == 401
    assert c.post("/predict", files={"file": ("a.png", image, "image/png")}).status_code == 401
    for wrong in ("s3cre", "s3cret!", "S3CRET", b"s3cr\xe9t"):  # a prefix, an extension, another case, Latin-1
        assert c.get("/checkpoints", headers={"X-API-Key": wrong}).status_code == 401, wrong
    ok = c.post("/predict", files={"file": ("a.png", image, "image/png")}, headers={"X-API-Key": "s3cret"})
    assert ok.status_code == 200


def test_ray_serve_deployment_with_two_replicas(tiny_bundle, image, ray_local):
    """The same app as a Ray Serve deployment (2 replicas) answers /healthz and /predict on localhost."""
    serve = pytest.importorskip("ray.serve")
    import httpx

    from core.serve import ray_serve_app

    port = __import__("tests.dashboard.test_browser", fromlist=["free_port"]).free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_serve_app(tiny_bundle.parent, replicas=2), route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/healthz", timeout=60).json() == {"status": "ok", "checkpoints": 1}
        r = httpx.post(url + "/predict", files={"file": ("a.png", image, "image/png")}, timeout=120)
        assert r.status_code == 200 and set(r.json()["probabilities"]) == {"benign", "malignant"}
        assert httpx.post(url + "/predict", files={"file": ("a.png", b"junk", "image/png")}, timeout=60).status_code == 400
    finally:
        serve.shutdown()


def test_out_of_distribution_predict_names_the_checkpoints_that_accept_the_image(tiny_bundle, tmp_path):
    """No verdict from the checkpoint asked, and the other checkpoint whose detector accepts the image is named."""
    from fastapi.testclient import TestClient

    from core.serve import create_app
    from tests.conftest import install_copies

    install_copies(tiny_bundle, tmp_path, ("strict", "lenient", "also_strict"), accept_all=("lenient",))
    c = TestClient(create_app(tmp_path, api_key=""), raise_server_exceptions=False)
    noise = png(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    body = c.post("/predict", files={"file": ("n.png", noise, "image/png")}, data={"checkpoint": "strict"}).json()
    assert body["out_of_distribution"]["out_of_distribution"] and body["predicted"] is None
    assert body["suitable_checkpoints"] == ["lenient"]
    body = c.post("/predict", files={"file": ("n.png", noise, "image/png")}, data={"checkpoint": "lenient"}).json()
    assert body["predicted"] is not None and body["suitable_checkpoints"] is None


def test_checkpoint_card_lists_the_cross_validation_by_tumour_subtype(tiny_bundle, tmp_path):
    """GET /checkpoints: images right per subtype from the bundle's out-of-fold predictions; none without them."""
    import shutil

    from fastapi.testclient import TestClient

    from core.checkpoints import update_metadata
    from core.serve import create_app
    from tests.conftest import write_subtype_cv

    bundle = tmp_path / "c" / "bh"
    shutil.copytree(tiny_bundle, bundle)
    update_metadata(bundle, {"cross_validation": {"pooled_accuracy": 0.5, "pooled_roc_auc": 0.6, "folds": [{}]}})
    client = TestClient(create_app(bundle.parent, api_key=""))
    assert client.get("/checkpoints").json()[0]["cross_validation"]["by_subtype"] is None  # no cv_predictions.csv
    write_subtype_cv(bundle)
    rows = client.get("/checkpoints").json()[0]["cross_validation"]["by_subtype"]
    assert [(r["subgroup"], r["class"], r["images"], r["images_correct"]) for r in rows] == [
        ("tubular_adenoma", "benign", 2, 2), ("mucinous_carcinoma", "malignant", 2, 1),
        ("papillary_carcinoma", "malignant", 2, 0)]


def test_predict_cautions_a_call_the_cross_validation_often_gave_other_subtypes(tiny_bundle, tmp_path):
    """POST /predict: a benign call names the malignant subtypes the out-of-fold predictions called benign, a
    malignant call the benign ones (the Explain page's caption, word for word); none without such predictions."""
    import shutil

    from fastapi.testclient import TestClient

    from core.serve import create_app
    from tests.conftest import SUBTYPE_CV, write_subtype_cv

    bundle = tmp_path / "c" / "bh"
    shutil.copytree(tiny_bundle, bundle)
    images = [make_class_image(label, np.random.default_rng(label), 48) for label in (0, 1)]
    client = TestClient(create_app(bundle.parent, api_key=""))
    assert client.post("/predict", files={"file": ("x.png", png(images[0]), "image/png")}).json()["caution"] is None
    # papillary 0 of 2 and mucinous 1 of 2 right (called benign); fibroadenoma 0 of 2 (called malignant)
    write_subtype_cv(bundle, [*SUBTYPE_CV, ("fibroadenoma", "benign", 0.9), ("fibroadenoma", "benign", 0.8)])
    client = TestClient(create_app(bundle.parent, api_key=""))
    expected = {
        "benign": {"text": "Read a benign call with care: in cross-validation this model called 2 of 2 papillary "
                           "carcinoma and 1 of 2 mucinous carcinoma images benign (the model card's table by tumour "
                           "subtype).",
                   "missed_in_cv": [
                       {"subgroup": "papillary_carcinoma", "class": "malignant", "images": 2, "images_wrong": 2},
                       {"subgroup": "mucinous_carcinoma", "class": "malignant", "images": 2, "images_wrong": 1}],
                   "left_below_operating_point": None},
        "malignant": {"text": "Read a malignant call with care: in cross-validation this model called 2 of 2 "
                              "fibroadenoma images malignant (the model card's table by tumour subtype).",
                      "missed_in_cv": [{"subgroup": "fibroadenoma", "class": "benign", "images": 2,
                                        "images_wrong": 2}],
                      "left_below_operating_point": None}}
    for img in images:
        body = client.post("/predict", files={"file": ("x.png", png(img), "image/png")}).json()
        assert body["predicted"] in expected, body
        assert body["caution"] == expected[body["predicted"]]


def test_segment_outlines_the_lesion_unless_the_modality_classifier_rejects_the_scan(tiny_segmenter, tiny_bundle,
                                                                                     tmp_path):
    """POST /segment: the mask load_segmenter predicts, with its outline, size in mm and caveat; no mask when an
    ultrasound classifier is installed and its detector rejects the image; 4xx for a bad name or pixel size."""
    import shutil

    from fastapi.testclient import TestClient

    from core.checkpoints import load_segmenter
    from core.serve import create_app
    from tests.conftest import install_copies

    root = tmp_path / "ck"
    root.mkdir()
    empty = TestClient(create_app(root, api_key=""), raise_server_exceptions=False)
    scan_arr = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    scan = png(scan_arr)
    r = empty.post("/segment", files={"file": ("s.png", scan, "image/png")})
    assert r.status_code == 404 and "--task segmentation" in r.json()["detail"]

    shutil.copytree(tiny_segmenter, root / "seg")
    c = TestClient(create_app(root, api_key=""), raise_server_exceptions=False)
    assert [s["name"] for s in c.get("/segmenters").json()] == ["seg"]
    body = c.post("/segment", files={"file": ("s.png", scan, "image/png")}, data={"mm_per_pixel": "0.1"}).json()
    expected = load_segmenter(root / "seg").predict_mask(scan_arr)
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"])))) == 255
    assert mask.shape == (60, 80) and body["mask_shape"] == [60, 80] and np.array_equal(mask, expected)
    assert body["checked_by"] is None and body["note"] is None and body["caveat"].startswith("A model's prediction")
    assert (body["lesion"] is None) == (not expected.any())
    if expected.any():
        assert body["lesion"]["width_mm"] == pytest.approx(body["lesion"]["width_px"] * 0.1)
        assert all(expected[y, x] for x, y in body["outline"])
    assert c.post("/segment", files={"file": ("s.png", scan, "image/png")},
                  data={"segmenter": "nope"}).status_code == 404
    assert c.post("/segment", files={"file": ("s.png", scan, "image/png")},
                  data={"mm_per_pixel": "-1"}).status_code == 422

    install_copies(tiny_bundle, root, ("us",), kinds={"us": "busi"})  # an ultrasound classifier that rejects noise
    body = c.post("/segment", files={"file": ("s.png", scan, "image/png")}).json()
    assert body["checked_by"] == "us" and body["out_of_distribution"]["out_of_distribution"]
    assert body["mask_png"] is None and "does not resemble us's training data" in body["note"]
    shutil.rmtree(root / "us")
    install_copies(tiny_bundle, root, ("us_lenient",), accept_all=("us_lenient",), kinds={"us_lenient": "busi"})
    body = c.post("/segment", files={"file": ("s.png", scan, "image/png")}).json()
    assert body["checked_by"] == "us_lenient" and body["mask_png"] is not None
    assert body["classifier_prediction"] in ("benign", "malignant") and body["note"] is None
