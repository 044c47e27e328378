"""Case report: the PDF holds what a clinician needs (and nothing identifying unless asked), every page renders."""
from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pytest

from core.checkpoints import load_classifier
from core.report import DISCLAIMER, ReportOptions, build_case, latin1, make_report, pdf_pages_png
from tests.conftest import make_class_image


def pdf_text(pdf: bytes) -> str:
    from pypdf import PdfReader

    return "\n".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf)).pages)


@pytest.fixture(scope="module")
def report(tiny_bundle):
    clf = load_classifier(tiny_bundle)
    rng = np.random.default_rng(0)
    cases = [build_case(clf, make_class_image(k, rng, 48), ["gradcam", "lime"],
                        {"lime": {"num_samples": 40, "n_segments": 8}}, name=f"patient_{k}.png") for k in (0, 1)]
    expl = {"methods": {"gradcam": {"deletion_auc": {"mean": 0.3}, "insertion_auc": {"mean": 0.7}}},
            "sanity": {"pass_rule": "passes when ...", "n_images": 2,
                       "methods": {"gradcam": {"passed": True, "note": "fully randomised: Spearman 0.10"}}}}
    pdf = make_report(clf, cases, ReportOptions(), expl, app_commit="abc123")
    return clf, cases, pdf


def test_report_text_holds_hashes_prediction_settings_and_disclaimer(report):
    clf, cases, pdf = report
    text = " ".join(pdf_text(pdf).split())
    assert clf.metadata["model_sha256"][:16] in text and cases[0].sha256[:16] in text
    pred = clf.class_names[int(np.argmax(cases[0].probabilities))]
    assert f"Prediction: {pred}" in text or "Out of distribution: no verdict" in text
    assert " ".join(latin1(DISCLAIMER).split()) in text
    assert "random_seed=0" in text and "gradcam: explains" in text and "lime: explains" in text
    assert "pass" in text and "app at commit abc123" in text
    lime = next(e for e in cases[0].explanations if e.method == "lime")  # how far LIME moved p, with its settings
    lo, hi = lime.perturbed_range
    assert f"P({lime.class_name}) over its perturbed images {lo:.1%}-{hi:.1%}" in text
    weak = any(e.weak_effect for c in cases for e in c.explanations)
    assert ("weak effect (under 1 point)" in text) == weak == ("Weak effect: hiding parts of the image" in text)
    assert "patient_0.png" not in text  # no file name without the user's consent


def test_a_map_with_a_weak_effect_is_labelled_and_explained(report):
    from dataclasses import replace

    clf, cases, _ = report
    lime = next(e for e in cases[0].explanations if e.method == "lime")
    weak = replace(lime, extras={**lime.extras, "perturbed_probability": [0.601, 0.6042]})
    text = " ".join(pdf_text(make_report(clf, [replace(cases[0], explanations=[weak])])).split())
    assert "weak effect (under 1 point)" in text and "Weak effect: hiding parts of the image moved" in text
    assert f"P({lime.class_name}) over its perturbed images 60.1%-60.4%" in text


def test_file_name_and_note_only_on_request(report):
    clf, cases, _ = report
    text = pdf_text(make_report(clf, cases[:1], ReportOptions(include_names=True, note="teaching set 3")))
    assert "patient_0.png" in text and "teaching set 3" in text


def test_every_page_renders(report, tmp_path):
    _, cases, pdf = report
    pngs = pdf_pages_png(pdf, dpi=40)
    assert len(pngs) == len(cases) + 1 and all(p.startswith(b"\x89PNG") for p in pngs)
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (poppler-utils) is not installed")
    (tmp_path / "r.pdf").write_bytes(pdf)
    subprocess.run(["pdftoppm", "-png", "-r", "40", str(tmp_path / "r.pdf"), str(tmp_path / "p")], check=True)
    assert len(list(tmp_path.glob("p*.png"))) == len(cases) + 1


def test_cli_makes_a_handout_for_several_images(tiny_bundle, tmp_path, capsys):
    from PIL import Image

    from core.report import main

    paths = []
    for k in (0, 1):
        p = tmp_path / f"img{k}.png"
        Image.fromarray(make_class_image(k, np.random.default_rng(k), 48)).save(p)
        paths.append(str(p))
    out = tmp_path / "handout.pdf"
    assert main([str(tiny_bundle), *paths, "--methods", "gradcam,occlusion", "--out", str(out),
                 "--png-dir", str(tmp_path / "png")]) == 0
    assert "Case 2 of 2" in pdf_text(out.read_bytes()) and len(list((tmp_path / "png").glob("*.png"))) == 3
    assert main([str(tiny_bundle), *paths, "--methods", "nonsense"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_report_says_how_often_the_segmenter_misses_a_lesion(tiny_bundle, tiny_segmenter, tmp_path):
    from core.checkpoints import load_segmenter

    seg_dir = tmp_path / "seg"
    shutil.copytree(tiny_segmenter, seg_dir)
    (seg_dir / "predictions.csv").write_text("split,fold,path,class,group,dice,iou,true_area,pred_area\n"
                                             "test,,a.png,benign,a.png,0.02,0.01,0.1,0.05\n"
                                             "test,,b.png,benign,b.png,0.80,0.70,0.1,0.1\n")
    clf = load_classifier(tiny_bundle)
    clf.ood = None  # no out-of-distribution verdict: the segmenter always runs
    case = build_case(clf, make_class_image(1, np.random.default_rng(3), 48), ["gradcam"],
                      segmenter=load_segmenter(seg_dir))
    assert case.lesion_text is not None
    assert case.lesion_caveat == ("The segmenter missed 1 of 2 test lesions almost entirely (Dice < 0.1), 1 of them by "
                                  "outlining something else.")
    text = " ".join(pdf_text(make_report(clf, [case], ReportOptions(), None, app_commit="abc123")).split())
    assert "The segmenter missed 1 of 2 test lesions almost entirely" in text


def test_model_summary_names_the_subtypes_cross_validation_gets_wrong_most(tmp_path):
    """From the bundle's out-of-fold predictions and split.csv: subtypes under 80% right, weakest first."""
    import json

    from core.report import model_summary
    from tests.conftest import write_subtype_cv

    meta = {"class_names": ["benign", "malignant"],
            "cross_validation": {"pooled_roc_auc": 0.9, "pooled_accuracy": 0.8, "folds": [{}, {}]}}
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    write_subtype_cv(tmp_path)
    lines = model_summary(meta, tmp_path)
    assert lines[1] == ("Tumour subtypes with under 80% of their images right in cross-validation: "
                        "papillary carcinoma (0 of 2), mucinous carcinoma (1 of 2).")
    assert len(model_summary(meta)) == 1  # no bundle: no subtype line
    (tmp_path / "cv_predictions.csv").unlink()
    assert len(model_summary(meta, tmp_path)) == 1


def test_report_says_what_an_outline_meant_on_a_scan_called_normal(tiny_bundle, tiny_segmenter, tmp_path):
    """A scan the classifier calls normal with a predicted outline: the caveat gives the two bundles' validation
    counts before the segmenter's misses; called anything else, only the misses."""
    import json

    from core.checkpoints import load_segmenter

    img = make_class_image(1, np.random.default_rng(3), 48)
    clf_dir, seg_dir = tmp_path / "clf", tmp_path / "seg"
    shutil.copytree(tiny_bundle, clf_dir)
    shutil.copytree(tiny_segmenter, seg_dir)
    k = int(load_classifier(clf_dir).predict_proba(img)[0].argmax())
    (clf_dir / "predictions.csv").write_text("split,path,true,predicted\nval,a.png,normal,normal\n"
                                             "val,b.png,malignant,normal\n")
    (seg_dir / "predictions.csv").write_text("split,fold,path,class,group,dice,iou,true_area,pred_area\n"
                                             "val,,a.png,normal,a.png,,,0.0,0.03\nval,,b.png,malignant,b.png,0.6,0.4,0.1,0.1\n"
                                             "test,,c.png,benign,c.png,0.02,0.01,0.1,0.05\n")
    meta = json.loads((clf_dir / "metadata.json").read_text())
    missed = "The segmenter missed 1 of 1 test lesions almost entirely (Dice < 0.1), 1 of them by outlining something else."
    for normal in (k, 1 - k):
        names = ["benign", "malignant"]
        names[normal] = "normal"
        (clf_dir / "metadata.json").write_text(json.dumps({**meta, "class_names": names}))
        clf = load_classifier(clf_dir)
        clf.ood = None  # no out-of-distribution verdict: the segmenter always runs
        seg = load_segmenter(seg_dir)
        seg.threshold = 0.0  # an outline whatever the tiny segmenter learned
        case = build_case(clf, img, ["gradcam"], segmenter=seg)
        if normal == k:
            assert case.lesion_caveat == (
                "The classifier calls this scan normal, yet the segmenter outlines a region. On both checkpoints' "
                "validation images, 2 scans the classifier called normal got an outline: it marked a real lesion in 1 "
                "(1 malignant), and in 1 it marked no lesion (1 of these scans had none). Look at the region before "
                "trusting either. " + missed)
            text = " ".join(pdf_text(make_report(clf, [case], ReportOptions(), None, app_commit="abc")).split())
            assert "The classifier calls this scan normal, yet the segmenter outlines a region." in text
        else:
            assert case.lesion_caveat == missed
