"""BreastXAI: home page and model card. Run with `streamlit run dashboard/Home.py`."""
import streamlit as st

import components as ui
import services as svc
from core.data.loaders import group_phrase
from core.evaluation import calibration_phrase

ui.page_setup("Home", "🩺")
ckpt = ui.sidebar()

st.title("BreastXAI")
st.markdown("Interactive explanations for breast-cancer image classifiers: histopathology (BreakHis-style H&E) "
            "and breast ultrasound (BUSI-style). Upload an image, see the model's calibrated prediction, and see "
            "*why* with LIME, Grad-CAM, SHAP, occlusion and integrated gradients, compared side by side and "
            "scored against lesion masks.")
st.warning(svc.DISCLAIMER, icon=":material/warning:")

st.markdown("""
| Page | What it does |
|---|---|
| **Explain** | Upload or pick an image, get the prediction and one or more explanations |
| **LIME Lab** | Tune LIME's superpixels, samples and kernel width live; check its seed stability |
| **Compare** | All methods side by side, their agreement, deletion/insertion curves, lesion localisation |
| **Evaluation** | Confusion matrix (click a cell to see those cases), ROC/PR, calibration, training curves |
| **Annotate** | Draw where you think the lesion is; score each method against it; erase it and re-predict |
| **Teach** | A quiz for teaching sessions: guess, then reveal the truth, the model and its explanation |
""")

if ckpt is None:
    st.stop()

meta = svc.metadata(ckpt)
st.header(f"Model card · {ckpt.name}")
m = meta.get("metrics", {}).get("test", {})


def fmt(v, ci=None):
    if v is None:
        return "n/a"
    s = f"{v:.3f}"
    return s + (f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else "")


cv = meta.get("cross_validation") or {}
c1, c2, c3, c4 = st.columns(4)
if cv.get("pooled_roc_auc") is not None and cv.get("scope", "all") == "all":
    # The most honest estimate first: cross-validation over every image, the single test split beside it.
    pos = "malignant" if "malignant" in meta.get("class_names", []) else meta.get("class_names", ["?"])[-1]
    ba = cv.get("pooled_balanced_accuracy")
    c1.metric("Balanced accuracy (cross-validated)", f"{ba:.3f}" if ba is not None else "n/a")
    c2.metric("ROC AUC (cross-validated)", f"{cv['pooled_roc_auc']:.3f}")
    c3.metric(f"{pos.capitalize()} recall (cross-validated)", f"{cv.get('pooled_recall', {}).get(pos, 0):.3f}")
    c4.metric("Calibration error (ECE, test)", f"{m.get('ece', 0):.3f}")
    n_cv = sum(cv.get("pooled_support", {}).values()) or "?"
    pl = cv.get("patient_level")
    st.caption(f"Cross-validation: {len(cv.get('folds', []))} folds, every one of the {n_cv} images held out once "
               + group_phrase(meta.get("dataset", {}).get("kind", "")) + (
                   f"; per patient: accuracy {pl['accuracy']:.3f} over {pl['n_patients']} patients" if pl else "") + ". "
               f"Single held-out test split (n = {m.get('n', '?')}): accuracy {fmt(m.get('accuracy'), m.get('accuracy_ci95'))}"
               f", balanced accuracy {fmt(m.get('balanced_accuracy'))}, ROC AUC {fmt(m.get('roc_auc_macro'), m.get('roc_auc_ci95'))}.")
else:
    c1.metric("Test accuracy", f"{m.get('accuracy', 0):.3f}")
    c2.metric("Macro ROC AUC", f"{m.get('roc_auc_macro') or 0:.3f}")
    c3.metric("Cohen's kappa", f"{m.get('cohen_kappa', 0):.3f}")
    c4.metric("Calibration error (ECE)", f"{m.get('ece', 0):.3f}")
    exact = m.get("accuracy_ci95_exact") or svc.exact_accuracy_ci(m)
    st.caption(f"Accuracy {fmt(m.get('accuracy'), m.get('accuracy_ci95'))}; ROC AUC "
               f"{fmt(m.get('roc_auc_macro'), m.get('roc_auc_ci95'))}; measured on the held-out test split "
               f"(n = {m.get('n', '?')}), bootstrap 95% intervals"
               + (f"; exact binomial 95% interval for accuracy {exact[0]:.3f}–{exact[1]:.3f}." if exact else "."))
if m.get("n", 0) and m["n"] < 50:
    st.warning(f"Only {m['n']} test images: a bootstrap interval collapses when every test image is right, so "
               "read the exact interval and the cross-validation below, not the single number.")

ds = meta.get("dataset", {})
split = meta.get("split", {})
w = meta.get("weights", {})
head = meta.get("head") or {}
rows = {
    "Classes": ", ".join(meta.get("class_names", [])),
    "Data": f"{ds.get('kind', '?')} · {ds.get('n_images', '?')} images · {ds.get('class_counts', {})}",
    "Citation": ds.get("citation") or "—",
    "Split": f"train {split.get('counts', {}).get('train')}, val {split.get('counts', {}).get('val')}, "
             f"test {split.get('counts', {}).get('test')} (seed {split.get('seed')}, stratified, group-aware)",
    "Backbone": f"{meta.get('backbone')} · input {meta.get('input_size')}×{meta.get('input_size')} px"
                + (f" · cut at {head['trunk_layer']}" if head.get("trunk_layer") else "")
                + (f" · also run at {', '.join(f'{x}×{x}' for x in head['scales'][1:])} px (same weights; pooled "
                   "features of every scale concatenated)" if len(head.get("scales") or []) > 1 else "")
                + (f" · patches of {meta['patches']['patch_size']} px, grid-averaged" if meta.get("patches") else ""),
    "Head": (f"ensemble: {head['ensemble']}" if head.get("ensemble") else
             f"linear, fitted by {head['solver']} (C {head['C']:g}) on the frozen trunk's pooled features"
             if head.get("solver") else
             f"Dense {' / '.join(map(str, head.get('units', []))) or 'none'} · dropout {head.get('dropout')} · "
             f"L2 {head.get('l2')}"),
    "Weights": ("each member's own, trained from " + "; ".join(sorted({f"{x.get('source')} {x.get('path') or ''}".strip()
                                                                   for x in w.get("members") or []}))
                if head.get("ensemble") else
                f"{w.get('source')} · {w.get('path') or ''} · sha256 {str(w.get('sha256') or '')[:16]}…"),
    "Calibration": calibration_phrase(meta),
    "Trained": f"{meta.get('created', '?')} · "
               + (f"joined from {head['members']} trained members (see below)" if head.get("ensemble") else
                  "one closed-form fit" if head.get("solver") else f"{meta.get('training', {}).get('epochs', '?')} epochs")
               + f" · {(meta.get('training', {}).get('wall_seconds') or 0) / 60:.1f} min",
    "Command": f"`{meta.get('command')}`",
    "Git commit": str(meta.get("git_commit")),
}
dist = meta.get("distillation")
if dist:
    rows["Taught by"] = (f"{dist.get('teacher')} (sha256 {str(dist.get('teacher_model_sha256'))[:16]}…, "
                         f"{dist.get('teacher_members')} model(s)): trained on {dist.get('weight'):g} × its probabilities "
                         f"at temperature {dist.get('temperature'):g} + {1 - dist.get('weight'):g} × the true labels; "
                         "one forward pass per prediction")
st.table({"": list(rows.keys()), "value": list(rows.values())})
for note in split.get("warnings", []):  # a class one split lacks (train.py recorded why)
    st.warning(note, icon=":material/warning:")
ui.ensemble_members(meta)
if ds.get("kind") == "busi":
    audit = meta.get("near_duplicate_audit") or {}
    grouped = audit.get("n_excluded") == 0
    st.info("BUSI has no published patient ids and contains repeat scans of the same lesion. "
            + ("This split keeps repeat scans of a lesion together (see the check below); different images of one "
               "patient may still sit in different splits, which no check can rule out without patient ids. The "
               "cross-validation is the steadier estimate. " if grouped else
               "Repeat scans may sit on both sides of this split, so its test scores are optimistic. ")
            + "Cite: " + (ds.get("citation") or ""))
ui.small_data_evidence(meta, ckpt)
ui.sanity_view(ckpt)
ui.segmenter_card(ckpt)
