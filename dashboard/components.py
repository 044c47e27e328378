"""Widgets shared by the pages: sidebar, image input, prediction chart, parameter forms, overlays."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

import services as svc
from core.backends import BF16_FEATURES
from core.data.roots import resolve_data_root
from core.data.split import describe_groups, mask_paths
from core.evaluation import operating_point_source, subtype_caution as subtype_caution_of, weak_subgroups
from core.explain import EXPLAINERS, FAST_PARAMS, MAX_PERTURBATION_TILES, PERTURBATION_METHODS
from core.explain.base import param_choices
from core.explain.visualise import boundaries, colorize, mask_outline, overlay

METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "lime": "LIME", "shap": "SHAP (partition)",
                 "occlusion": "Occlusion", "integrated_gradients": "Integrated gradients"}


def _choices(method: str, name: str) -> list[str]:
    return list(param_choices(EXPLAINERS[method].Params, name))


# Which parameters the UI exposes per method: name -> (kind, options or (min, max, step)); the choices are the
# explainer's own (core.explain.base.one_of), the numeric ranges lie inside its checked ones (tested).
PARAM_UI = {
    "gradcam": {"relu": ("bool", None)},
    "gradcam++": {"relu": ("bool", None)},
    "lime": {"segmentation": ("choice", _choices("lime", "segmentation")),
             "n_segments": ("int", (5, 300, 5)), "num_samples": ("int", (50, 5000, 50)),
             "kernel_width": ("float", (0.05, 2.0, 0.05)), "hide_color": ("choice", _choices("lime", "hide_color")),
             "num_features": ("int", (1, 300, 1)), "positive_only": ("bool", None),
             "random_seed": ("int", (0, 10_000, 1))},
    "shap": {"masker": ("choice", _choices("shap", "masker")),
             "blur_kernel": ("int", (4, 128, 4)), "max_evals": ("int", (50, 5000, 50)), "seed": ("int", (0, 10_000, 1))},
    "occlusion": {"window": ("int", (4, 128, 4)), "stride": ("int", (2, 128, 2)),
                  "baseline": ("choice", _choices("occlusion", "baseline"))},
    "integrated_gradients": {"steps": ("int", (4, 256, 4)), "baseline": ("choice", _choices("integrated_gradients",
                                                                                              "baseline"))},
}
#: Methods that re-classify many perturbed copies of the image, and the largest tile grid they run on.
FAST_DEFAULTS = FAST_PARAMS


#: Widget keys whose values persist for the session when the user leaves a page and comes back
#: (Streamlit forgets a page's widget state once another page runs). Prefixes of settings widgets:
PERSIST_PREFIXES = ("ex_", "ll_", "cmp_", "ev_", "an_", "teach_opt_")
_NOT_SETTINGS = ("_upload", "_src", "_example", "_run", "_stab", "_next", "_reveal", "_chart", "_cm", "_roc", "_pr",
                 "_cal", "_hist", "_curve", "_dl_", "_open_", "_mosaic_patient", "_report", "FormSubmitter")
_PERSIST = "_persisted_settings"


def persist_settings() -> None:
    """Keep method choices and settings per page for the session: remember this run's settings widgets and
    restore any that Streamlit dropped while the user was on another page."""
    store = st.session_state.setdefault(_PERSIST, {})
    for k in list(st.session_state.keys()):
        v = st.session_state[k]
        if (isinstance(k, str) and k.startswith(PERSIST_PREFIXES) and not any(t in k for t in _NOT_SETTINGS)
                and isinstance(v, (str, int, float, list, tuple)) and not isinstance(v, bool)):
            store[k] = v
    for k, v in store.items():
        if k not in st.session_state:
            st.session_state[k] = v


def page_setup(title: str, icon: str = "🔬") -> None:
    st.set_page_config(page_title=f"BreastXAI · {title}", page_icon=icon, layout="wide")
    persist_settings()


def image_page(title: str, prefix: str, icon: str = "🔬", caption: str = ""):
    """Common start of the image pages: config, sidebar, title, checkpoint and image; stops if either is missing.

    Returns (checkpoint folder, Classifier, ImageInput).
    """
    page_setup(title, icon)
    ckpt = sidebar()
    st.title(title)
    if caption:
        st.caption(caption)
    if ckpt is None:
        st.stop()
    clf = svc.classifier(ckpt)
    inp = image_input(prefix)
    if inp is None:
        st.stop()
    return ckpt, clf, inp


def sidebar() -> Optional[Path]:
    """Checkpoint picker and data-folder setting; returns the active checkpoint folder or None."""
    with st.sidebar:
        st.markdown("### BreastXAI")
        statuses = svc.bundle_statuses()
        usable = [s for s in statuses if s.ok]
        if not usable:
            st.error("No usable checkpoint in `checkpoints/`. Train one with `python train.py --help`.")
        else:
            names = [s.name for s in usable]
            paths = {s.name: str(s.path) for s in usable}
            current = svc.active_checkpoint()
            name = current.name if current is not None and current.name in names else names[0]
            st.session_state["checkpoint"] = paths[name]
            # "checkpoint" is the one source of truth; the picker mirrors it on every page. A value set here reaches
            # the browser with the picker; otherwise the index does (on a new page the browser draws the picker from
            # it: without it, a checkpoint chosen by a "Use ..." button showed as the first one after a page switch)
            where = {}
            if st.session_state.get("sb_checkpoint") != name:
                st.session_state["sb_checkpoint"] = name
            else:
                where = {"index": names.index(name)}
            short = {"histopathology": "H&E", "ultrasound": "ultrasound"}
            modality = {s.name: short.get(svc.gallery.modality_of(svc.metadata(s.path))) for s in usable}
            st.selectbox("Checkpoint", names, key="sb_checkpoint", on_change=_picker_changed, args=(paths,),
                         format_func=lambda n: f"{n} · {modality[n]}" if modality.get(n) else n,
                         help="Trained model bundles found in checkpoints/, with the imaging modality each "
                              "was trained on", **where)
        for s in statuses:
            if not s.ok:
                st.warning(f"**{s.name}** is unavailable: {s.message}")
        default = svc.gallery.default_data_dir()
        st.text_input("Data folder (examples)", value=str(st.session_state.get("data_dir") or default or ""),
                      key="sb_data_dir", help=f"Folder holding BUSI / BreakHis; also set by ${svc.gallery.ENV_VAR}")
        st.session_state["data_dir"] = st.session_state.get("sb_data_dir") or None
        st.caption(svc.DISCLAIMER)
    return svc.active_checkpoint() if usable else None


@dataclass
class ImageInput:
    image: np.ndarray  # uint8 (H, W, 3)
    sha: str
    name: str
    mask: Optional[np.ndarray] = None  # bool (H, W) lesion mask, when known
    true_class: Optional[str] = None
    notes: tuple = ()


CURRENT = "current_image"


def set_current_image(data: bytes, name: str, mask_paths=(), true_class: Optional[str] = None,
                      origin: str = "upload") -> None:
    """Make an image the current one on every page until it is replaced (with its mask and true class)."""
    st.session_state[CURRENT] = {"data": data, "sha": svc.sha256(data), "name": name,
                                 "mask_paths": tuple(mask_paths), "true_class": true_class, "origin": origin}


def image_input(prefix: str, allow_upload: bool = True) -> Optional[ImageInput]:
    """The current image (uploaded or picked on any page, kept across pages until replaced), or a new upload /
    example; shows decoder notes and errors as messages."""
    examples = svc.examples()
    info = st.session_state.pop("selected_example_info", None)  # "Open in Explain" from another page
    if info and Path(info["path"]).is_file():
        set_current_image(svc.read_file(info["path"]), Path(info["path"]).name, info["mask_paths"],
                          info["class_name"], "example")
    cur = st.session_state.get(CURRENT)
    sources = (["Current image"] if cur else []) + (["Upload"] if allow_upload else []) + \
        (["Example"] if examples else [])
    if not sources:
        st.info(svc.gallery.WHERE_TO_GET)
        return None
    src = st.radio("Image source", sources, index=0, horizontal=True, key=f"{prefix}_src",
                   help="The current image stays the same on every page until you upload or pick another.")
    if src == "Upload":
        up = st.file_uploader("Breast histopathology or ultrasound image", key=f"{prefix}_upload",
                              type=["png", "jpg", "jpeg", "tif", "tiff", "bmp"])
        if not examples:
            st.caption(svc.gallery.WHERE_TO_GET)
        if up is None:
            return None
        data = up.getvalue()
        if cur is None or cur["sha"] != svc.sha256(data):
            set_current_image(data, up.name)
    elif src == "Example":
        labels = [e.label for e in examples]
        preset = cur["name"] if cur and cur["origin"] == "example" else None
        idx = next((i for i, e in enumerate(examples) if Path(e.path).name == preset), 0)
        pick = st.selectbox("Example image", labels, index=idx, key=f"{prefix}_example")
        ex = examples[labels.index(pick)]
        data = svc.read_file(ex.path)
        if cur is None or cur["sha"] != svc.sha256(data):
            set_current_image(data, Path(ex.path).name, ex.mask_paths, ex.class_name, "example")
    cur = st.session_state.get(CURRENT)
    if cur is None:
        return None
    if src == "Current image":
        st.caption(f"Current image: **{cur['name']}** ({'uploaded' if cur['origin'] == 'upload' else 'example'}"
                   + (f", true class {cur['true_class']}" if cur["true_class"] else "") + "). Choose Upload or "
                   "Example to replace it.")
    try:
        decoded = svc.decode(cur["data"])
    except svc.InvalidImageError as exc:
        st.error(f"This file cannot be used: {exc}")
        st.session_state.pop(CURRENT, None)
        return None
    for note in decoded.notes:
        st.info(note)
    img = decoded.array
    mask = svc.mask_for(tuple(cur["mask_paths"]), img.shape[:2]) if cur["mask_paths"] else None
    return ImageInput(img, cur["sha"], cur["name"], mask, cur["true_class"], decoded.notes)


def prediction_chart(probs: np.ndarray, class_names, height: int = 60) -> go.Figure:
    order = list(range(len(class_names)))
    colors = ["#b03a6f" if i == int(np.argmax(probs)) else "#9aa5b1" for i in order]
    fig = go.Figure(go.Bar(x=[float(probs[i]) for i in order], y=[class_names[i] for i in order], orientation="h",
                           marker_color=colors, text=[f"{probs[i]:.1%}" for i in order], textposition="auto"))
    fig.update_layout(xaxis=dict(range=[0, 1], tickformat=".0%", title="calibrated probability"),
                      height=height + 45 * len(class_names), margin=dict(l=10, r=10, t=10, b=10))
    return fig


def prediction_headline(ckpt: Path, inp: "ImageInput", probs: np.ndarray, class_names) -> bool:
    """The headline: the prediction, or first of all that the image is out of distribution (then the prediction
    is shown as not applicable). Returns True when the image is out of distribution."""
    res = svc.ood_check(ckpt, inp.image, inp.sha)
    pred = int(np.argmax(probs))
    if res is not None and res["out_of_distribution"]:
        st.subheader("Out of distribution: no verdict")
        st.error(f"This image does not look like the images this model was trained on, so its output is not a "
                 f"prediction. For reference only, the model's output would be {class_names[pred]} "
                 f"({probs[pred]:.1%}). Use a checkpoint made for this kind of image.", icon=":material/block:")
        checkpoint_suggestions(ckpt, inp)
        return True
    st.subheader(f"Prediction: {class_names[pred]} ({probs[pred]:.1%})")
    return False


def _picker_changed(paths: dict[str, str]) -> None:
    """Sidebar picker callback: the user's choice becomes the active checkpoint."""
    st.session_state["checkpoint"] = paths[st.session_state["sb_checkpoint"]]


def _switch_checkpoint(path: str) -> None:
    """Button callback: make `path` the active checkpoint (the sidebar picker follows; the image stays current)."""
    st.session_state["checkpoint"] = path


def checkpoint_suggestions(ckpt: Path, inp: "ImageInput") -> None:
    """For an out-of-distribution image: the installed checkpoints whose detector accepts it, one button each."""
    with st.spinner("Looking for an installed checkpoint made for images like this one…"):
        fits = svc.fitting_checkpoints(ckpt, inp.image, inp.sha)
    if not fits:
        st.caption("No installed checkpoint was trained on images like this one: every out-of-distribution check "
                   "rejects it.")
        return
    st.markdown("**Made for images like this one** (their out-of-distribution check accepts it):")
    for i, p in enumerate(fits):
        kind = (svc.metadata(p).get("dataset") or {}).get("kind", "")
        what = svc.gallery.DATASET_IMAGES.get(kind, f"{kind or 'its own'} images")
        st.button(f"Use {p.name}", key=f"use_ckpt_{p.name}", type="primary" if i == 0 else "secondary",
                  on_click=_switch_checkpoint, args=(str(p),), help=f"Trained on {what}. The image stays loaded.")
        st.caption(f"{p.name}: trained on {what}" + (" · best fit" if i == 0 and len(fits) > 1 else ""))


def ood_banner(ckpt: Path, inp: "ImageInput") -> bool:
    """Pages without the prediction headline (LIME Lab, Annotate): say when the image is out of distribution for the
    active checkpoint, with the checkpoints made for it. Returns True when it is."""
    res = svc.ood_check(ckpt, inp.image, inp.sha)
    if not (res and res["out_of_distribution"]):
        return False
    st.warning(f"This image does not look like the images {ckpt.name} was trained on: its explanations here show "
               "what the model responds to in an image it was not made for, not evidence for a diagnosis.",
               icon=":material/warning:")
    checkpoint_suggestions(ckpt, inp)
    return True


def ood_notice(ckpt: Path, inp: "ImageInput") -> None:
    """Say whether the image looks like the checkpoint's training data."""
    res = svc.ood_check(ckpt, inp.image, inp.sha)
    if res is None:
        st.caption("This checkpoint has no out-of-distribution detector.")
    elif res["out_of_distribution"]:  # the headline already says so and gives no verdict: only the measurement
        st.caption(f"Out-of-distribution distance {res['score']:.0f} > threshold {res['threshold']:.0f} (about 5% of "
                   "genuine validation images exceed it): it may be a different modality, magnification or scanner.")
    elif res.get("training_copy") and res["score"] > res["threshold"]:
        st.success(f"The image is one of the images {ckpt.name} was trained on, or a near-copy of one: it resembles "
                   f"the training data, although its distance {res['score']:.0f} is above the threshold "
                   f"{res['threshold']:.0f} new images are held to (training images score higher than new ones).",
                   icon=":material/check_circle:")
    else:
        st.success(f"The image resembles the training data (distance {res['score']:.0f} ≤ threshold "
                   f"{res['threshold']:.0f}; about 5% of genuine validation images exceed it).",
                   icon=":material/check_circle:")


def feedback_form(ckpt: Path, inp: "ImageInput", probs: np.ndarray, class_names) -> None:
    """Agree / disagree with the prediction; stored in the local feedback database."""
    from core.feedback import FeedbackRecord

    pred = class_names[int(np.argmax(probs))]
    with st.expander("Give feedback on this prediction"):
        with st.form("ex_feedback"):
            verdict = st.radio("Do you agree with the prediction?", ["agree", "disagree"], horizontal=True,
                               key="fb_verdict")
            correct = st.selectbox("Correct class (if you disagree)", list(class_names), key="fb_class")
            comment = st.text_area("Comment", max_chars=2000, key="fb_comment")
            region = st.session_state.get("an_region") if st.session_state.get("an_region_sha") == inp.sha else None
            use_region = st.checkbox("Attach the region drawn on the Annotate page", value=region is not None,
                                     disabled=region is None, key="fb_region")
            consent = st.checkbox("I consent to storing this image with my feedback (otherwise only its "
                                  "fingerprint is kept)", key="fb_consent")
            sent = st.form_submit_button("Save feedback")
        if sent:
            store = svc.feedback_store()
            meta = svc.metadata(ckpt)
            rid = store.add(FeedbackRecord(
                image_sha256=inp.sha, checkpoint=ckpt.name,
                checkpoint_sha256=meta.get("model_sha256"), predicted=pred,
                probabilities={c: float(p) for c, p in zip(class_names, probs)}, verdict=verdict,
                correct_class=correct if verdict == "disagree" else pred, comment=comment,
                region=region if use_region else None, consent=consent, image=inp.image if consent else None,
                image_name=inp.name if consent else None))
            st.session_state.setdefault("my_feedback", []).append(rid)
            st.success(f"Saved as feedback record {rid}." + ("" if consent else
                       " Without consent only the image's fingerprint is kept, not the image or its file name."))
    my_feedback()


def my_feedback() -> None:
    """The feedback this browser session gave, with a button to delete each record."""
    ids = st.session_state.get("my_feedback") or []
    if not ids:
        return
    store = svc.feedback_store()
    rows = store.rows(ids)
    with st.expander(f"Your feedback in this session ({len(rows)})"):
        for r in rows:
            c1, c2 = st.columns([5, 1])
            c1.write(f"Record {r['id']} · {r['created']} · {r['checkpoint']}: model said {r['predicted']}, you "
                     f"{r['verdict']}d" + (f" (correct: {r['correct_class']})" if r["verdict"] == "disagree" else "")
                     + (f" · “{r['comment']}”" if r["comment"] else "")
                     + (" · image kept with your consent" if r["image_png"] is not None else " · no image kept"))
            if c2.button("Delete", key=f"fb_delete_{r['id']}"):
                store.delete(r["id"])
                st.session_state["my_feedback"] = [i for i in ids if i != r["id"]]
                st.rerun()


def colour_legend(colormap: str = "turbo") -> np.ndarray:
    """A horizontal colour bar image (uint8) from 0 (no support) to 1 (strongest support)."""
    bar = np.tile(np.linspace(0, 1, 256)[None, :], (14, 1))
    return colorize(bar, colormap)


def show_legend(colormap: str = "turbo") -> None:
    st.image(colour_legend(colormap), caption="0 = no support  →  1 = strongest support for the explained class",
             width="stretch")


def params_form_fields(method: str, prefix: str, defaults: Optional[dict] = None) -> dict:
    """Widgets for a method's tunable parameters (call inside an st.form); returns the chosen values."""
    cls = EXPLAINERS[method]
    base = {f.name: f.default for f in fields(cls.Params)}
    base.update(FAST_DEFAULTS.get(method, {}))
    base.update(defaults or {})
    out = {}
    for name, (kind, spec) in PARAM_UI.get(method, {}).items():
        key = f"{prefix}_{method}_{name}"
        label = name.replace("_", " ")
        if name == "n_segments":
            label = "segment count (SLIC)"
        if kind == "bool":
            out[name] = st.checkbox(label, value=bool(base[name]), key=key)
        elif kind == "choice":
            out[name] = st.selectbox(label, spec, index=spec.index(base[name]), key=key)
        elif kind == "int":
            lo, hi, step = spec
            out[name] = int(st.number_input(label, lo, hi, int(base[name]), step, key=key))
        else:
            lo, hi, step = spec
            out[name] = float(st.number_input(label, lo, hi, float(base[name]), step, key=key))
    return out


def default_params(method: str) -> dict:
    cls = EXPLAINERS[method]
    base = {f.name: f.default for f in fields(cls.Params)}
    base.update(FAST_DEFAULTS.get(method, {}))
    return {k: base[k] for k in PARAM_UI.get(method, {})}


#: Outline colours: the true (or drawn) lesion and the segmenter's predicted lesion, never the same.
TRUE_OUTLINE = (0, 255, 255)  # cyan
PREDICTED_OUTLINE = (255, 0, 255)  # magenta


def render_overlay(image: np.ndarray, e, alpha: float, mask: Optional[np.ndarray] = None,
                   show_segments: bool = True, predicted: Optional[np.ndarray] = None) -> np.ndarray:
    """Heatmap overlay; `mask` (true / drawn lesion) outlined in cyan, `predicted` (segmenter) in magenta."""
    out = overlay(image, e.heatmap(), alpha) if e is not None else np.asarray(image).copy()
    if e is not None and show_segments and e.segments is not None:
        out = boundaries(out, e.segments, weights=e.extras.get("segment_weights"),
                         top=int(e.params.get("num_features", 10)) if e.params.get("num_features", 0) < 1000 else 10)
    if predicted is not None and predicted.any():
        out = mask_outline(out, predicted, PREDICTED_OUTLINE)
    if mask is not None:
        out = mask_outline(out, mask, TRUE_OUTLINE)
    return out


def overlay_for(image_sha: str, image: np.ndarray, e, alpha: float, mask: Optional[np.ndarray] = None,
                show_segments: bool = True, predicted: Optional[np.ndarray] = None) -> np.ndarray:
    """`render_overlay`, remembered per image, map and drawing settings: re-showing an explanation (a repeated
    Explain, another opacity and back) re-sends the picture instead of drawing it again."""
    key = (image_sha, e.method, repr(sorted(e.params.items())),
           hashlib.sha1(np.ascontiguousarray(e.attribution).tobytes()).hexdigest(),
           e.segments is not None and show_segments, round(float(alpha), 3),
           None if mask is None else hashlib.sha1(np.packbits(mask).tobytes()).hexdigest(),
           None if predicted is None else hashlib.sha1(np.packbits(predicted).tobytes()).hexdigest())
    return _overlay(key, image, e, alpha, mask, show_segments, predicted)


@st.cache_data(max_entries=48, show_spinner=False)
def _overlay(key: tuple, _image, _e, alpha: float, _mask, show_segments: bool, _predicted) -> np.ndarray:
    return render_overlay(_image, _e, alpha, _mask, show_segments, _predicted)


def outline_legend(true_mask: bool, predicted: bool) -> str:
    parts = (["cyan: true lesion mask"] if true_mask else []) + (["magenta: *predicted* lesion (segmenter)"]
                                                                  if predicted else [])
    return "Outlines · " + " · ".join(parts) if parts else ""


def predicted_lesion_view(ckpt: Path, inp: "ImageInput", prefix: str, ood: bool = False):
    """Toggle and describe the segmenter's predicted lesion (ultrasound checkpoints with a segmenter), with a warning
    when the classifier calls the scan normal and an outline is drawn anyway (the prediction is cached).

    Returns the PredictedLesion when the user shows it (None otherwise, or when no segmenter suits the image).
    """
    from core.segmentation import describe_lesion

    if svc.segmenter_for(ckpt) is None:
        return None
    if ood:
        st.caption("No predicted lesion outline: the image is out of distribution for this model.")
        return None
    if not st.checkbox("Outline the predicted lesion", value=True, key=f"{prefix}_pred_lesion",
                       help="A U-Net segmenter outlines the lesion it finds (magenta). It is a prediction, not a "
                            "radiologist's or the dataset's mask (cyan)."):
        return None
    les = svc.predicted_lesion(ckpt, inp.image, inp.sha)
    quality = f" (segmenter {les.segmenter}, test Dice {les.test_dice:.2f} on lesion images)." if les.test_dice else ""
    missed = les.test_missed
    st.caption(describe_lesion(les.measurements) + quality
               + (" A predicted outline is smoother than a real margin: judge the margin on the image itself."
                  if les.measurements else "")
               + (f" {missed.sentence('The segmenter')[:-1]}: check that the outline is on the lesion, and look for one "
                  "it missed."
                  if missed is not None and missed.missed else ""))
    on_negative = svc.outline_on_negative(ckpt)
    if on_negative is not None and les.mask.any() and svc.classifier(ckpt).class_names[
            int(svc.predict(ckpt, inp.image, inp.sha).argmax())] == on_negative.negative:
        st.warning(on_negative.sentence(), icon="⚠️")
    return les


def localisation_region(inp: "ImageInput", lesion) -> tuple[Optional[np.ndarray], str]:
    """The region localisation scores use: the true mask when the image has a lesion in it, else the
    predicted lesion (labelled). Returns (bool mask or None, label)."""
    if inp.mask is not None and inp.mask.any():
        return inp.mask, "true lesion mask"
    if lesion is not None and lesion.mask.any():
        return lesion.mask, "predicted lesion (segmenter), not a true mask"
    return None, ""


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def run_order(methods: list[str]) -> list[str]:
    """`methods` in the order they are computed: the fast ones (gradient maps, a second or so) before the slow
    perturbation methods (LIME, SHAP: seconds to a minute), each group in the user's order, so a page can show the
    first maps while the slow ones still run."""
    return sorted(methods, key=lambda m: bool(getattr(EXPLAINERS.get(m), "slow", False)))


def run_methods(ckpt: Path, inp: ImageInput, methods: list[str], params: dict[str, dict],
                target: Optional[int] = None, on_result: Optional[Callable[[str, object], None]] = None) -> dict:
    """Run (or fetch cached) explanations with a progress bar; returns {method: Explanation} in `methods`' order.

    Cached results come first, then the fast methods, then the slow ones (`run_order`); `on_result(method,
    explanation)` is called as each one is ready, so the page can draw it at once (a Grad-CAM map is on screen while
    LIME still runs). Perturbation methods on a field of many tiles of a patch model (an H&E region on the 50 px IDC
    model: every perturbed sample re-classifies every tile) are skipped with a message instead of running for many
    minutes.
    """
    results, todo = {}, []
    n_tiles = svc.tile_count(ckpt, inp.image)
    if n_tiles > MAX_PERTURBATION_TILES:
        slow = [m for m in methods if m in PERTURBATION_METHODS]
        if slow:
            st.warning(f"{', '.join(METHOD_LABELS[m] for m in slow)} skipped: this image is {n_tiles} tiles of the "
                       f"model's patch size, and each of their perturbed samples would re-classify every tile (many "
                       "minutes on a CPU). Gradient methods map the whole field; for LIME, SHAP or occlusion upload one "
                       "patch or a small region.", icon=":material/timer:")
        methods = [m for m in methods if m not in PERTURBATION_METHODS]
    shown = (lambda m, e: None) if on_result is None else on_result
    for m in methods:
        hit = svc.cached_explanation(ckpt, inp.sha, m, params.get(m, {}), target)
        if hit is not None:
            results[m] = hit
            shown(m, hit)
        else:
            todo.append(m)
    if todo:
        bar = st.progress(0.0, text="Explaining…")
        for i, m in enumerate(run_order(todo)):
            def prog(f, i=i, m=m):
                bar.progress(min(1.0, (i + f) / len(todo)), text=f"{METHOD_LABELS[m]}: {f:.0%}")
            try:
                results[m] = svc.explain(ckpt, inp.image, inp.sha, m, params.get(m, {}), target, prog)
            except (ValueError, TypeError) as exc:
                st.error(f"{METHOD_LABELS[m]} could not run with these settings: {exc}")
                continue
            shown(m, results[m])
        bar.empty()
    return {m: results[m] for m in methods if m in results}


def canvas_region(image: np.ndarray, key: str, mode: str = "freedraw", display_width: int = 480,
                  stroke_color: str = "#00e5ff", label: str = "") -> Optional[np.ndarray]:
    """Let the user draw on the image; returns the drawn region as a bool mask (H, W) or None.

    Closed free-hand loops are filled; rectangles, circles and polygons are filled shapes.
    """
    import cv2
    from streamlit_drawable_canvas import st_canvas

    h, w = image.shape[:2]
    scale = display_width / w
    dh = int(round(h * scale))
    res = st_canvas(fill_color="rgba(0, 229, 255, 0.25)", stroke_width=4, stroke_color=stroke_color,
                    background_image=Image.fromarray(image).resize((display_width, dh)), height=dh,
                    width=display_width, drawing_mode=mode, return_image_data=True, key=key, label=label)
    try:
        data = res.image_data
    except Exception:  # nothing drawn yet / no frontend (headless tests)
        return None
    if data is None:
        return None
    alpha = (np.asarray(data)[..., 3] > 0).astype(np.uint8)
    if not alpha.any():
        return None
    contours, _ = cv2.findContours(alpha, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = alpha.copy()
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    return cv2.resize(filled, (w, h), interpolation=cv2.INTER_NEAREST) > 0


def _plain(key: str) -> str:
    """Recorded metric keys in plain words for tables ('val_roc_auc_macro' -> 'validation ROC AUC (macro)')."""
    key = key.replace("val_", "validation ").replace("roc_auc_macro", "ROC AUC (macro)").replace("roc_auc", "ROC AUC")
    return key.replace("_", " ")


def selection_rows(ms: dict) -> list[dict]:
    """The candidates of a recorded model selection as table rows: every row has the same columns (the candidate,
    its metrics, the settings text last); a column that some candidate did not record reads "—" there (and holds
    text throughout) instead of a blank "None"."""
    raw = [{"candidate": c.get("candidate") or c.get("name"),
            **{_plain(k): (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()
               if k not in ("candidate", "name", "settings", "command")}, "settings": c.get("settings")}
           for c in ms.get("candidates", [])]
    cols = [k for k in dict.fromkeys(k for r in raw for k in r) if k != "settings"] + ["settings"]
    gaps = {k for k in cols if any(r.get(k) is None for r in raw)}
    return [{k: ("—" if r.get(k) is None else str(r[k])) if k in gaps else r[k] for k in cols} for r in raw]


def model_selection(ms: dict | None) -> None:
    """How the checkpoint was chosen among its training candidates (validation split only)."""
    if not ms:
        return
    with st.expander(f"How this checkpoint was chosen ({len(ms.get('candidates', []))} candidates; the test split was not used)"):
        st.write(f"Rule: {ms.get('rule') or ms.get('criterion')}.")
        st.dataframe(selection_rows(ms), hide_index=True)
        st.write(f"Chosen: **{ms.get('chosen')}**")
        if ms.get("note"):
            st.caption(ms["note"])


def ensemble_members(meta: dict) -> None:
    """An ensemble checkpoint's members: what each is, how it did alone, and the command that trained it."""
    ens = meta.get("ensemble")
    if not ens:
        return
    st.subheader("Ensemble members")
    st.markdown(f"This checkpoint is one model made of {len(ens['members'])} trained models: {ens['rule']}. "
                f"Every prediction, and every perturbation an explanation runs, costs {ens['forward_cost']}. "
                "Grad-CAM shows the mean of the members' maps.")
    rows = []
    for i, m in enumerate(ens["members"], start=1):
        head = m.get("head") or {}
        what = (f"linear head ({head.get('solver')})" if head.get("solver") else
                f"Dense {' / '.join(map(str, head.get('units', []))) or 'none'}")
        scales = head.get("scales") or [m.get("input_size")]
        shift = m.get("in_ensemble") or {}
        w = m.get("weights") or {}
        trunk = (f"{m.get('backbone')}, the encoder of lesion segmenter {w.get('segmenter')}"
                 if w.get("source") == "segmenter encoder" else
                 f"{m.get('backbone')} from {Path(w['path']).name}" if w.get("path") else
                 f"{m.get('backbone')} ({w.get('source')})")
        rows.append({"member": f"{i}. {m.get('name')}", "bundle it was trained as": m.get("bundle"),
                     "backbone": trunk + (f", cut at {head['trunk_layer']}" if head.get("trunk_layer") else ""),
                     "input (px)": " + ".join(map(str, scales)), "head": what,
                     "validation accuracy alone": fmt_metric(m.get("val_accuracy")),
                     "validation ROC AUC alone": fmt_metric(m.get("val_roc_auc_macro")),
                     "same prediction inside the ensemble (val)": fmt_metric(shift.get("val_same_prediction_share"))})
    st.dataframe(rows, hide_index=True, use_container_width=True)
    with st.expander("Members' training commands"):
        for i, m in enumerate(ens["members"], start=1):
            st.markdown(f"{i}. `{m.get('command')}` (model sha256 {str(m.get('model_sha256'))[:16]}…)")


def small_data_evidence(meta: dict, ckpt: Optional[Path] = None) -> None:
    """Patch settings, model selection, a recorded comparison, group-wise cross-validation and external checks."""
    model_selection(meta.get("model_selection"))
    pc = meta.get("patches")
    if pc:
        st.subheader("Patch model")
        st.write(f"Trained on {pc['train_patches_per_image_per_epoch']} tissue-aware random crops of "
                 f"{pc['patch_size']} px per image per epoch (resized to {meta.get('input_size')} px"
                 + (f", crop side jittered by ±{pc['scale_jitter']:g} octave" if pc.get("scale_jitter") else "")
                 + f"). A whole image is predicted as the mean of its tiles on a {pc['stride']} px grid; "
                 "explanations cover the whole image.")
    operating_point_view(meta)
    comparison_view(meta, ckpt)
    better_choice_view(meta, ckpt)
    cv = meta.get("cross_validation")
    if cv:
        st.subheader("Group-wise cross-validation")
        st.write(f"Accuracy **{cv['accuracy_mean']:.3f}** (mean of {len(cv['folds'])} folds; range "
                 f"{cv['accuracy_min']:.3f}–{cv['accuracy_max']:.3f}); pooled over all held-out images "
                 f"{cv['pooled_accuracy']:.3f}" + (f", ROC AUC {cv['pooled_roc_auc']:.3f}" if cv.get("pooled_roc_auc")
                                                   is not None else "") + ".")
        if cv.get("pooled_balanced_accuracy") is not None:
            st.write(f"Pooled balanced accuracy **{cv['pooled_balanced_accuracy']:.3f}** (the mean of the "
                     "per-class recalls: the honest figure when one class dominates).")
        if cv.get("pooled_recall"):
            st.write("Pooled recall (sensitivity): " + ", ".join(
                f"{c} **{r:.3f}** (of {cv['pooled_support'][c]})" for c, r in cv["pooled_recall"].items()) + ".")
        pl = cv.get("patient_level")
        if pl:
            ci = pl.get("accuracy_ci95_exact")
            st.write(f"Per patient ({pl['n_patients']} patients; a patient's probability is the mean over their "
                     f"images): accuracy **{pl['accuracy']:.3f}**" + (f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else "")
                     + (f", balanced accuracy {pl['balanced_accuracy']:.3f}" if pl.get("balanced_accuracy") is not None
                        else "") + (f", ROC AUC {pl['roc_auc']:.3f}" if pl.get("roc_auc") is not None else "")
                     + "; recall " + ", ".join(f"{c} {r:.3f} (of {pl['support'][c]})" for c, r in pl["recall"].items())
                     + f"; patient recognition rate {pl['patient_recognition_rate']:.3f}.")
            with st.expander("Every patient in cross-validation"):
                st.dataframe([{"patient": r["patient"], "true": r["true"], "predicted": r["predicted"],
                               "images": r["n_images"], "images correct": round(r["image_accuracy"], 3),
                               **{f"mean p({c})": round(v, 3) for c, v in r["probabilities"].items()}}
                              for r in pl["patients"]], hide_index=True)
        by_type = svc.subtypes_for(ckpt, "cv") if ckpt is not None else None
        if by_type:
            subtype_table(by_type, "cross-validation")
        if cv.get("note"):
            st.caption(cv["note"])
        diff = cv.get("differs_from_checkpoint")
        if diff:
            st.caption("Settings that differ from this checkpoint's training: " + "; ".join(
                f"{k} {v['checkpoint']} → {v['cross_validation']}" for k, v in diff.items()) + ".")
        with st.expander("Details: how the cross-validation was run"):
            st.caption(cv["method"])
            if cv.get("command"):
                st.caption(f"Command: `{cv['command']}`")
        st.dataframe([{"fold": f["fold"], "held-out groups": describe_groups(f["test_groups"]),
                       "images": f["n_test"], "accuracy": round(f["accuracy"], 3),
                       **({"balanced accuracy": round(f["balanced_accuracy"], 3)} if f.get("balanced_accuracy") is not None
                          else {}),
                       **({"ROC AUC": round(f["roc_auc"], 3)} if f.get("roc_auc") is not None else {})}
                      for f in cv["folds"]], hide_index=True)
        aucs = [f["roc_auc"] for f in cv["folds"] if f.get("roc_auc") is not None]
        if len(aucs) > 1 and cv.get("pooled_roc_auc") is not None:
            st.caption(f"ROC AUC within each fold averages {np.mean(aucs):.3f}; pooled over folds it is "
                       f"{cv['pooled_roc_auc']:.3f}, lower because each fold's model scores on its own scale "
                       "(uncalibrated).")
    audit = meta.get("near_duplicate_audit")
    if audit and audit["n_excluded"] == 0:
        st.subheader(f"{audit['split'].capitalize()} split: repeat-scan check")
        st.write(f"None of the {audit['n_split']} {audit['split']} images has a near-duplicate (a repeat scan of the "
                 f"same lesion) in another split, so its metrics above are not inflated by repeat scans.")
        with st.expander("Details: how repeat scans were found"):
            st.caption(audit["method"])
    elif audit:
        m = audit["metrics"]
        ci = m.get("accuracy_ci95")
        st.subheader(f"{audit['split'].capitalize()} split without repeat scans")
        st.write(f"{audit['n_excluded']} of {audit['n_split']} {audit['split']} images have a near-duplicate (a repeat "
                 f"scan of the same lesion) in another split. On the other {m['n']}: accuracy **{m['accuracy']:.3f}**"
                 + (f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else "")
                 + (f", macro ROC AUC {m['roc_auc_macro']:.3f}" if m.get("roc_auc_macro") is not None else "")
                 + "; recall " + ", ".join(f"{r['class']} {r['recall']:.3f} ({r['tp']}/{r['support']})"
                                           for r in m["per_class"]) + ".")
        st.caption(audit["method"])
    for ext in meta.get("external_checks", []):
        st.subheader(f"External check · {ext['name']}")
        st.warning(f"{ext['label']}. {ext['n_correct']} of {ext['n_images']} external images correct "
                   f"({ext['accuracy']:.0%}). Source: {ext.get('citation') or ext['root']}")
        st.dataframe([{"image": Path(r["path"]).name, "subtype": r.get("subtype"), "magnification":
                       f"{r['magnification']}x" if r.get("magnification") else "", "true": r["true"],
                       "predicted": r["predicted"], "correct": "✓" if r["correct"] else "✗",
                       **{f"p({c})": round(v, 3) for c, v in r["probabilities"].items()},
                       "out of distribution": r.get("out_of_distribution"),
                       "external": "yes" if r.get("external", True) else "no: patient in training data"}
                      for r in ext["images"]],
                     hide_index=True)


def subtype_table(rows: list[dict], where: str) -> None:
    """Which tumour types the model gets right: one row per subtype (`svc.subtypes_for`)."""
    st.subheader(f"By tumour subtype ({where})")
    weak = weak_subgroups(rows)
    st.write("Share of each subtype's images classified as its class" + (f": below 80% on {weak}." if weak else "."))
    st.dataframe([{"subtype": r["subgroup"].replace("_", " "), "class": r["class"], "images": r["images"],
                   "images right": r["images_correct"], "recall": round(r["recall"], 3),
                   **({"patients right": f"{r['patients_correct']} of {r['patients']}"} if "patients" in r else {}),
                   "mean p(true class)": round(r["mean_p_true"], 3)} for r in rows],
                 hide_index=True, width="stretch")
    st.caption("A patient is right when the mean probability over their images of that subtype picks its class; "
               "a patient with slides of two subtypes counts in both."
               + (" Out-of-fold probabilities, each fold's model uncalibrated." if where == "cross-validation" else ""))


def _blend(image: np.ndarray, rgb: np.ndarray, alpha: float, where: np.ndarray) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[where] = (1 - alpha) * out[where] + alpha * rgb[where].astype(np.float32)
    return out.astype(np.uint8)


def tile_map_view(ckpt: Path, inp: "ImageInput", clf, target: int) -> None:
    """'Where in the tissue': the model's probability for `target` tile by tile, beside the field (patch models)."""
    tm = svc.tile_map(ckpt, inp.image, inp.sha)
    if tm is None:
        return
    st.subheader(f"Where in the tissue · P({clf.class_names[target]}) per {tm.tile} px tile")
    values = tm.pixel_map(target)
    rgb = svc.tiles.colour_map(values)
    c1, c2 = st.columns(2)
    c1.image(inp.image, caption=inp.name, width="stretch")
    c2.image(_blend(inp.image, rgb, 0.55, ~np.isnan(values)), width="stretch",
             caption=f"Blue 0 → red 1; glass tiles left clear. {tm.share_above(target):.0%} of "
                     f"{int((~np.isnan(tm.probs[:, target])).sum())} tissue tiles above 0.5.")
    st.caption("Each tile is classified on its own, as the model was trained; the headline prediction is the mean "
               "over all tiles. The map shows where the model sees the class, not a segmentation.")


def mosaic_view(ckpt: Path, clf, prefix: str) -> None:
    """IDC test patients: their patches at their slide positions, ground truth beside the model's map."""
    patients = svc.mosaic_patients(ckpt)
    if not patients or clf.num_classes != 2:
        return
    st.subheader("Slide mosaics · test patients")
    labels = {p["patient"]: f"patient {p['patient']} · {p['patches']} patches, {p['positive']} "
                            f"{clf.class_names[1].replace('_', ' ')}" for p in patients}
    patient = st.selectbox("Patient (never seen in training)", list(labels)[:12], format_func=labels.get,
                           key=f"{prefix}_mosaic_patient")
    mo, probs = svc.mosaic(ckpt, patient)
    truth = mo.paint(mo.labels.astype(np.float32))
    model = mo.paint(probs[:, 1])
    where = mo.truth >= 0
    c1, c2, c3 = st.columns(3)
    c1.image(mo.image, caption=f"Patches at their slide positions (scale {mo.scale:.2f})", width="stretch")
    c2.image(_blend(mo.image, svc.tiles.colour_map(truth), 0.6, where), width="stretch",
             caption=f"Ground truth: red = {clf.class_names[1].replace('_', ' ')} (pathologist's annotation)")
    c3.image(_blend(mo.image, svc.tiles.colour_map(model), 0.6, where), width="stretch",
             caption=f"Model: P({clf.class_names[1].replace('_', ' ')}), blue 0 → red 1")
    pred = probs.argmax(1)
    st.caption(f"{int((pred == mo.labels).sum())} of {len(pred)} patches classified as annotated. This set holds "
               "a sample of each slide's patches, so the mosaic is sparse; white is slide not in the set.")


def comparison_view(meta: dict, ckpt: Optional[Path] = None) -> None:
    """This checkpoint beside another trained on the same split (e.g. the simple CNN baseline): metrics and ROC
    curves on the same test images, so a user sees what transfer learning buys."""
    comp = meta.get("comparison")
    if not comp or ckpt is None:
        return
    from core.evaluation import curves, predictions_from_bundle

    st.subheader(f"Compared with {comp['name']} on the same test images")
    y, p, _ = predictions_from_bundle(ckpt, "test")
    other = np.asarray(comp["test_probabilities"])
    mine = meta["metrics"]["test"]
    rows = []
    for name, backbone, m, v in ((meta.get("name"), meta.get("backbone"), mine, meta["metrics"].get("val", {})),
                                 (comp["name"], comp.get("backbone"), comp["metrics"]["test"],
                                  comp["metrics"].get("val", {}))):
        rows.append({"checkpoint": name, "network": backbone, "validation balanced accuracy":
                     round(v.get("balanced_accuracy") or 0, 3), "test balanced accuracy": round(m["balanced_accuracy"], 3),
                     "test ROC AUC": round(m["roc_auc_macro"] or 0, 3), "test accuracy": round(m["accuracy"], 3)})
    st.dataframe(rows, hide_index=True, width="stretch")
    pos = meta["class_names"][-1]
    fig = go.Figure()
    for name, probs in ((meta.get("name"), p), (comp["name"], other)):
        c = curves(y, probs, meta["class_names"])[pos]
        fig.add_trace(go.Scatter(x=c["fpr"], y=c["tpr"], mode="lines", name=f"{name} (AUC {c['auc']:.3f})"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"), showlegend=False))
    fig.update_layout(xaxis_title="false positive rate", yaxis_title=f"sensitivity for {pos.replace('_', ' ')}",
                      height=360, margin=dict(l=10, r=10, t=10, b=10))
    st.plotly_chart(fig, width="stretch", key="comparison_roc")
    st.caption(f"The committed checkpoint was chosen on the validation split. {comp['name']}: "
               f"`{comp.get('command')}`")


def better_choice_view(meta: dict, ckpt: Optional[Path] = None) -> None:
    """Which checkpoint suits which images: this model's external checks against the checkpoint trained on that
    data (its cross-validation), and other checkpoints' external checks on this model's data."""
    kind = meta.get("dataset", {}).get("kind")
    rows = []
    for b in (s for s in svc.bundle_statuses() if s.ok and (ckpt is None or s.path != ckpt)):
        om = svc.metadata(b.path)
        okind, ocv = om.get("dataset", {}).get("kind"), om.get("cross_validation") or {}
        for e in meta.get("external_checks", []):
            if e["name"] == okind and ocv.get("pooled_accuracy") is not None:
                rows.append({"images": f"{okind} ({e['n_images']})", "this checkpoint": f"{e['accuracy']:.3f} (external)",
                             "other checkpoint": f"{b.name}: {ocv['pooled_accuracy']:.3f} (cross-validation)",
                             "better choice": b.name if ocv["pooled_accuracy"] > e["accuracy"] else meta.get("name")})
        own = (meta.get("cross_validation") or {}).get("pooled_accuracy")
        for e in om.get("external_checks", []):
            if e["name"] == kind and own is not None:
                rows.append({"images": f"{kind} ({e['n_images']})", "this checkpoint": f"{own:.3f} (cross-validation)",
                             "other checkpoint": f"{b.name}: {e['accuracy']:.3f} (external)",
                             "better choice": meta.get("name") if own >= e["accuracy"] else b.name})
    if rows:
        st.subheader("Which checkpoint for which images")
        st.dataframe(rows, hide_index=True, width="stretch")
        st.caption("Accuracy on a dataset from a checkpoint trained on it (cross-validation: held-out groups) against "
                   "a checkpoint that never saw it (external check). Pick the checkpoint made for your images.")


def effect_note(e) -> None:
    """How far a perturbation method's perturbed images moved p(explained class); a warning when under one
    percentage point (the map then ranks very small effects). Nothing for gradient methods."""
    r = e.perturbed_range
    if r is None:
        return
    moved = f"Over the images {METHOD_LABELS.get(e.method, e.method)} perturbed, P({e.class_name}) ranged " \
            f"{r[0]:.1%}–{r[1]:.1%}."
    if e.weak_effect:
        st.warning(f"{moved} Hiding parts of this image **barely moves the prediction** (under one percentage "
                   "point): the map ranks very small effects, so read it as weak evidence of where the model looks.",
                   icon=":material/info:")
    else:
        st.caption(moved)


def timed_on(machine) -> str:
    """' Seconds timed on AMD EPYC (AVX512_BF16), 2 cores, forward openvino float32; perturbed images on
    openvino-bf16.' from an explanations.json `machine` record, then its `note` (e.g. that the CPU was shared while
    timing); '' for files that predate it."""
    if not machine:
        return ""
    cpu = machine.get("cpu") or machine.get("platform") or "an unrecorded CPU"
    note = f" {machine['note']}" if machine.get("note") else ""
    if machine.get("ray"):
        return f" Seconds timed on Ray workers (the run was started on {cpu}).{note}"
    feats = [f for f in machine.get("cpu_features", []) if f in BF16_FEATURES]
    return (f" Seconds timed on {cpu}" + (f" ({', '.join(feats).upper()})" if feats else "")
            + f", {machine.get('cores', '?')} cores, forward {machine.get('forward', '?')}; perturbed images on "
            f"{machine.get('perturbation_forward', '?')}.{note}")


def effect_caption(e) -> str:
    """A short tail for an image caption: how far a perturbation method moved p(explained class); '' otherwise."""
    r = e.perturbed_range
    if r is None:
        return ""
    return f" · perturbed P {r[0]:.1%}–{r[1]:.1%}" + (" (under 1 point: weak effect)" if e.weak_effect else "")


def evidence_view(e, prefix: str) -> object:
    """When a method finds no positive evidence for the explained class, say so and offer the evidence against
    it (signed view) instead of a blank map; also on request. Says how far a perturbation method moved the
    prediction (`effect_note`). Returns the explanation to draw."""
    effect_note(e)
    blank = not e.has_positive_evidence
    if blank:
        st.warning(f"{METHOD_LABELS.get(e.method, e.method)} found **no evidence for {e.class_name}** in this image: "
                   "every region lowers its probability. The map below shows the evidence *against* it instead.",
                   icon=":material/search:")
    against = st.toggle("Show evidence against the class", value=blank, key=f"{prefix}_against_{e.method}",
                        help="Signed view: regions that pull the prediction away from the explained class.")
    return e.against() if against else e


def _ci(ci) -> str:
    return f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else ""


def operating_point_view(meta: dict) -> None:
    """The model card's operating point: threshold chosen on validation, test sensitivity / specificity at it."""
    op = meta.get("operating_point")
    if not op:
        return
    t = op["test"]
    st.subheader(f"Operating point · {op['positive_class']} against the rest")
    st.write(f"Call **{op['positive_class']}** when its probability is at least **{op['threshold']:.3f}** (chosen on "
             f"the {op.get('chosen_on', 'validation')} for sensitivity ≥ {op['target_sensitivity']:.2f}). On the test split: sensitivity "
             f"**{t['sensitivity']:.3f}**{_ci(t['sensitivity_ci95'])} ({t['tp']} of {t['tp'] + t['fn']}), specificity "
             f"**{t['specificity']:.3f}**{_ci(t['specificity_ci95'])} ({t['tn']} of {t['tn'] + t['fp']}).")
    where = op.get("chosen_on", "validation")
    st.caption(f"Rule: {op['rule']}. {where[0].upper() + where[1:]} at this threshold: sensitivity {op['val']['sensitivity']:.3f}, "
               f"specificity {op['val']['specificity']:.3f}.")


def operating_point_note(meta: dict, probs: np.ndarray, class_names) -> None:
    """On Explain: whether this image's probability crosses the model card's operating point."""
    op = meta.get("operating_point")
    if not op or op["positive_class"] not in class_names:
        return
    p = float(probs[list(class_names).index(op["positive_class"])])
    crosses = p >= op["threshold"]
    (st.warning if crosses else st.info)(
        f"P({op['positive_class']}) {p:.3f} is {'at or above' if crosses else 'below'} the operating point "
        f"{op['threshold']:.3f} (set on the {operating_point_source(op)} for sensitivity ≥ {op['target_sensitivity']:.2f}): "
        + (f"at this operating point the case counts as **possibly {op['positive_class']}**." if crosses else
           f"at this operating point the case is not flagged as {op['positive_class']}."))


def subtype_caution(ckpt: Path, probs: np.ndarray, class_names) -> None:
    """On Explain: what the cross-validation says about this call (`core.evaluation.subtype_caution`)."""
    said = subtype_caution_of(ckpt, probs, list(class_names), svc.metadata(ckpt), rows=svc.subtypes_for)
    if said:
        st.caption(said["text"])


def segmenter_card(ckpt: Path) -> None:
    """The lesion segmenter's card (ultrasound checkpoints with a segmenter): Dice / IoU with intervals, by class,
    false-positive area on scans without a lesion, cross-validation when recorded."""
    seg = svc.segmenter_for(ckpt)
    if seg is None:
        return
    meta = svc.metadata(seg)
    test = meta.get("metrics", {}).get("test", {})
    cv = (meta.get("cross_validation") or {}).get("pooled") or {}
    st.header(f"Lesion segmenter · {seg.name}")
    st.markdown("Outlines the lesion on Explain, Compare and Annotate (magenta, labelled *predicted*). "
                "Dice and IoU measure the overlap of the predicted and the radiologists' outlines (1 = identical).")
    c1, c2, c3 = st.columns(3)
    d = test.get("dice") or {}
    if cv.get("dice", {}).get("mean") is not None:
        shorter = bool((meta.get("cross_validation") or {}).get("differs_from_checkpoint"))
        c1.metric("Dice (cross-validated" + (", shorter training)" if shorter else ")"), f"{cv['dice']['mean']:.3f}",
                  help="Every image held out once, repeat scans kept together. " + (
                      "Each fold trained for fewer epochs than the checkpoint (see Details), so this estimate is "
                      "likely on the low side." if shorter else ""))
    c2.metric(f"Dice, test split (n = {test.get('n_lesion_images', '?')} lesions)", fmt_metric(d.get("mean")))
    c3.metric("IoU, test split", fmt_metric((test.get("iou") or {}).get("mean")))
    fp = test.get("no_lesion_images") or {}
    missed = svc.missed_lesions(seg)
    on_negative = svc.outline_on_negative(ckpt)
    st.caption(f"Test Dice {fmt_metric(d.get('mean'))}{_ci(d.get('ci95'))} over the images with a lesion"
               + (f"; on the {fp['n']} scans without a lesion, {fp['false_positive_area_mean']:.1%} of the image is "
                  f"called lesion on average and {fp['share_with_no_predicted_lesion']:.0%} get no outline at all"
                  if fp else "") + "." + (f" {missed.sentence()}" if missed is not None else "")
               + (f" {on_negative.summary()}" if on_negative is not None else "")
               + " Evaluation shows each lesion's Dice, the lesions it missed and the predicted shape by class.")
    rows = [{"class": c, "Dice (test)": fmt_metric(v["dice"]["mean"]), "95% CI": "–".join(f"{x:.3f}" for x in v["dice"].get("ci95") or []),
             "IoU (test)": fmt_metric(v["iou"]["mean"]), "lesions": v["dice"]["n"],
             **({"Dice (cross-validated)": fmt_metric(cv["by_class"][c]["dice"]["mean"])}
                if c in cv.get("by_class", {}) else {})}
            for c, v in test.get("by_class", {}).items()]
    if rows:
        st.dataframe(rows, width="stretch", hide_index=True)
    model_selection(meta.get("model_selection"))
    with st.expander("Details: how the segmenter was made"):
        cvm = meta.get("cross_validation") or {}
        st.markdown(f"- **Architecture:** {meta.get('architecture', '?')}\n"
                    f"- **Training:** {meta.get('loss', '?')} loss; {meta.get('training', {}).get('epochs', '?')} "
                    f"epochs, {(meta.get('training', {}).get('wall_seconds') or 0) / 60:.0f} min on a CPU\n"
                    f"- **Post-processing** (chosen on validation): threshold "
                    f"{meta.get('postprocessing', {}).get('threshold')}, largest region only "
                    f"{meta.get('postprocessing', {}).get('largest_region_only')}\n"
                    f"- **Split:** the classifier's (repeat scans of a lesion kept together): "
                    f"{meta.get('split', {}).get('counts')}\n"
                    + (f"- **Cross-validation:** {cvm.get('method')}"
                       + (f"; settings that differ from the checkpoint: {cvm['differs_from_checkpoint']}"
                          if cvm.get("differs_from_checkpoint") else "") + "\n" if cvm else "")
                    + f"- **Command:** `{meta.get('command')}`\n- **Git commit:** {meta.get('git_commit')}")


def dataset_thumbnails(ckpt: Path, root: Path, items: list[tuple[str, str, str]], key: str,
                       draw=None, columns: int = 6) -> None:
    """A grid of dataset images, each with "Open in Explain" (the image becomes the current one, with its true class
    and the lesion masks `ckpt`'s split.csv lists). items: (path relative to `root`, true class, caption);
    `draw(image, path)` may draw on a thumbnail (uint8 RGB in, uint8 RGB out)."""
    here = [it for it in items if (root / it[0]).is_file()]
    if len(here) < len(items):
        st.caption(f"{len(items) - len(here)} of these {len(items)} images are not in {root} here.")
    cols = st.columns(columns)
    for i, (rel, true_class, caption) in enumerate(here):
        path = root / rel
        col = cols[i % columns]
        thumb = svc.decode(svc.read_file(str(path))).array
        col.image(draw(thumb, rel) if draw else thumb, caption=caption, width="stretch")
        if col.button("Open in Explain", key=f"{key}_{i}"):
            split_rows = {x["path"]: x for x in svc.read_csv(ckpt / "split.csv")}
            masks = mask_paths(split_rows.get(rel, {}), root)
            st.session_state["selected_example_info"] = {"path": str(path), "class_name": true_class,
                                                         "mask_paths": masks}
            st.switch_page("pages/1_Explain.py")


def segmenter_evaluation(ckpt: Path, split: str) -> None:
    """On Evaluation (ultrasound checkpoints with a segmenter, test or validation split): the Dice of every lesion,
    the lesions it missed with both outlines, and the predicted lesion shape by class beside the radiologists'."""
    from core.segmentation import IRREGULAR_MARGIN, MISSED_DICE, missed_lesions, shape_by_class

    seg = svc.segmenter_for(ckpt)
    rows = svc.segmenter_rows(seg, split) if seg is not None and split in ("test", "val") else []
    lesions = sorted((r for r in rows if float(r.get("true_area") or 0) > 0 and r.get("dice") not in (None, "")),
                     key=lambda r: float(r["dice"]))
    if not lesions:
        return
    where = {"val": "validation"}.get(split, split)
    st.subheader(f"Lesion segmenter · {seg.name} on the {where} split")
    dice = np.array([float(r["dice"]) for r in lesions])
    fig = go.Figure(go.Histogram(x=dice, xbins=dict(start=0.0, end=1.0001, size=0.05), marker_color="#7b3fa0",
                                 hovertemplate="Dice %{x}<br>%{y} lesions<extra></extra>"))
    fig.add_vline(x=MISSED_DICE, line_dash="dot", line_color="grey", annotation_text="missed below",
                  annotation_position="top right")
    fig.update_layout(xaxis=dict(title="Dice of the predicted and the radiologists' outline", range=[0, 1]),
                      yaxis_title="lesions", height=300, margin=dict(l=10, r=10, t=30, b=10), bargap=0.05)
    st.plotly_chart(fig, width="stretch", key="ev_seg_dice")
    missed = missed_lesions(rows, split)
    st.caption(f"Each of the {len(lesions)} {where} images with a lesion: mean Dice {dice.mean():.3f}, median "
               f"{np.median(dice):.3f}. " + (missed.sentence() if missed else ""))
    root = resolve_data_root(svc.metadata(seg), seg)
    worst = [r for r in lesions if float(r["dice"]) < MISSED_DICE] or lesions[:6]
    st.markdown(("**The lesions it missed**" if float(worst[-1]["dice"]) < MISSED_DICE else "**Its lowest Dice**")
                + " · cyan: the radiologists' outline, magenta: the predicted one")
    if not root.is_dir():
        st.info(f"The dataset folder {root} is not available here, so images cannot be shown.")
    else:
        split_rows = {x["path"]: x for x in svc.read_csv(seg / "split.csv")}

        def draw(image: np.ndarray, rel: str) -> np.ndarray:
            true = svc.mask_for(mask_paths(split_rows.get(rel, {}), root), image.shape[:2])
            lesion = svc.predicted_lesion(ckpt, image, svc.sha256(image.tobytes()))
            out = mask_outline(image, lesion.mask, PREDICTED_OUTLINE) if lesion and lesion.mask.any() else image
            return mask_outline(out, true, TRUE_OUTLINE) if true is not None else out

        dataset_thumbnails(ckpt, root, [(r["path"], r["class"], f"{Path(r['path']).name} · Dice "
                                         f"{float(r['dice']):.2f}") for r in worst[:12]], "ev_seg_open", draw)
    names = svc.metadata(seg)["class_names"]
    pred = shape_by_class(rows, names)
    if pred is None:
        return
    true_rows = svc.true_shapes(seg, split)
    true = shape_by_class(true_rows, names) if true_rows else None
    st.markdown("**Predicted lesion shape by class**, as Explain describes it, beside the same measures of the "
                "radiologists' outlines")
    table = []
    for source, summary in (("predicted", pred), ("radiologists'", true)):
        for c in (summary or {}).get("classes", []):
            table.append({"outline": source, "class": c["class"], "lesions outlined": c["outlined"],
                          "median width / depth": _r(c["median width to depth"]),
                          "taller than wide": _pct(c["taller_than_wide"]), "irregular margin": _pct(c["irregular"]),
                          "median margin irregularity": _r(c["median margin irregularity"]),
                          "median circularity": _r(c["median circularity"])})
    st.dataframe(table, width="stretch", hide_index=True)
    st.caption(shape_separation_sentence(pred, true)
               + f" Margins are called irregular from an irregularity (1 − area / convex-hull area) of "
                 f"{IRREGULAR_MARGIN}.")


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def shape_separation_sentence(pred: dict, true: Optional[dict]) -> str:
    """How well each shape measure tells the positive class from the other lesions, on the predicted outlines and,
    where measured, the radiologists' (ROC AUC, direction-free: 0.5 = no information, 1 = perfect)."""
    def auc(summary: Optional[dict], name: str) -> str:
        a = (summary or {}).get("separation", {}).get(name)
        if a is None:
            return "n/a"
        return f"{max(a, 1 - a):.2f} ({'higher' if a >= 0.5 else 'lower'} in {summary['positive']})"

    parts = [f"{name}: {auc(pred, name)} predicted" + (f", {auc(true, name)} radiologists'" if true else "")
             for name in pred["separation"]]
    return (f"How well each measure tells {pred['positive']} from the other lesions (ROC AUC, 0.5 = no information): "
            + "; ".join(parts) + ".")


def fmt_metric(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def report_download(ckpt: Path, inp: "ImageInput", results: dict, prefix: str, lesion=None) -> None:
    """"Download report": the case report (PDF, or its pages as PNG) of the prediction and these maps.
    The file name goes in only when the user ticks the box; the report is built when the button is pressed."""
    c1, c2, c3 = st.columns([2, 2, 1.2])
    fmt = c1.radio("Report format", ["PDF", "PNG pages (zip)"], horizontal=True, key=f"{prefix}_rep_fmt")
    named = c2.checkbox("Print the file name in the report", value=False, key=f"{prefix}_rep_name",
                        help="Off: the report identifies the image only by its sha256 fingerprint.")
    png = fmt != "PDF"
    c3.download_button(
        "Download report", type="primary", key=f"{prefix}_report",
        data=lambda: svc.case_report(ckpt, inp.image, inp.sha, results, lesion, inp.mask, inp.true_class,
                                     inp.name if named else None, png),
        file_name=f"breastxai_report_{inp.sha[:10]}.{'zip' if png else 'pdf'}",
        mime="application/zip" if png else "application/pdf",
        help="The image, prediction, out-of-distribution check, each map with its settings, seeds and run time, "
             "the model's measured quality and sanity checks, hashes and the disclaimer.")


SANITY_TEACHING = ("If a method draws nearly the same map for a network whose weights are random, the map shows the "
                   "image (edges, bright or dark areas) rather than what the model learned, and should not be used to "
                   "teach what the model sees. A map that changes completely has passed this check, which a faithful "
                   "explanation needs but which does not prove one.")


def sanity_view(ckpt: Path) -> None:
    """The model card's per-method sanity-check table (explanations.json["sanity"]), when recorded."""
    ej = svc.explanations_json(ckpt) or {}
    san = ej.get("sanity")
    st.subheader("Sanity checks of the explanation methods")
    if not san:
        st.caption(f"Not run for this checkpoint yet: `python -m core.explain.evaluate checkpoints/{ckpt.name} "
                   "--sanity-only`.")
        return
    rows = []
    for m, r in san["methods"].items():
        last = r["cascading"][-1] if r["cascading"] else {}
        top = r["cascading"][0] if r["cascading"] else {}
        logit = r.get("random_logit") or {}
        rows.append({"method": METHOD_LABELS.get(m, m),
                     "result": {True: "✅ pass", False: "❌ fail", None: "undefined"}[r["passed"]],
                     "rank correlation, all weights random": _r(last.get("spearman")),
                     "SSIM, all weights random": _r(last.get("ssim")),
                     f"rank correlation, {top.get('randomised', ['?'])[0]} random": _r(top.get("spearman")),
                     "rank correlation with another class's map": _r(logit.get("spearman"))
                     + (f" ({logit['n_other_map_empty']} empty)" if logit.get("n_other_map_empty") else "")})
    st.dataframe(rows, width="stretch", hide_index=True)
    st.caption(f"A method {san['pass_rule']}. Measured on {san['n_images']} test image(s); 1 = the same map, "
               "0 = unrelated. " + SANITY_TEACHING)


def _r(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"
