"""Command line and the explanation-quality evaluation on a tiny trained bundle with masks."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.explain.__main__ import main as cli_main, parse_params


def test_parse_params():
    assert parse_params(["n_segments=80", "hide_color=blur", "positive_only=True", "kernel_width=0.3"]) == {
        "n_segments": 80, "hide_color": "blur", "positive_only": True, "kernel_width": 0.3}
    # shell-style booleans: 'false' was the text 'false', which Python reads as true
    assert parse_params(["positive_only=false", "relu=Yes", "batch_size=none"]) == {
        "positive_only": False, "relu": True, "batch_size": None}
    with pytest.raises(ValueError):
        parse_params(["oops"])


def test_cli_writes_overlay(tiny_bundle, tiny_tree, tmp_path, capsys):
    img = next((tiny_tree / "malignant").glob("*.png"))
    out = tmp_path / "o.png"
    rc = cli_main([str(img), "--checkpoint", str(tiny_bundle), "--method", "lime", "--param", "num_samples=40",
                   "--param", "n_segments=8", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "prediction:" in text and "overlay written" in text
    arr = np.asarray(Image.open(out))
    assert arr.shape == (48, 48, 3)


def test_cli_errors_are_messages(tiny_bundle, tmp_path, capsys):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    assert cli_main([str(bad), "--checkpoint", str(tiny_bundle)]) == 2
    assert "not an image format" in capsys.readouterr().err
    good = tmp_path / "g.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(good)
    assert cli_main([str(good), "--checkpoint", str(tiny_bundle), "--param", "bogus=1"]) == 2
    assert "parameters" in capsys.readouterr().err


def test_evaluate_writes_explanations_json(tmp_path):
    import train
    from core.explain.evaluate import evaluate, write_result
    from tests.conftest import write_class_tree

    data = write_class_tree(tmp_path / "d", n_per_class=14, masks=True)
    assert train.main(["--dataset", "folder", "--data-dir", str(data), "--backbone", "simple_cnn",
                       "--input-size", "32", "--head-epochs", "1", "--fine-tune-epochs", "0", "--head-units", "8",
                       "--out-dir", str(tmp_path / "c"), "--name", "m", "--quiet"]) == 0
    bundle = tmp_path / "c" / "m"
    res = evaluate(bundle, methods=["gradcam", "occlusion", "lime"], limit=4, steps=4, stability_images=1,
                   stability_seeds=2, log=lambda *_: None)
    write_result(bundle, res)
    saved = json.loads((bundle / "explanations.json").read_text())
    assert saved["images"]["n"] == 4
    for m in ("gradcam", "occlusion", "lime"):
        r = saved["methods"][m]
        for k in ("deletion_auc", "insertion_auc", "pointing_game", "energy_in_mask", "mask_iou_top15", "seconds"):
            lo, hi = r[k]["ci95"]
            assert lo <= r[k]["mean"] <= hi
    assert len(saved["agreement"]) == 3 and "lime" in saved["seed_stability"]
    for m in ("occlusion", "lime"):  # perturbation methods: the share of maps with a weak effect
        assert 0.0 <= saved["methods"][m]["weak_effect"]["mean"] <= 1.0 and saved["methods"][m]["weak_effect"]["n"] == 4
    assert "weak_effect" not in saved["methods"]["gradcam"]
    m = saved["machine"]  # where the seconds were timed
    assert m["cores"] >= 1 and m["platform"] and set(m["cpu_features"]) <= {"avx2", "avx512f", "avx512_vnni",
                                                                           "avx512_bf16", "amx_bf16"}
    assert m["forward"] and m["perturbation_forward"] in ("float32", "openvino-bf16")


def test_evaluate_without_masks_reports_faithfulness_agreement_and_stability(tiny_idc_bundle):
    """Histopathology sets have no lesion masks: deletion/insertion, agreement and seed stability only."""
    from core.explain.evaluate import evaluate

    res = evaluate(tiny_idc_bundle, methods=["gradcam", "lime"], limit=4, steps=4, stability_images=1,
                   stability_seeds=2, log=lambda *_: None)
    assert res["images"]["with_masks"] is False and res["images"]["n"] == 4
    assert set(res["images"]["classes"]) == {"non_idc", "idc"}
    for m in ("gradcam", "lime"):
        assert set(res["methods"][m]) == {"deletion_auc", "insertion_auc", "seconds"} | (
            {"weak_effect"} if m == "lime" else set())
        assert 0.0 <= res["methods"][m]["deletion_auc"]["mean"] <= 1.0
    assert len(res["agreement"]) == 1 and res["seed_stability"]["lime"]["n"] == 1


def test_sanity_only_adds_the_checks_to_explanations_json(tiny_idc_bundle, tmp_path, capsys):
    import json
    import shutil

    from core.explain.evaluate import main

    bundle = tmp_path / "idc_tiny"
    shutil.copytree(tiny_idc_bundle, bundle)
    assert main([str(bundle), "--sanity-only", "--sanity-images", "0"]) == 0  # nothing to add: a file with no scores
    assert json.loads((bundle / "explanations.json").read_text()) == {"checkpoint": "idc_tiny", "methods": {}}
    assert main([str(bundle), "--sanity-only", "--sanity-images", "2", "--methods", "gradcam", "occlusion"]) == 0
    saved = json.loads((bundle / "explanations.json").read_text())
    s = saved["sanity"]
    assert saved["checkpoint"] == "idc_tiny" and s["n_images"] == 2 and len(s["images"]) == 2
    assert set(s["methods"]) == {"gradcam", "occlusion"} and s["blocks"][0]["name"] == "head"
    out = capsys.readouterr().out
    assert "sanity gradcam" in out and s["methods"]["gradcam"]["passed"] in (True, False, None)


def test_rescoring_without_sanity_images_keeps_the_checks_of_the_same_model_only(tiny_idc_bundle, tmp_path):
    import json
    import shutil

    from core.explain.evaluate import main

    bundle = tmp_path / "idc_tiny"
    shutil.copytree(tiny_idc_bundle, bundle)
    sha = json.loads((bundle / "metadata.json").read_text())["model_sha256"]
    checks = {"model_sha256": sha, "methods": {"gradcam": {"passed": True, "note": "recorded earlier"}}}
    (bundle / "explanations.json").write_text(json.dumps({"checkpoint": "idc_tiny", "methods": {}, "sanity": checks}))
    args = [str(bundle), "--methods", "gradcam", "--limit", "2", "--steps", "3", "--sanity-images", "0"]
    assert main(args) == 0
    saved = json.loads((bundle / "explanations.json").read_text())
    assert saved["sanity"] == checks and saved["methods"]["gradcam"]["deletion_auc"]["n"] == 2
    saved["sanity"]["model_sha256"] = "0" * 64  # checks of another model file are not carried over
    (bundle / "explanations.json").write_text(json.dumps(saved))
    assert main(args) == 0
    assert "sanity" not in json.loads((bundle / "explanations.json").read_text())


def test_evaluate_on_local_ray_equals_the_serial_run(tiny_idc_bundle, ray_local):
    from core.explain.evaluate import evaluate

    kw = dict(methods=["gradcam", "occlusion"], limit=4, steps=4, stability_images=0, log=lambda *_: None)
    serial = evaluate(tiny_idc_bundle, **kw)
    on_ray = evaluate(tiny_idc_bundle, address="local", workers=2, **kw)
    for m in ("gradcam", "occlusion"):
        for k in ("deletion_auc", "insertion_auc"):
            assert on_ray["methods"][m][k]["mean"] == pytest.approx(serial["methods"][m][k]["mean"], abs=1e-6)
    assert on_ray["agreement"][0]["spearman"]["mean"] == pytest.approx(serial["agreement"][0]["spearman"]["mean"])
