"""Every page runs headless (AppTest) against a tiny trained bundle; main flows and error paths asserted."""
from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT

HOME = str(ROOT / "dashboard" / "Home.py")
PAGES = ["pages/1_Explain.py", "pages/2_LIME_Lab.py", "pages/3_Compare.py", "pages/4_Evaluation.py",
         "pages/5_Annotate.py", "pages/6_Teach.py"]
TIMEOUT = 180


@pytest.fixture
def app_env(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("BREASTXAI_CHECKPOINTS", str(tiny_bundle.parent))
    empty = tmp_path / "nodata"
    empty.mkdir()
    monkeypatch.setenv("BREASTXAI_DATA", str(empty))
    import streamlit as st
    st.cache_data.clear()
    st.cache_resource.clear()
    return tiny_bundle


def serve_from(monkeypatch, checkpoints, data=None) -> None:
    """Point the app at a checkpoints folder (and a data folder) with fresh caches."""
    monkeypatch.setenv("BREASTXAI_CHECKPOINTS", str(checkpoints))
    if data is not None:
        monkeypatch.setenv("BREASTXAI_DATA", str(data))
    import streamlit as st
    st.cache_data.clear()
    st.cache_resource.clear()


def upload_on_explain(arr: np.ndarray, name: str = "case.png"):
    """The Explain page with `arr` uploaded (rendered, no exception)."""
    at = app("pages/1_Explain.py")
    at.radio(key="ex_src").set_value("Upload").run()
    at.file_uploader(key="ex_upload").upload(name, png(arr), "image/png")
    at.run()
    no_exception(at)
    return at


def app(page: str | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.run()
    if page:
        at.switch_page(page)
        at.run()
    return at


def no_exception(at):
    assert not at.exception, [e.value for e in at.exception]


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_home_model_card(app_env):
    at = app()
    no_exception(at)
    assert at.title[0].value == "BreastXAI"
    assert any("not a diagnostic device" in w.value for w in at.warning)
    assert any("Model card" in h.value for h in at.header)
    assert [m.label for m in at.metric][:2] == ["Test accuracy", "Macro ROC AUC"]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders(app_env, page):
    at = app(page)
    no_exception(at)
    assert at.title


def test_upload_prediction_explanation(app_env):
    from tests.conftest import make_class_image

    at = app("pages/1_Explain.py")
    img = make_class_image(1, np.random.default_rng(0), 48)  # like the training images: in distribution
    at.radio(key="ex_src").set_value("Upload").run()
    at.file_uploader(key="ex_upload").upload("case.png", png(img), "image/png")
    at.run()
    no_exception(at)
    assert any(s.value.startswith("Prediction:") for s in at.subheader)
    at.multiselect(key="ex_methods").set_value(["gradcam", "occlusion"])
    at.button(key="FormSubmitter:ex_form-Explain").click()
    at.run()
    no_exception(at)
    heads = [s.value for s in at.subheader]
    assert any(h.startswith("Grad-CAM") for h in heads) and any(h.startswith("Occlusion") for h in heads)
    assert len(at.get("image")) >= 4  # the image, the legend and two overlays
    # occlusion (not Grad-CAM) says how far its perturbations moved the prediction; a warning under one point
    notes = [(kind, x.value) for kind, xs in (("caption", at.caption), ("warning", at.warning)) for x in xs
             if "perturbed, P(" in x.value]
    assert len(notes) == 1 and notes[0][1].startswith("Over the images Occlusion perturbed"), notes
    lo, hi = (float(v) for v in re.findall(r"([0-9.]+)%", notes[0][1])[:2])
    assert lo <= hi and notes[0][0] == ("warning" if hi - lo < 1.0 else "caption")
    # cached: the same request again is served from the result cache
    at.run()
    assert any(h.startswith("Grad-CAM") for h in [s.value for s in at.subheader])


def test_bad_upload_is_a_message_not_a_traceback(app_env):
    at = app("pages/1_Explain.py")
    at.file_uploader(key="ex_upload").upload("notes.png", b"this is not an image", "image/png")
    at.run()
    no_exception(at)
    assert any("cannot be used" in e.value for e in at.error)


def test_example_from_test_split_and_lime(app_env):
    at = app("pages/1_Explain.py")
    at.radio(key="ex_src").set_value("Example").run()
    no_exception(at)
    assert any(s.value.startswith("Prediction:") for s in at.subheader)
    at.multiselect(key="ex_methods").set_value(["lime"])
    at.number_input(key="ex_lime_num_samples").set_value(50)
    at.button(key="FormSubmitter:ex_form-Explain").click()
    at.run()
    no_exception(at)
    assert any(s.value.startswith("LIME") for s in at.subheader)


def test_no_checkpoint_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("BREASTXAI_CHECKPOINTS", str(tmp_path))
    at = app()
    no_exception(at)
    assert any("No usable checkpoint" in e.value for e in at.sidebar.error)


def test_broken_checkpoint_listed_as_unavailable(tiny_bundle, tmp_path, monkeypatch):
    shutil.copytree(tiny_bundle, tmp_path / "good")
    shutil.copytree(tiny_bundle, tmp_path / "broken")
    f = tmp_path / "broken" / "model.keras"
    f.write_bytes(f.read_bytes()[:100])
    monkeypatch.setenv("BREASTXAI_CHECKPOINTS", str(tmp_path))
    import streamlit as st
    st.cache_data.clear()
    at = app()
    no_exception(at)
    assert any("broken" in w.value and "unavailable" in w.value for w in at.sidebar.warning)
    assert at.sidebar.selectbox(key="sb_checkpoint").options == ["good"]


def test_evaluation_cell_lists_images(app_env):
    at = app("pages/4_Evaluation.py")
    no_exception(at)
    cell = at.selectbox(key="ev_cell")
    cell.set_value(cell.options[0]).run()
    no_exception(at)
    assert any("image(s) with true class" in m.value for m in at.markdown)


def test_teach_reveal_updates_score(app_env):
    at = app("pages/6_Teach.py")
    no_exception(at)
    radio = next(r for r in at.radio if r.key.startswith("teach_guess"))
    radio.set_value(radio.options[0]).run()
    at.button(key="teach_reveal").click().run()
    no_exception(at)
    assert any("Truth:" in m.value for m in list(at.success) + list(at.error))
    assert at.metric[0].value.endswith("/ 1")


def test_teach_reveals_the_breakhis_subtype_with_the_class(tiny_bundle, tmp_path, monkeypatch):
    """BreakHis cases: the reveal and the summary name the tumour subtype (hidden while the class answers)."""
    from tests.data.test_loaders import _write_breakhis_tree

    slides = [(True, "F", "fibroadenoma", "23060AB", 200), (False, "MC", "mucinous_carcinoma", "18842", 200)]
    data = _write_breakhis_tree(tmp_path / "data", slides, n=2, size=(48, 48))
    serve_from(monkeypatch, tiny_bundle.parent, data)
    at = app("pages/6_Teach.py")
    no_exception(at)
    picked = [o for o in at.multiselect(key="teach_opt_picked").options if o.startswith("BREAKHIS")]
    assert len(picked) == 4  # the checkpoint's own test-split cases come first; the quiz takes the BreakHis ones
    at.radio(key="teach_opt_which").set_value("hand-picked")
    at.multiselect(key="teach_opt_picked").set_value(picked[-1:])
    at.button(key="FormSubmitter:teach_setup-Start session").click().run()
    case = at.session_state["teach"]["cases"]
    assert len(case) == 1 and "SOB_" in case[0]
    truth = ("benign (fibroadenoma, 200X)" if "fibroadenoma" in case[0] else "malignant (mucinous carcinoma, 200X)")
    assert not [m.value for m in at.markdown if "carcinoma" in m.value or "fibroadenoma" in m.value]
    radio = next(r for r in at.radio if r.key.startswith("teach_guess"))
    radio.set_value(radio.options[0]).run()
    at.button(key="teach_reveal").click().run()
    no_exception(at)
    said = [m.value for m in list(at.success) + list(at.error)]
    assert any(f"Truth: **{truth}**" in m for m in said), (said, case)
    at.button(key="teach_next").click().run()
    no_exception(at)
    assert list(next(d.value for d in at.dataframe if "truth" in d.value.columns)["truth"]) == [truth]


def test_explain_says_which_subtypes_cross_validation_most_often_called_the_predicted_class(tiny_bundle, tmp_path,
                                                                                           monkeypatch):
    """A benign call names the malignant subtypes the out-of-fold predictions most often called benign, a malignant
    call the benign ones; below an operating point for the other class, how many of their images it left below."""
    from core.checkpoints import load_classifier, update_metadata
    from tests.conftest import SUBTYPE_CV, make_class_image, write_subtype_cv

    bundle = tmp_path / "c" / "bh"
    shutil.copytree(tiny_bundle, bundle)
    # fibroadenoma 0 of 2 right (called malignant); papillary 0 of 2 and mucinous 1 of 2 (called benign)
    images = [*SUBTYPE_CV, ("fibroadenoma", "benign", 0.9), ("fibroadenoma", "benign", 0.8)]
    write_subtype_cv(bundle, images)
    write_subtype_cv(bundle, images, "calibration_predictions.csv")
    op = json.loads((ROOT / "checkpoints/breakhis_densenet121/metadata.json").read_text())["operating_point"]
    chosen_on = "out-of-fold predictions of the training and validation patients"
    expected = {
        "benign": ("Read a benign call with care: in cross-validation this model called 2 of 2 papillary carcinoma "
                   "and 1 of 2 mucinous carcinoma images benign (the model card's table by tumour subtype). The "
                   "operating point, which this image does not cross, still left 2 of 2 papillary carcinoma and 1 of "
                   f"2 mucinous carcinoma images below it in the {chosen_on}."),
        "malignant": ("Read a malignant call with care: in cross-validation this model called 2 of 2 fibroadenoma "
                      "images malignant (the model card's table by tumour subtype). The operating point, which this "
                      f"image does not cross, still left 2 of 2 fibroadenoma images below it in the {chosen_on}.")}
    for label in (0, 1):
        img = make_class_image(label, np.random.default_rng(label), 48)
        pred = ("benign", "malignant")[int(load_classifier(bundle).predict_proba(img)[0].argmax())]
        other = "malignant" if pred == "benign" else "benign"
        # an operating point on the other class at 0.85: this image (P(other) < 0.5) does not cross it; of the
        # out-of-fold images it calls the other class only those at P >= 0.85 (mucinous 0.9: 1 of 2 left below)
        update_metadata(bundle, {"operating_point": {**op, "positive_class": other, "threshold": 0.85,
                                                     "chosen_on": chosen_on}})
        serve_from(monkeypatch, tmp_path / "c", tmp_path / "nodata")
        at = upload_on_explain(img)
        assert [c.value for c in at.caption if c.value.startswith("Read a")] == [expected[pred]]



def test_lime_lab_estimate_and_stability(app_env):
    at = app("pages/2_LIME_Lab.py")
    at.radio(key="ll_src").set_value("Example").run()
    no_exception(at)
    assert any(m.label == "Estimated run time" for m in at.metric)
    at.slider(key="ll_samples").set_value(50).run()
    at.button(key="ll_run").click().run()
    no_exception(at)
    assert [x.value for x in [*at.caption, *at.warning] if x.value.startswith("Over the images LIME perturbed, P(")]
    at.button(key="ll_stab").click().run()
    no_exception(at)
    assert any(m.label == "Stability score" for m in at.metric)


def test_feedback_saved_from_explain(app_env, tmp_path, monkeypatch):
    db = tmp_path / "fb.sqlite3"
    monkeypatch.setenv("BREASTXAI_FEEDBACK_DB", str(db))
    at = app("pages/1_Explain.py")
    at.radio(key="ex_src").set_value("Example").run()
    assert any(x.value.startswith("The image resembles") or "does not look like" in x.value
               for x in list(at.success) + list(at.warning))
    at.radio(key="fb_verdict").set_value("disagree")
    at.selectbox(key="fb_class").set_value("malignant")
    at.text_area(key="fb_comment").input("margin looks irregular")
    at.button(key="FormSubmitter:ex_feedback-Save feedback").click().run()
    no_exception(at)
    from core.feedback import FeedbackStore
    rows = FeedbackStore(db).rows()
    assert len(rows) == 1 and rows[0]["verdict"] == "disagree" and rows[0]["correct_class"] == "malignant"
    assert rows[0]["image_png"] is None  # no consent, no image
    assert rows[0]["image_name"] is None  # nor its file name
    saved = next(x.value for x in at.success if x.value.startswith("Saved as feedback record"))
    assert str(db) not in saved and "/" not in saved  # no server path in the message
    # The user sees their own feedback and can delete it.
    assert any(e.label.startswith("Your feedback in this session (1)") for e in at.expander)
    at.button(key=f"fb_delete_{rows[0]['id']}").click().run()
    no_exception(at)
    assert FeedbackStore(db).rows() == []


def test_annotate_scores_methods_against_the_lesion_mask(tiny_tree, tmp_path, monkeypatch):
    """Annotate with a masked example: use the dataset mask, score methods, erase the region and re-predict."""
    import train
    from tests.conftest import write_class_tree

    data = write_class_tree(tmp_path / "d", n_per_class=14, masks=True)
    assert train.main(["--dataset", "folder", "--data-dir", str(data), "--backbone", "simple_cnn",
                       "--input-size", "32", "--head-epochs", "1", "--fine-tune-epochs", "0", "--head-units", "8",
                       "--out-dir", str(tmp_path / "c"), "--name", "m", "--quiet"]) == 0
    monkeypatch.setenv("BREASTXAI_CHECKPOINTS", str(tmp_path / "c"))
    monkeypatch.setenv("BREASTXAI_DATA", str(tmp_path / "nodata"))
    import streamlit as st
    st.cache_data.clear()
    st.cache_resource.clear()
    at = app("pages/5_Annotate.py")
    at.radio(key="an_src").set_value("Example").run()
    no_exception(at)
    assert at.checkbox(key="an_use_mask").value is True  # nothing drawn: the lesion mask is used
    at.multiselect(key="an_methods").set_value(["gradcam", "occlusion"])
    at.button(key="an_score").click().run()
    no_exception(at)
    assert len(at.dataframe) == 1
    assert [m.label for m in at.metric] == ["benign", "malignant"]  # re-prediction with the region erased


def test_patch_checkpoint_explains_the_whole_image(tiny_patch_bundle, tmp_path, monkeypatch):
    """A patch model: model card says so, and Grad-CAM + LIME overlays are drawn over the whole upload."""
    monkeypatch.setenv("BREASTXAI_CHECKPOINTS", str(tiny_patch_bundle.parent))
    monkeypatch.setenv("BREASTXAI_DATA", str(tmp_path))
    import streamlit as st
    st.cache_data.clear()
    st.cache_resource.clear()
    at = app()
    no_exception(at)
    assert any(h.value == "Patch model" for h in at.subheader)
    at.switch_page("pages/1_Explain.py")
    at.run()
    img = np.random.default_rng(3).integers(0, 255, (130, 170, 3), dtype=np.uint8)
    at.file_uploader(key="ex_upload").upload("slide.png", png(img), "image/png")
    at.run()
    no_exception(at)
    at.multiselect(key="ex_methods").set_value(["gradcam", "lime"])
    at.number_input(key="ex_lime_num_samples").set_value(50)
    at.button(key="FormSubmitter:ex_form-Explain").click()
    at.run()
    no_exception(at)
    heads = [s.value for s in at.subheader]
    assert any(h.startswith("Grad-CAM") for h in heads) and any(h.startswith("LIME") for h in heads)


def model_card_with(tiny_bundle, tmp_path, monkeypatch, **fields):
    """Run Home on a copy of the tiny bundle whose metadata.json has `fields` set."""
    import streamlit as st

    shutil.copytree(tiny_bundle, tmp_path / "c" / "tiny")
    meta_path = tmp_path / "c" / "tiny" / "metadata.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), **fields}))
    monkeypatch.setenv("BREASTXAI_CHECKPOINTS", str(tmp_path / "c"))
    monkeypatch.setenv("BREASTXAI_DATA", str(tmp_path / "nodata"))
    st.cache_data.clear()
    st.cache_resource.clear()
    at = app()
    no_exception(at)
    return at


def test_model_card_shows_how_the_checkpoint_was_chosen(tiny_bundle, tmp_path, monkeypatch):
    """The validation-only model selection recorded in metadata is on the model card, every candidate a row."""
    at = model_card_with(tiny_bundle, tmp_path, monkeypatch, model_selection={
        "rule": "highest validation accuracy", "chosen": "candB",
        "candidates": [{"candidate": "candA", "val_accuracy": 0.81234}, {"candidate": "candB", "val_accuracy": 0.9}],
        "note": "test split not used"})
    assert any(e.label.startswith("How this checkpoint was chosen (2 candidates") for e in at.expander)
    table = next(d.value for d in at.dataframe if "candidate" in d.value.columns)
    assert list(table["candidate"]) == ["candA", "candB"] and table["validation accuracy"].iloc[0] == 0.8123
    assert any("candB" in m.value for m in at.markdown)


def test_model_selection_rows_show_a_dash_where_a_candidate_recorded_no_value():
    """Every candidate row has every column; a metric one candidate lacks reads "—" (not "None"), settings last."""
    import sys

    sys.path.insert(0, str(ROOT / "dashboard"))
    from components import selection_rows

    rows = selection_rows({"candidates": [
        {"candidate": "224 px", "val_dice": 0.70537, "minutes": 39.1, "settings": "decoder 8 epochs", "command": "x"},
        {"candidate": "mean of two maps", "val_dice": 0.7003},
        {"name": "288 px", "val_dice": 0.68, "minutes": 30.0, "settings": "288 px"}]})
    assert [list(r) for r in rows] == [["candidate", "validation dice", "minutes", "settings"]] * 3
    assert [r["candidate"] for r in rows] == ["224 px", "mean of two maps", "288 px"]
    assert [r["validation dice"] for r in rows] == [0.7054, 0.7003, 0.68]  # complete column: numbers
    assert [r["minutes"] for r in rows] == ["39.1", "—", "30.0"]  # a gap: text, with a dash in it
    assert [r["settings"] for r in rows] == ["decoder 8 epochs", "—", "288 px"]


def test_model_card_shows_cross_validation_and_near_duplicate_audit(tiny_bundle, tmp_path, monkeypatch):
    """Recorded group-wise CV (pooled recall, changed settings, command) and the repeat-scan audit are shown."""
    cv = {"method": "StratifiedGroupKFold(n_splits=2)", "accuracy_mean": 0.75, "accuracy_min": 0.7,
          "accuracy_max": 0.8, "pooled_accuracy": 0.75, "pooled_roc_auc": 0.8,
          "folds": [{"fold": 1, "test_groups": [f"img{i}.png" for i in range(14)], "n_test": 14, "accuracy": 0.7},
                    {"fold": 2, "test_groups": ["b"], "n_test": 14, "accuracy": 0.8}],
          "pooled_recall": {"benign": 0.5, "malignant": 0.8571}, "pooled_support": {"benign": 14, "malignant": 14},
          "differs_from_checkpoint": {"precision": {"checkpoint": "float32", "cross_validation": "bfloat16"}},
          "command": "python train.py --cv-folds 2 --cv-only", "note": "carried over from the previous checkpoint"}
    audit = {"method": "difference hash", "split": "test", "n_split": 10, "n_excluded": 2,
             "metrics": {"n": 8, "accuracy": 0.875, "accuracy_ci95": [0.5, 1.0], "roc_auc_macro": 0.9,
                         "per_class": [{"class": "benign", "recall": 1.0, "tp": 4, "support": 4},
                                       {"class": "malignant", "recall": 0.75, "tp": 3, "support": 4}]}}
    at = model_card_with(tiny_bundle, tmp_path, monkeypatch, cross_validation=cv, near_duplicate_audit=audit)
    assert "Group-wise cross-validation" in [s.value for s in at.subheader]
    assert any("malignant **0.857** (of 14)" in m.value for m in at.markdown)
    captions = [c.value for c in at.caption]
    assert any("precision float32 → bfloat16" in c for c in captions)
    assert any("--cv-only" in c for c in captions)
    assert "carried over from the previous checkpoint" in captions
    assert "Test split without repeat scans" in [s.value for s in at.subheader]
    assert any("2 of 10 test images" in m.value and "malignant 0.750 (3/4)" in m.value for m in at.markdown)
    table = next(d.value for d in at.dataframe if "held-out groups" in d.value.columns)
    assert list(table["held-out groups"]) == ["img0.png, img1.png, img2.png … (14 groups)", "b"]


def test_model_card_says_when_no_test_image_has_a_repeat_scan(tiny_bundle, tmp_path, monkeypatch):
    """An audit that excluded nothing says the test metrics are free of repeat scans instead of repeating them."""
    audit = {"method": "difference hash", "split": "test", "n_split": 10, "n_excluded": 0,
             "metrics": {"n": 10, "accuracy": 0.8, "per_class": []}}
    dataset = {**json.loads((tiny_bundle / "metadata.json").read_text())["dataset"], "kind": "busi"}
    at = model_card_with(tiny_bundle, tmp_path, monkeypatch, near_duplicate_audit=audit, dataset=dataset)
    assert any("keeps repeat scans of a lesion together" in i.value and "optimistic" not in i.value for i in at.info)
    subheaders = [s.value for s in at.subheader]
    assert "Test split: repeat-scan check" in subheaders and "Test split without repeat scans" not in subheaders
    assert any("None of the 10 test images" in m.value for m in at.markdown)


def test_idc_tile_map_and_slide_mosaic(tiny_idc_bundle, monkeypatch):
    """A patch-set (IDC) checkpoint: a large field gets a per-tile map; test patients are offered as slide
    mosaics with the ground truth beside the model's map."""
    monkeypatch.setenv("BREASTXAI_CHECKPOINTS", str(tiny_idc_bundle.parent))
    monkeypatch.setenv("BREASTXAI_DATA", str(tiny_idc_bundle.parent))
    import streamlit as st
    st.cache_data.clear()
    st.cache_resource.clear()
    at = app("pages/1_Explain.py")
    field = np.full((250, 250, 3), 200, np.uint8)
    field[:, :125] = 40
    at.file_uploader(key="ex_upload").upload("field.png", png(field), "image/png")
    at.run()
    no_exception(at)
    assert any(s.value.startswith("Where in the tissue") for s in at.subheader)
    assert any(s.value.startswith("Slide mosaics") for s in at.subheader)
    patients = at.selectbox(key="ex_mosaic_patient").options
    assert patients and all("patches" in p for p in patients)
    assert any("classified as annotated" in c.value for c in at.caption)
    # 25 tiles: LIME would re-classify all of them per sample, so it is skipped with a message; Grad-CAM runs.
    at.multiselect(key="ex_methods").set_value(["gradcam", "lime"])
    at.button(key="FormSubmitter:ex_form-Explain").click()
    at.run()
    no_exception(at)
    assert any("LIME skipped" in w.value and "25 tiles" in w.value for w in at.warning)
    heads = [s.value for s in at.subheader]
    assert any(h.startswith("Grad-CAM") for h in heads) and not any(h.startswith("LIME") for h in heads)


def test_evaluation_per_patient_view(tmp_path, monkeypatch):
    """BreakHis-style data (several images per patient, one class each): Evaluation lists the test patients and
    breaks the split down by tumour subtype; the model card does so for the cross-validation."""
    import train
    from core.checkpoints import read_csv
    from tests.data.test_loaders import _write_breakhis_tree

    slides = [(True, "F", "fibroadenoma", s, 200) for s in ("23060AB", "23060CD", "29960AB")]
    slides += [(True, "TA", "tubular_adenoma", s, 200) for s in ("3411F", "21998AB")]
    slides += [(False, "DC", "ductal_carcinoma", s, 200) for s in ("2523", "4372", "9146")]
    slides += [(False, "MC", "mucinous_carcinoma", s, 200) for s in ("16196", "18842")]
    data = _write_breakhis_tree(tmp_path / "bh", slides, n=4, size=(32, 48))
    out = tmp_path / "ck"
    assert train.main(["--dataset", "breakhis", "--data-dir", str(data), "--backbone", "simple_cnn", "--input-size",
                       "16", "--head-epochs", "1", "--fine-tune-epochs", "0", "--head-units", "4", "--split", "0.5",
                       "0.25", "0.25", "--cv-folds", "2", "--name", "bh", "--out-dir", str(out), "--quiet"]) == 0
    monkeypatch.setenv("BREASTXAI_CHECKPOINTS", str(out))
    import streamlit as st
    st.cache_data.clear()
    st.cache_resource.clear()
    at = app("pages/4_Evaluation.py")
    no_exception(at)
    head = next(s.value for s in at.subheader if s.value.startswith("Per patient"))
    n_test = len({r.split(",")[4] for r in (out / "bh" / "split.csv").read_text().splitlines()[1:]
                  if r.startswith("test,")})
    assert head == f"Per patient ({n_test} test patients)" and n_test >= 2
    # By subtype, counted here from predictions.csv and split.csv
    subtype = {r["path"]: r["subtype"].replace("_", " ") for r in read_csv(out / "bh" / "split.csv")}
    expect: dict[str, list[int]] = {}
    for r in read_csv(out / "bh" / "predictions.csv"):
        if r["split"] == "test":
            expect.setdefault(subtype[r["path"]], [0, 0])[0] += 1
            expect[subtype[r["path"]]][1] += r["true"] == r["predicted"]
    assert "By tumour subtype (test split)" in [s.value for s in at.subheader]
    table = next(d.value for d in at.dataframe if "subtype" in d.value.columns and "images right" in d.value.columns)
    assert {r["subtype"]: [r["images"], r["images right"]] for _, r in table.iterrows()} == expect
    # The model card: every image of the 2-fold cross-validation, by subtype
    home = app("Home.py")
    no_exception(home)
    assert "By tumour subtype (cross-validation)" in [s.value for s in home.subheader]
    table = next(d.value for d in home.dataframe if "subtype" in d.value.columns and "images right" in d.value.columns)
    assert dict(zip(table["subtype"], table["images"])) == {"fibroadenoma": 12, "tubular adenoma": 8,
                                                            "ductal carcinoma": 12, "mucinous carcinoma": 8}


def test_evaluation_says_a_closed_form_head_has_no_training_curve(tiny_bundle, tmp_path, monkeypatch):
    """A logistic-regression head is fitted in one step: its one history row is said in words, not plotted."""
    meta = json.loads((tiny_bundle / "metadata.json").read_text())
    solver = "scikit-learn LogisticRegression (lbfgs)"
    phases = [{"phase": "head", "solver": solver, "C": 3e-4, "epochs": 1, "seconds": 0.13}]
    model_card_with(tiny_bundle, tmp_path, monkeypatch, training={**meta["training"], "phases": phases})
    (tmp_path / "c" / "tiny" / "history.csv").write_text(
        "epoch,phase,accuracy,loss,val_accuracy,val_loss\n1,head,0.97,0.336,0.6,0.721\n")
    at = app("pages/4_Evaluation.py")
    no_exception(at)
    said = [m.value for m in at.markdown if "closed-form" in m.value]
    assert said and solver in said[0] and "training loss 0.336, accuracy 0.970" in said[0]
    assert "validation loss 0.721, accuracy 0.600" in said[0]
    curves = lambda t: [c for c in t.get("plotly_chart") if '"text":"epoch"' in c.proto.spec]  # noqa: E731
    assert not curves(at)
    (tmp_path / "c" / "tiny" / "metadata.json").write_text(json.dumps(meta))  # trained by epochs: plotted
    (tmp_path / "c" / "tiny" / "history.csv").write_bytes((tiny_bundle / "history.csv").read_bytes())
    at = app("pages/4_Evaluation.py")
    assert len(curves(at)) == 1 and not [m for m in at.markdown if "closed-form" in m.value]


def test_model_card_shows_a_recorded_comparison(tiny_bundle, tiny_tree, tmp_path, monkeypatch):
    import train
    from core.evaluation import main as evaluation_main

    shutil.copytree(tiny_bundle, tmp_path / "ck" / "tiny")
    assert train.main(["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "simple_cnn",
                       "--input-size", "24", "--head-epochs", "1", "--fine-tune-epochs", "0", "--head-units", "4",
                       "--batch-size", "8", "--name", "baseline", "--out-dir", str(tmp_path / "b"), "--quiet"]) == 0
    assert evaluation_main([str(tmp_path / "ck" / "tiny"), "--compare", str(tmp_path / "b" / "baseline"),
                            "--record"]) == 0
    serve_from(monkeypatch, tmp_path / "ck")
    at = app()
    no_exception(at)
    assert any(s.value == "Compared with baseline on the same test images" for s in at.subheader)
    table = next(d.value for d in at.dataframe if "test ROC AUC" in d.value.columns)
    assert list(table["checkpoint"]) == ["tiny", "baseline"]


def test_model_card_says_which_checkpoint_suits_which_images(tiny_bundle, tmp_path, monkeypatch):
    """A checkpoint's external check on data another checkpoint was trained on is set against that one's CV."""
    from core.checkpoints import update_metadata

    for name in ("histo", "other"):
        shutil.copytree(tiny_bundle, tmp_path / "ck" / name)
    update_metadata(tmp_path / "ck" / "histo", {"dataset": {"kind": "ucsb"}, "name": "histo",
                                                "cross_validation": None})
    update_metadata(tmp_path / "ck" / "other", {"name": "other", "external_checks": [
        {"name": "ucsb", "root": "x", "label": "EXTERNAL CHECK", "n_images": 58, "n_correct": 31,
         "accuracy": 31 / 58, "images": []}]})
    update_metadata(tmp_path / "ck" / "histo", {"cross_validation": {
        "method": "m", "folds": [], "accuracy_mean": 0.9, "accuracy_min": 0.75, "accuracy_max": 1.0,
        "pooled_accuracy": 0.897, "pooled_roc_auc": 0.936}})
    serve_from(monkeypatch, tmp_path / "ck")
    at = app()
    at.selectbox(key="sb_checkpoint").set_value("other")
    at.run()
    no_exception(at)
    assert any(s.value == "Which checkpoint for which images" for s in at.subheader)
    table = next(d.value for d in at.dataframe if "better choice" in d.value.columns)
    assert list(table["better choice"]) == ["histo"] and "0.534 (external)" in table["this checkpoint"][0]


def test_out_of_distribution_upload_gets_no_verdict_but_can_be_explained(app_env):
    at = upload_on_explain(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8), "noise.png")
    heads = [s.value for s in at.subheader]
    assert heads[0] == "Out of distribution: no verdict" and not any(h.startswith("Prediction:") for h in heads)
    assert any("not a prediction" in e.value for e in at.error)
    # one message, no second box asking to treat the (withheld) prediction with caution
    assert not any("prediction" in w.value for w in at.warning)
    assert any(c.value.startswith("Out-of-distribution distance ") and "> threshold" in c.value for c in at.caption)
    at.multiselect(key="ex_methods").set_value(["gradcam"])
    at.button(key="FormSubmitter:ex_form-Explain").click()
    at.run()
    no_exception(at)
    assert any(s.value.startswith("Grad-CAM") for s in at.subheader)
    assert any("out of distribution: these maps" in w.value for w in at.warning)  # the maps are labelled


@pytest.fixture
def mixed_env(tiny_bundle, tmp_path, monkeypatch):
    """Three checkpoints: a_hne (active by default) and c_us reject random noise as out of distribution, b_us
    accepts any image."""
    from tests.conftest import install_copies

    ck = install_copies(tiny_bundle, tmp_path / "ck", ("a_hne", "b_us", "c_us"), accept_all=("b_us",),
                        kinds={"a_hne": "breakhis", "b_us": "busi", "c_us": "busi"})
    serve_from(monkeypatch, ck, tmp_path)
    return np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)


def offered(at) -> list[str]:
    return [b.key for b in at.button if (b.key or "").startswith("use_ckpt_")]


def test_out_of_distribution_upload_offers_the_checkpoint_made_for_it(mixed_env):
    """An image the active checkpoint rejects names the installed checkpoint whose detector accepts it (and not one
    that rejects it too); one click makes that the active checkpoint, the image stays and gets a verdict."""
    at = upload_on_explain(mixed_env, "noise.png")
    assert at.selectbox(key="sb_checkpoint").value == "a_hne"
    assert at.subheader[0].value == "Out of distribution: no verdict"
    assert offered(at) == ["use_ckpt_b_us"]
    assert any("b_us: trained on breast ultrasound scans (BUSI)" in c.value for c in at.caption)
    at.button(key="use_ckpt_b_us").click()
    at.run()
    no_exception(at)
    assert at.selectbox(key="sb_checkpoint").value == "b_us"
    assert at.subheader[0].value.startswith("Prediction:")
    assert not offered(at)
    at.switch_page("pages/4_Evaluation.py")  # the switch holds on every page, in the browser's picker too
    at.run()
    no_exception(at)
    assert at.selectbox(key="sb_checkpoint").value == "b_us"
    assert drawn_picker(at) == "b_us"


def drawn_picker(at) -> str:
    """The option the browser shows in the sidebar picker: a value sent with it, else the default index it is drawn
    from on a new page (the server-side value alone does not reach a picker the browser draws anew)."""
    picker = at.selectbox(key="sb_checkpoint")
    shown = picker.proto.raw_value if picker.proto.set_value else picker.options[picker.proto.default]
    return shown.split(" · ")[0]


def test_lime_lab_and_annotate_warn_about_an_out_of_distribution_image(mixed_env):
    """The pages without a prediction headline say the current image is out of distribution and offer the switch."""
    at = upload_on_explain(mixed_env, "noise.png")
    for page in ("pages/2_LIME_Lab.py", "pages/5_Annotate.py"):
        at.switch_page(page)
        at.run()
        no_exception(at)
        assert any("does not look like the images a_hne was trained on" in w.value for w in at.warning), page
        assert offered(at) == ["use_ckpt_b_us"], page
    at.button(key="use_ckpt_b_us").click()
    at.run()
    no_exception(at)
    assert at.selectbox(key="sb_checkpoint").value == "b_us"
    assert not any("does not look like the images" in w.value for w in at.warning) and not offered(at)


def test_compare_explains_the_predicted_class_of_each_new_image(app_env):
    """A class chosen on Compare for one image does not carry over to the next image: it starts at its prediction."""
    from tests.conftest import make_class_image

    at = app("pages/3_Compare.py")
    at.radio(key="cmp_src").set_value("Upload").run()
    predicted = []
    for label, seed in ((0, 1), (1, 2)):
        at.file_uploader(key="cmp_upload").upload(f"case{seed}.png", png(make_class_image(
            label, np.random.default_rng(seed), 48)), "image/png")
        at.run()
        no_exception(at)
        head = next(h.value for h in at.subheader if h.value.startswith(("Prediction:", "Out of distribution")))
        pick = at.selectbox(key="cmp_target")
        assert "(predicted" in pick.format_func(pick.value)  # starts at the predicted class
        predicted.append(pick.value)
        if head.startswith("Prediction:"):
            assert head.split()[1] == pick.value
        other = next(c for c in pick.options if "(predicted" not in c).split(" (")[0]
        pick.set_value(other)  # the user explains the other class of this image (one quick method)
        at.multiselect(key="cmp_methods").set_value(["gradcam"])
        at.button(key="FormSubmitter:cmp_form-Compare").click().run()
        no_exception(at)
        assert at.selectbox(key="cmp_target").value == other


def test_current_image_follows_the_user_across_pages_with_settings(app_env):
    """An upload on Explain is the current image on Compare and back on Explain; Explain's method choice stays."""
    from tests.conftest import make_class_image

    at = app("pages/1_Explain.py")
    img = make_class_image(0, np.random.default_rng(1), 48)
    at.radio(key="ex_src").set_value("Upload").run()
    at.file_uploader(key="ex_upload").upload("mine.png", png(img), "image/png")
    at.run()
    at.multiselect(key="ex_methods").set_value(["occlusion"])
    at.button(key="FormSubmitter:ex_form-Explain").click()
    at.run()
    no_exception(at)
    at.switch_page("pages/3_Compare.py").run()
    no_exception(at)
    assert at.radio(key="cmp_src").value == "Current image"
    assert any("mine.png" in c.value for c in at.caption)
    assert any(s.value.startswith("Prediction:") for s in at.subheader)
    at.switch_page("pages/1_Explain.py").run()
    no_exception(at)
    assert at.radio(key="ex_src").value == "Current image" and any("mine.png" in c.value for c in at.caption)
    assert at.multiselect(key="ex_methods").value == ["occlusion"]
    assert not any("Session State" in w.value for w in at.warning)


def test_evaluation_threshold_slider_updates_sensitivity_live(app_env):
    at = app("pages/4_Evaluation.py")
    no_exception(at)
    sens = lambda: next(m.value for m in at.metric if m.label == "Sensitivity")  # noqa: E731
    spec = lambda: next(m.value for m in at.metric if m.label == "Specificity")  # noqa: E731
    at.slider(key="ev_threshold").set_value(0.0).run()
    assert sens() == "1.000" and spec() == "0.000"
    at.slider(key="ev_threshold").set_value(1.0).run()
    no_exception(at)
    assert spec() == "1.000"


def test_model_card_headline_is_cross_validation_when_recorded(tiny_bundle, tmp_path, monkeypatch):
    from core.checkpoints import read_metadata, update_metadata

    shutil.copytree(tiny_bundle, tmp_path / "ck" / "tiny")
    update_metadata(tmp_path / "ck" / "tiny", {"cross_validation": {
        "method": "m", "scope": "all", "folds": [], "accuracy_mean": 0.8, "accuracy_min": 0.7, "accuracy_max": 0.9,
        "pooled_accuracy": 0.81, "pooled_roc_auc": 0.912, "pooled_balanced_accuracy": 0.777,
        "pooled_recall": {"benign": 0.8, "malignant": 0.754}, "pooled_support": {"benign": 14, "malignant": 14}}})
    serve_from(monkeypatch, tmp_path / "ck")
    at = app()
    no_exception(at)
    assert [(m.label, m.value) for m in at.metric][:3] == [("Balanced accuracy (cross-validated)", "0.777"),
                                                          ("ROC AUC (cross-validated)", "0.912"),
                                                          ("Malignant recall (cross-validated)", "0.754")]
    assert any("Single held-out test split" in c.value for c in at.caption)
    # how images are held out is the dataset's own grouping, not always patients (BUSI has no patient ids)
    assert any("held out once together with its whole group." in c.value for c in at.caption)
    update_metadata(tmp_path / "ck" / "tiny", {"dataset": {**read_metadata(tmp_path / "ck" / "tiny")["dataset"],
                                                           "kind": "ucsb"}})
    serve_from(monkeypatch, tmp_path / "ck")
    at = app()
    no_exception(at)
    assert any("held out once together with the other images of its tissue microarray." in c.value
               for c in at.caption)


def test_teach_session_setup_summary_and_reset_on_checkpoint_change(app_env, tmp_path, monkeypatch):
    """The educator picks class and number of cases; the reveal can use any method; a summary ends the session;
    switching checkpoint starts a clean session."""
    at = app("pages/6_Teach.py")
    at.multiselect(key="teach_opt_classes").set_value(["malignant"])
    at.number_input(key="teach_opt_n").set_value(2)
    at.button(key="FormSubmitter:teach_setup-Start session").click().run()
    no_exception(at)
    for case in range(2):
        assert any(f"Case {case + 1} of 2" in m.value for m in at.markdown)
        radio = next(r for r in at.radio if r.key.startswith("teach_guess"))
        radio.set_value("malignant").run()
        at.button(key="teach_reveal").click().run()
        assert any("Truth: **malignant**" in m.value for m in list(at.success) + list(at.error))
        at.selectbox(key="teach_opt_method").set_value("occlusion").run()
        no_exception(at)
        assert any("Occlusion" in (c.value or "") for c in at.caption) or len(at.get("image")) >= 2
        at.button(key="teach_next").click().run()
    no_exception(at)
    assert any(s.value == "Session summary" for s in at.subheader)
    assert next(m.value for m in at.metric if m.label == "Class score") == "2 / 2"
    # Another checkpoint: a fresh session, not the old reveal.
    shutil.copytree(app_env, tmp_path / "other_ck")
    at.session_state["teach"] = {**at.session_state["teach"], "checkpoint": str(tmp_path / "other_ck")}
    at.run()
    no_exception(at)
    assert not any(s.value == "Session summary" for s in at.subheader)
    assert any("Case 1 of" in m.value for m in at.markdown)


def lime_estimate_setup(app_env):
    import sys

    sys.path.insert(0, str(ROOT / "dashboard"))
    import services as svc
    from tests.conftest import make_class_image

    img = make_class_image(1, np.random.default_rng(4), 48)
    return svc, img, {"num_samples": 3000, "n_segments": 30, "random_seed": 0}


def test_lime_lab_estimate_is_measured_on_the_image(app_env):
    """The estimate comes from timed short runs on this image and settings: a fixed cost plus the number of samples
    times a measured cost per sample (how close it lands to a real run is the `timing` test below)."""
    svc, img, params = lime_estimate_setup(app_env)
    est = svc.lime_estimate(app_env, img, "sha-test", params)
    fewer = svc.lime_estimate(app_env, img, "sha-test", {**params, "num_samples": 300})
    assert 0 < fewer < est
    fixed, per = svc._lime_cost(str(app_env), svc._mtime(app_env), "sha-test", json.dumps(
        {k: v for k, v in params.items() if k != "num_samples"}, sort_keys=True), img)
    assert est == pytest.approx(fixed + 3000 * per) and per > 0
    at = app("pages/2_LIME_Lab.py")
    at.radio(key="ll_src").set_value("Example").run()
    no_exception(at)
    assert any(m.label == "Estimated run time" for m in at.metric)


@pytest.mark.timing
def test_lime_lab_estimate_lands_near_a_real_run(app_env):
    """A real LIME run lands within 0.33x-3x of the estimate (a timing check: the tiny model's per-sample cost is
    a fraction of a millisecond, where a busy machine's noise can dominate)."""
    import time

    from core.explain import explain

    svc, img, params = lime_estimate_setup(app_env)
    est = svc.lime_estimate(app_env, img, "sha-test", params)
    clf = svc.classifier(app_env)
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        explain(clf, img, "lime", **params)
        runs.append(time.perf_counter() - t0)
    took = min(runs)
    assert est > 0 and 0.33 * took <= est <= 3 * took, (est, took)


def ultrasound_pair(tiny_bundle, tiny_segmenter, ckpts):
    """A checkpoints folder with the tiny classifier as an ultrasound (BUSI) one, `us_tiny`, and the tiny BUSI
    segmenter, `seg_tiny`."""
    shutil.copytree(tiny_bundle, ckpts / "us_tiny")
    shutil.copytree(tiny_segmenter, ckpts / "seg_tiny")
    meta = json.loads((ckpts / "us_tiny" / "metadata.json").read_text())
    meta["dataset"]["kind"] = "busi"
    (ckpts / "us_tiny" / "metadata.json").write_text(json.dumps(meta))
    return ckpts


@pytest.fixture
def ultrasound_env(tiny_bundle, tiny_segmenter, tmp_path, monkeypatch):
    """An ultrasound (BUSI) classifier and a BUSI segmenter whose threshold 0 marks the whole image as lesion,
    so the predicted-lesion paths run whatever the tiny segmenter learned."""
    ckpts = ultrasound_pair(tiny_bundle, tiny_segmenter, tmp_path / "ckpts")
    seg = json.loads((ckpts / "seg_tiny" / "metadata.json").read_text())
    seg["postprocessing"] = {"threshold": 0.0, "largest_region_only": False}
    seg["model_selection"] = {"rule": "highest validation Dice", "chosen": "224 px",
                              "candidates": [{"candidate": "224 px", "val_dice": 0.7}, {"candidate": "288 px", "val_dice": 0.68}]}
    (ckpts / "seg_tiny" / "metadata.json").write_text(json.dumps(seg))
    (ckpts / "seg_tiny" / "predictions.csv").write_text(  # 1 of 2 test lesions missed, by an outline elsewhere
        "split,fold,path,class,group,dice,iou,true_area,pred_area\n"
        "test,,a.png,benign,a.png,0.02,0.01,0.1,0.05\ntest,,b.png,malignant,b.png,0.80,0.70,0.1,0.1\n")
    (tmp_path / "nodata").mkdir()
    serve_from(monkeypatch, ckpts, tmp_path / "nodata")
    return ckpts


def test_predicted_lesion_outlined_measured_and_used_for_localisation(ultrasound_env):
    from tests.conftest import make_class_image

    at = app("pages/1_Explain.py")
    # the segmenter is not offered as a classifier; the picker names the modality
    assert at.selectbox(key="sb_checkpoint").options == ["us_tiny · ultrasound"]
    img = make_class_image(1, np.random.default_rng(0), 48)
    at.radio(key="ex_src").set_value("Upload").run()
    at.file_uploader(key="ex_upload").upload("scan.png", png(img), "image/png")
    at.run()
    no_exception(at)
    assert at.checkbox(key="ex_pred_lesion").value is True
    assert any(c.value.startswith("Predicted lesion: 100.0% of the image") and "segmenter seg_tiny" in c.value
               and "The segmenter missed 1 of 2 test lesions almost entirely (Dice < 0.1), 1 of them by outlining "
                   "something else: check that the outline is on the lesion" in c.value for c in at.caption)
    at.multiselect(key="ex_methods").set_value(["gradcam"])
    at.button(key="FormSubmitter:ex_form-Explain").click()
    at.run()
    no_exception(at)
    assert any("magenta: *predicted* lesion" in c.value for c in at.caption)
    assert at.checkbox(key="ex_rep_name").value is False  # no file name in the report unless ticked
    assert at.get("download_button")[0].proto.label == "Download report"
    at.checkbox(key="ex_pred_lesion").uncheck().run()
    assert not any(c.value.startswith("Predicted lesion") for c in at.caption)

    at.switch_page("pages/3_Compare.py").run()
    at.multiselect(key="cmp_methods").set_value(["gradcam", "occlusion"])
    at.button(key="FormSubmitter:cmp_form-Compare").click()
    at.run()
    no_exception(at)
    assert any("measured against the **predicted lesion (segmenter), not a true mask**" in c.value for c in at.caption)
    assert any(b.proto.label == "Download report" for b in at.get("download_button"))
    scores = at.dataframe[-1].value
    assert "energy in lesion" in scores.columns and scores["energy in lesion"].iloc[0] == pytest.approx(1.0)

    at.switch_page("pages/5_Annotate.py").run()
    no_exception(at)
    assert any("use the *predicted* lesion (segmenter)" in c.value for c in at.caption)


def test_outline_on_a_scan_called_normal_says_what_such_outlines_meant(ultrasound_env):
    """The classifier calls the upload normal, the segmenter outlines a region: Explain warns, with the counts of the
    two bundles' validation rows; the same upload called anything else gets no warning. The model card sums it up."""
    from core.checkpoints import load_classifier
    from tests.conftest import make_class_image

    img = make_class_image(0, np.random.default_rng(0), 48)
    k = int(load_classifier(ultrasound_env / "us_tiny").predict_proba(img)[0].argmax())
    meta_path = ultrasound_env / "us_tiny" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    (ultrasound_env / "us_tiny" / "predictions.csv").write_text(  # validation: 3 scans called normal
        "split,path,true,predicted\nval,a.png,normal,normal\nval,b.png,malignant,normal\nval,c.png,benign,normal\n"
        "val,d.png,malignant,malignant\n")
    with open(ultrasound_env / "seg_tiny" / "predictions.csv", "a") as fh:  # outlines: none, a cancer, elsewhere
        fh.write("val,,a.png,normal,a.png,,,0.0,0.0\nval,,b.png,malignant,b.png,0.85,0.74,0.1,0.1\n"
                 "val,,c.png,benign,c.png,0.0,0.0,0.1,0.2\nval,,d.png,malignant,d.png,0.9,0.8,0.1,0.1\n")
    warning = ("The classifier calls this scan normal, yet the segmenter outlines a region. On both checkpoints' "
               "validation images, 2 scans the classifier called normal got an outline: it marked a real lesion in 1 "
               "(1 malignant), and in 1 it marked no lesion (0 of these scans had none). Look at the region before "
               "trusting either.")
    for normal in (k, 1 - k):
        names = ["benign", "malignant"]
        names[normal] = "normal"
        meta_path.write_text(json.dumps({**meta, "class_names": names}))
        at = upload_on_explain(img, "scan.png")
        assert at.checkbox(key="ex_pred_lesion").value is True
        shown = [w.value for w in at.warning]
        assert (warning in shown) == (normal == k), shown
        if normal == k:  # the same upload on Compare and Annotate
            for page in ("pages/3_Compare.py", "pages/5_Annotate.py"):
                at.switch_page(page).run()
                no_exception(at)
                assert warning in [w.value for w in at.warning], page
    home = app()
    no_exception(home)
    assert any(warning.split(". ", 1)[1].split(" Look")[0] in c.value for c in home.caption)


def test_no_predicted_lesion_on_an_out_of_distribution_upload(ultrasound_env):
    at = upload_on_explain(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8), "noise.png")
    assert any("No predicted lesion outline: the image is out of distribution" in c.value for c in at.caption)
    assert not any(c.value.startswith("Predicted lesion") for c in at.caption)


def test_model_card_shows_the_lesion_segmenter(ultrasound_env):
    at = app()
    no_exception(at)
    assert any(h.value == "Lesion segmenter · seg_tiny" for h in at.header)
    labels = [m.label for m in at.metric]
    assert any(l.startswith("Dice, test split (n = ") for l in labels) and "IoU, test split" in labels
    assert any("scans without a lesion" in c.value and c.value.endswith(
        "It missed 1 of 2 test lesions almost entirely (Dice < 0.1), 1 of them by outlining something else. "
        "Evaluation shows each lesion's Dice, the lesions it missed and the predicted shape by class.")
        for c in at.caption)
    chosen = [e for e in at.expander if e.label.startswith("How this checkpoint was chosen (2 candidates")]
    assert chosen and "288 px" in chosen[-1].dataframe[0].value["candidate"].tolist()


def test_compare_shows_the_randomised_model_maps_and_the_model_card_sanity_table(tiny_bundle, tiny_tree, tmp_path,
                                                                                  monkeypatch):
    from core.explain.evaluate import main as evaluate_main
    from tests.conftest import make_class_image

    bundle = tmp_path / "ckpts" / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "explanations.json").write_text(json.dumps({"checkpoint": "tiny", "methods": {}}))
    assert evaluate_main([str(bundle), "--sanity-only", "--sanity-images", "2", "--methods", "gradcam"]) == 0
    serve_from(monkeypatch, bundle.parent, tmp_path / "nodata")
    at = app()
    no_exception(at)
    assert any(h.value == "Sanity checks of the explanation methods" for h in at.subheader)
    table = [d.value for d in at.dataframe if "result" in d.value.columns][0]
    assert list(table["method"]) == ["Grad-CAM"] and table["result"].iloc[0] in ("✅ pass", "❌ fail", "undefined")

    at.switch_page("pages/3_Compare.py").run()
    at.radio(key="cmp_src").set_value("Upload").run()
    at.file_uploader(key="cmp_upload").upload("x.png", png(make_class_image(1, np.random.default_rng(2), 48)),
                                              "image/png")
    at.run()
    at.multiselect(key="cmp_methods").set_value(["gradcam"])
    at.button(key="FormSubmitter:cmp_form-Compare").click()
    at.run()
    at.button(key="cmp_sanity_run").click()
    at.run()
    no_exception(at)
    assert [m.label for m in at.metric][-2:] == ["Rank correlation", "SSIM"] or any(
        "Similarity undefined" in m.value for m in at.markdown)
    assert any("should not be used to teach" in c.value for c in at.caption)


def test_explanation_scores_of_one_image_show_no_interval(tiny_bundle, tmp_path, monkeypatch):
    """Evaluation's explanation table: a score over several images shows its mean [95% interval], a score of one image
    its value alone (core.evaluation.mean_ci gives no interval from one value), seed stability too."""
    bundle = tmp_path / "ckpts" / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    one = {"n": 1, "mean": 0.5, "median": 0.5, "ci95": None}
    (bundle / "explanations.json").write_text(json.dumps({
        "checkpoint": "tiny", "images": {"n": 2, "classes": {"benign": 1, "malignant": 1}, "with_masks": False},
        "methods": {"gradcam": {"deletion_auc": one,
                                "insertion_auc": {"n": 2, "mean": 0.7, "median": 0.7, "ci95": [0.6, 0.8]}}},
        "agreement": [], "seed_stability": {"lime": {**one, "mean": 0.9, "seeds": 3, "images": 1}}}))
    serve_from(monkeypatch, bundle.parent, tmp_path / "nodata")
    at = app("pages/4_Evaluation.py")
    no_exception(at)
    table = [d.value for d in at.dataframe if "method" in d.value.columns and "deletion AUC (lower is better)"
             in d.value.columns][0]
    assert table["deletion AUC (lower is better)"].iloc[0] == "0.500"
    assert table["insertion AUC (higher is better)"].iloc[0] == "0.700 [0.600, 0.800]"
    assert any(c.value.endswith("seed stability over 3 seeds on 1 images: 0.900.") for c in at.caption)
    assert not any("weak effect" in c.value for c in at.caption)  # not recorded: not mentioned


def test_evaluation_shows_the_share_of_maps_with_a_weak_effect(tiny_bundle, tmp_path, monkeypatch):
    bundle = tmp_path / "ckpts" / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    two = {"n": 2, "mean": 0.4, "median": 0.4, "ci95": [0.3, 0.5]}
    (bundle / "explanations.json").write_text(json.dumps({
        "checkpoint": "tiny", "images": {"n": 2, "classes": {"benign": 1, "malignant": 1}, "with_masks": False},
        "methods": {"gradcam": {"deletion_auc": two}, "occlusion": {"deletion_auc": two,
                                                                     "weak_effect": {**two, "mean": 0.5, "ci95": [0.0, 1.0]}}},
        "agreement": [], "seed_stability": {},
        "machine": {"cpu": "Test CPU 9000", "cores": 2, "cpu_features": ["avx2", "avx512_bf16"],
                    "forward": "openvino float32", "perturbation_forward": "openvino-bf16"}}))
    serve_from(monkeypatch, bundle.parent, tmp_path / "nodata")
    at = app("pages/4_Evaluation.py")
    no_exception(at)
    table = [d.value for d in at.dataframe if "method" in d.value.columns and "deletion AUC (lower is better)"
             in d.value.columns][0]
    assert list(table["share of maps with a weak effect"]) == ["n/a", "0.500 [0.000, 1.000]"]  # not "None"
    assert any("A map has a weak effect when hiding parts of the image" in c.value for c in at.caption)
    assert any("Seconds timed on Test CPU 9000 (AVX512_BF16), 2 cores, forward openvino float32; perturbed images on "
               "openvino-bf16." in c.value for c in at.caption)


def test_overlays_are_remembered_per_map_and_setting(app_env):
    """Re-showing an explanation re-sends the remembered overlay; another opacity, map or outline draws anew."""
    import sys

    sys.path.insert(0, str(ROOT / "dashboard"))
    import components as ui
    from core.explain import explain
    from tests.conftest import make_class_image

    import services as svc

    img = make_class_image(1, np.random.default_rng(5), 48)
    clf = svc.classifier(app_env)
    e = explain(clf, img, "gradcam")
    first = ui.overlay_for("sha-x", img, e, 0.5)
    assert np.array_equal(first, ui.render_overlay(img, e, 0.5))
    assert np.array_equal(ui.overlay_for("sha-x", img, e, 0.5), first)
    assert not np.array_equal(ui.overlay_for("sha-x", img, e, 0.9), first)
    mask = np.zeros(img.shape[:2], bool)
    mask[10:30, 10:30] = True
    assert np.array_equal(ui.overlay_for("sha-x", img, e, 0.5, predicted=mask),
                          ui.render_overlay(img, e, 0.5, predicted=mask))
    other = explain(clf, img, "occlusion")
    assert np.array_equal(ui.overlay_for("sha-x", img, other, 0.5), ui.render_overlay(img, other, 0.5))


def test_reruns_keep_the_keras_session_and_skip_the_full_collection(monkeypatch):
    """Streamlit's per-rerun clean-up (keras.backend.clear_session and gc.collect(2)) held the server ~0.5 s after
    every rerun with TensorFlow loaded: the service layer swaps it for closing pyplot figures only, and the app's
    config turns the post-script collection off."""
    import sys
    import tomllib

    import keras
    from streamlit.runtime.scriptrunner import script_runner

    sys.path.insert(0, str(ROOT / "dashboard"))
    import services  # noqa: F401  (installs the swap on import)

    def forbidden():
        raise AssertionError("keras.backend.clear_session() was called after a rerun")

    monkeypatch.setattr(keras.backend, "clear_session", forbidden)
    script_runner._clean_problem_modules()  # what Streamlit calls after each script and fragment run
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["runner"]["postScriptGC"] is False


def test_ensemble_checkpoint_card_evaluation_and_explanation(tiny_bundle, tiny_tree, tmp_path, monkeypatch):
    """An ensemble bundle (train.py --ensemble): the model card lists its members, Evaluation says it has no
    training curves of its own, and Explain draws Grad-CAM as the mean of the members' maps."""
    import train
    from tests.conftest import make_class_image

    members = tmp_path / "members"
    assert train.main(["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "simple_cnn",
                       "--input-size", "32", "--head-epochs", "2", "--fine-tune-epochs", "0", "--head-units", "8",
                       "--dropout", "0", "--lr", "3e-3", "--batch-size", "8", "--split-file",
                       str(tiny_bundle / "split.csv"), "--name", "other", "--out-dir", str(members), "--quiet"]) == 0
    assert train.main(["--ensemble", str(tiny_bundle), str(members / "other"), "--name", "ens",
                       "--out-dir", str(tmp_path / "c")]) == 0
    serve_from(monkeypatch, tmp_path / "c", tmp_path / "nodata")
    at = app()
    no_exception(at)
    assert any(h.value == "Ensemble members" for h in at.subheader)
    table = next(d.value for d in at.dataframe if "member" in d.value.columns)
    assert list(table["member"]) == ["1. tiny", "2. other"]
    assert list(table["same prediction inside the ensemble (val)"]) == ["1.000", "1.000"]
    assert list(table["bundle it was trained as"]) == [str(tiny_bundle), str(members / "other")]
    at.switch_page("pages/4_Evaluation.py")
    at.run()
    no_exception(at)
    assert any("joins 2 trained models" in c.value for c in at.caption)
    at = upload_on_explain(make_class_image(1, np.random.default_rng(0), 48))
    at.multiselect(key="ex_methods").set_value(["gradcam"])
    at.button(key="FormSubmitter:ex_form-Explain").click()
    at.run()
    no_exception(at)
    assert any(s.value.startswith("Grad-CAM") for s in at.subheader)


def test_distilled_checkpoint_card_names_its_teacher(tiny_bundle, tiny_tree, tmp_path, monkeypatch):
    """A student bundle (train.py --distil-from): the model card says which teacher taught it, and how."""
    import train

    assert train.main(["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "simple_cnn",
                       "--input-size", "32", "--head-epochs", "1", "--fine-tune-epochs", "0", "--head-units", "8",
                       "--dropout", "0", "--batch-size", "8", "--split-file", str(tiny_bundle / "split.csv"),
                       "--distil-from", str(tiny_bundle), "--distil-weight", "0.8", "--name", "student",
                       "--out-dir", str(tmp_path / "c"), "--quiet"]) == 0
    serve_from(monkeypatch, tmp_path / "c", tmp_path / "nodata")
    at = app()
    no_exception(at)
    table = next(t.value for t in at.table if "Taught by" in list(t.value.iloc[:, 0]))
    taught = table.iloc[list(table.iloc[:, 0]).index("Taught by"), 1]
    assert str(tiny_bundle) in taught and "0.8 × its probabilities at temperature 2" in taught


def test_warm_up_compiles_the_perturbation_forward_before_the_first_explanation(app_env, monkeypatch):
    """services.warm_up (run by Explain after the prediction is on screen) traces Grad-CAM and runs one blank
    perturbed image through the perturbation forward pass, once per checkpoint version."""
    import sys

    sys.path.insert(0, str(ROOT / "dashboard"))
    import services as svc

    clf = svc.classifier(app_env)
    seen = []
    real = clf.predict_perturbed
    monkeypatch.setattr(clf, "predict_perturbed", lambda images, *a, **k: seen.append(np.shape(images)) or real(images))
    svc.warm_up(app_env)
    svc.warm_up(app_env)  # cached: not run twice
    assert seen == [(1, clf.input_size, clf.input_size, 3)]
    assert clf._forward is not None and clf.perturbation_forward() is not None
    # Compare's defaults: Grad-CAM++ shares Grad-CAM's graph, occlusion the forward pass already compiled; integrated
    # gradients trace their own input-gradient function
    from core.explain.gradcam import compiled_for
    from core.explain.integrated_gradients import INPUT_GRADIENT

    assert INPUT_GRADIENT not in compiled_for(clf.model)  # Grad-CAM's graph is there, the input gradient not yet
    svc.warm_up(app_env, ("gradcam", "gradcam++", "occlusion", "integrated_gradients"))
    assert INPUT_GRADIENT in compiled_for(clf.model) and seen == [(1, clf.input_size, clf.input_size, 3)]


def test_compare_captions_say_how_far_perturbations_moved_the_prediction():
    import sys

    sys.path.insert(0, str(ROOT / "dashboard"))
    import components as ui
    from core.explain import Explanation

    a = np.ones((4, 4), np.float32)
    strong = Explanation("lime", 1, 0.9, a, {}, 0.0, "malignant", extras={"perturbed_probability": [0.42, 0.93]})
    weak = Explanation("occlusion", 0, 0.95, a, {}, 0.0, "benign", extras={"perturbed_probability": [0.943, 0.950]})
    assert ui.effect_caption(strong) == " · perturbed P 42.0%–93.0%"
    assert ui.effect_caption(weak) == " · perturbed P 94.3%–95.0% (under 1 point: weak effect)"
    assert ui.effect_caption(Explanation("gradcam", 0, 0.95, a, {}, 0.0, "benign")) == ""


def test_every_parameter_the_ui_offers_is_one_the_explainer_accepts():
    """The widgets' ranges and choices lie inside core's checked ranges (core.explain.base.bounded / one_of)."""
    import sys
    from dataclasses import fields

    sys.path.insert(0, str(ROOT / "dashboard"))
    from components import PARAM_UI
    from core.explain import EXPLAINERS

    for method, ui in PARAM_UI.items():
        spec = {f.name: f for f in fields(EXPLAINERS[method].Params)}
        for name, (kind, options) in ui.items():
            meta = spec[name].metadata
            if kind == "choice":
                assert tuple(options) == meta["choices"], (method, name)
            elif kind in ("int", "float"):
                lo, hi = meta["range"]
                assert (options[0] > lo if meta["above"] else options[0] >= lo) and options[1] <= hi, (method, name)
            else:
                assert kind == "bool" and isinstance(spec[name].default, bool)


def test_timed_on_names_the_machine_or_the_ray_workers():
    import sys

    sys.path.insert(0, str(ROOT / "dashboard"))
    from components import timed_on

    assert timed_on(None) == "" and timed_on({}) == ""  # files written before the record
    local = {"cpu": "CPU X", "cores": 16, "cpu_features": ["avx2", "amx_bf16"], "forward": "openvino float32",
             "perturbation_forward": "float32"}
    assert timed_on(local) == (" Seconds timed on CPU X (AMX_BF16), 16 cores, forward openvino float32; perturbed "
                               "images on float32.")
    assert timed_on({**local, "ray": "auto"}) == " Seconds timed on Ray workers (the run was started on CPU X)."
    assert timed_on({**local, "note": "The CPU was shared."}).endswith(
        "perturbed images on float32. The CPU was shared.")


def test_home_warns_about_a_class_a_split_lacks(tiny_bundle, tmp_path, monkeypatch):
    from core.checkpoints import read_metadata, update_metadata

    bundle = tmp_path / "ck" / "tiny"
    shutil.copytree(tiny_bundle, bundle)
    note = "No training images of rare (1 image(s) in all): this checkpoint cannot learn it; ..."
    update_metadata(bundle, {"split": {**read_metadata(bundle)["split"], "warnings": [note]}})
    serve_from(monkeypatch, bundle.parent)
    at = app()
    no_exception(at)
    assert any(w.value == note for w in at.warning)
    shutil.copytree(tiny_bundle, tmp_path / "plain" / "tiny")  # no warnings recorded: none shown
    serve_from(monkeypatch, tmp_path / "plain")
    at = app()
    assert not any("No training images" in w.value for w in at.warning)


def test_evaluation_shows_the_segmenter_s_dice_misses_and_shape_by_class(tiny_bundle, tiny_segmenter, tiny_busi_tree,
                                                                         tmp_path, monkeypatch):
    from core.checkpoints import read_csv
    from core.segmentation import MISSED_DICE

    ckpts = ultrasound_pair(tiny_bundle, tiny_segmenter, tmp_path / "ckpts")
    seg = json.loads((ckpts / "seg_tiny" / "metadata.json").read_text())
    seg["dataset"]["root"] = str(tiny_busi_tree)
    (ckpts / "seg_tiny" / "metadata.json").write_text(json.dumps(seg))
    serve_from(monkeypatch, ckpts, tiny_busi_tree)
    rows = [r for r in read_csv(ckpts / "seg_tiny" / "predictions.csv") if r["split"] == "test"]
    lesions = [r for r in rows if float(r["true_area"]) > 0]
    dice = [float(r["dice"]) for r in lesions]
    assert lesions and all(r["pred_regions"] != "" for r in lesions)  # the bundle's rows carry the shape

    at = app("pages/4_Evaluation.py")
    no_exception(at)
    assert any(h.value == "Lesion segmenter · seg_tiny on the test split" for h in at.subheader)
    assert any(c.value.startswith(f"Each of the {len(lesions)} test images with a lesion: mean Dice "
                                  f"{np.mean(dice):.3f}, median {np.median(dice):.3f}.") for c in at.caption)
    shown = sum(d < MISSED_DICE for d in dice) or min(6, len(lesions))  # the misses, else the lowest Dice
    assert sum(b.label == "Open in Explain" for b in at.button) == shown
    table = next(d.value for d in at.dataframe if "outline" in d.value.columns)
    truth = table[table["outline"] == "radiologists'"]
    assert truth["lesions outlined"].sum() == len(lesions)  # every true lesion measured on its own mask
    assert (table[table["outline"] == "predicted"]["lesions outlined"].sum()
            == sum(int(r["pred_regions"]) > 0 for r in lesions))
    assert any(c.value.startswith("How well each measure tells malignant from the other lesions") for c in at.caption)

    at.button(key="ev_seg_open_0").click().run()  # the worst lesion opens on Explain as the current image
    no_exception(at)
    worst = min(lesions, key=lambda r: float(r["dice"]))
    assert at.session_state["current_image"]["name"] == worst["path"].rsplit("/", 1)[-1]


def test_evaluation_segmenter_view_without_the_dataset_or_shape_columns(ultrasound_env):
    at = app("pages/4_Evaluation.py")
    no_exception(at)
    assert any(h.value == "Lesion segmenter · seg_tiny on the test split" for h in at.subheader)
    assert any(c.value.startswith("Each of the 2 test images with a lesion: mean Dice 0.410, median 0.410. It missed "
                                  "1 of 2") for c in at.caption)
    assert any(re.match(r"1 of these 1 images are not in .* here\.", c.value) for c in at.caption)  # a.png
    assert not any("outline" in d.value.columns for d in at.dataframe)  # rows without shape columns: no table
    seg = json.loads((ultrasound_env / "seg_tiny" / "metadata.json").read_text())
    seg["dataset"]["root"] = str(ultrasound_env / "gone")
    (ultrasound_env / "seg_tiny" / "metadata.json").write_text(json.dumps(seg))
    at = app("pages/4_Evaluation.py")
    no_exception(at)
    assert any("is not available here, so images cannot be shown" in i.value for i in at.info)


def test_fast_maps_are_shown_before_the_slow_ones_are_computed(monkeypatch):
    """run_methods draws each map as it is ready: a cached one at once, then Grad-CAM before LIME starts (whatever
    order the user picked them in), and returns them in the user's order."""
    import sys
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "dashboard"))
    import components as ui

    events = []
    cached = {"gradcam++": "cached map"}
    fake = SimpleNamespace(
        tile_count=lambda ckpt, image: 1,
        cached_explanation=lambda ckpt, sha, m, params, target: cached.get(m),
        explain=lambda ckpt, image, sha, m, params, target, progress: events.append(("computed", m)) or f"{m} map")
    monkeypatch.setattr(ui, "svc", fake)
    inp = SimpleNamespace(image=np.zeros((8, 8, 3), np.uint8), sha="x")
    out = ui.run_methods("ckpt", inp, ["lime", "gradcam++", "shap", "gradcam"], {},
                         on_result=lambda m, e: events.append(("shown", m)))
    assert events == [("shown", "gradcam++"), ("computed", "gradcam"), ("shown", "gradcam"), ("computed", "lime"),
                      ("shown", "lime"), ("computed", "shap"), ("shown", "shap")]
    assert list(out) == ["lime", "gradcam++", "shap", "gradcam"]
    assert out["gradcam++"] == "cached map" and out["lime"] == "lime map"
    assert ui.run_order(["occlusion", "lime", "gradcam"]) == ["gradcam", "occlusion", "lime"]
