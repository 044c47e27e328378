"""Evaluation: how good each checkpoint really is, from its saved test predictions."""
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st

import components as ui
import services as svc
from core.checkpoints import read_csv
from core.evaluation import (curves, operating_point_source, patient_level_metrics, reliability_curve,
                             sensitivity_specificity)
from core.data.roots import resolve_data_root, resolve_root
from core.explain.base import WEAK_EFFECT_MEANING

ui.page_setup("Evaluation", "📊")
ckpt = ui.sidebar()
st.title("Evaluation")
if ckpt is None:
    st.stop()
meta = svc.metadata(ckpt)
names = meta["class_names"]
externals = {f"external:{e['name']}": e for e in meta.get("external_checks", [])}
split = st.radio("Split", ["test", "val", *externals], horizontal=True, key="ev_split",
                 help="Settings were chosen on the validation split; the test split was used once, for reporting. "
                      "External checks are images from another source, never used for training or selection.")
if split in externals:
    st.warning(externals[split]["label"])
y, p, rows, m = svc.metrics_for(ckpt, split)
st.caption(f"{len(y)} {split} images · accuracy {m['accuracy']:.3f} · macro ROC AUC {m['roc_auc_macro'] or 0:.3f} "
           f"· Cohen's kappa {m['cohen_kappa']:.3f} · ECE {m['ece']:.3f}")

st.subheader("Confusion matrix")
st.caption("Click a cell (or pick it below) to list those images, e.g. the malignant cases called benign.")
cm = np.asarray(m["confusion_matrix"])
xs, ys, txt, size = [], [], [], []
for i in range(len(names)):
    for j in range(len(names)):
        xs.append(names[j]); ys.append(names[i]); txt.append(str(cm[i, j])); size.append(cm[i, j])
fig = go.Figure(go.Scatter(x=xs, y=ys, mode="markers+text", text=txt, textfont=dict(size=18, color="black"),
                           marker=dict(symbol="square", size=70, color=size, colorscale="Blues", showscale=True,
                                       line=dict(color="#555", width=1)),
                           hovertemplate="true %{y}<br>predicted %{x}<br>%{text} images<extra></extra>"))
fig.update_layout(xaxis=dict(title="predicted", type="category"), yaxis=dict(title="true", type="category",
                  autorange="reversed"), height=120 + 90 * len(names), margin=dict(l=10, r=10, t=10, b=10))
event = st.plotly_chart(fig, on_select="rerun", selection_mode="points", key="ev_cm", width="content")
cells = [f"true {a} → predicted {b}" for a in names for b in names]
clicked = None
if event and event.selection and event.selection.points:
    pt = event.selection.points[0]
    clicked = f"true {pt['y']} → predicted {pt['x']}"
if clicked in cells and clicked != st.session_state.get("ev_last_click"):
    # A new click on the matrix drives the cell picker (the picker keeps its own state otherwise).
    st.session_state["ev_cell"] = clicked
st.session_state["ev_last_click"] = clicked
default_cell = next((i for i, c in enumerate(cells) if c.startswith("true malignant → predicted benign")), 0)
if st.session_state.get("ev_cell") not in cells:
    st.session_state.pop("ev_cell", None)
cell = st.selectbox("Cell", cells, index=default_cell, key="ev_cell")
t_name, p_name = cell[5:].split(" → predicted ")
hits = [r for r in rows if r["true"] == t_name and r["predicted"] == p_name]
root = resolve_root(externals[split]["root"], ckpt) if split in externals else resolve_data_root(meta, ckpt)
st.write(f"**{len(hits)}** {split} image(s) with true class *{t_name}* predicted *{p_name}*.")
if hits and not root.is_dir():
    st.info(f"The dataset folder {root} is not available here, so images cannot be shown.")
elif hits:
    ui.dataset_thumbnails(ckpt, root, [(r["path"], t_name, f"{Path(r['path']).name} · p({p_name}) "
                                       f"{float(r['p_' + p_name]):.2f}") for r in hits[:18]], "ev_open")

if split in ("test", "val"):
    groups = {x["path"]: x["group"] for x in read_csv(ckpt / "split.csv") if x["split"] == split}
    pl = patient_level_metrics(y, p, [groups.get(r["path"], r["path"]) for r in rows], names, n_boot=0)
    if pl is not None and pl["n"] < len(y):
        st.subheader(f"Per patient ({pl['n']} {split} patients)")
        st.write(f"A patient's probability is the mean over their images (Spanhol et al. 2016): accuracy "
                 f"**{pl['accuracy']:.3f}** ({sum(r['true'] == r['predicted'] for r in pl['patients'])} of "
                 f"{pl['n']}), balanced accuracy {pl['balanced_accuracy']:.3f}; patient recognition rate "
                 f"(mean share of each patient's images classified right) {pl['patient_recognition_rate']:.3f}.")
        st.dataframe([{"patient": r["patient"], "true": r["true"], "predicted": r["predicted"], "images": r["n_images"],
                       "images correct": round(r["image_accuracy"], 3),
                       **{f"mean p({c})": round(v, 3) for c, v in r["probabilities"].items()}}
                      for r in pl["patients"]], hide_index=True, width="stretch")
    by_type = svc.subtypes_for(ckpt, split)
    if by_type:
        ui.subtype_table(by_type, f"{split} split")

if split in ("test", "val") and len(names) >= 2:
    op = meta.get("operating_point") or {}
    positive = op.get("positive_class") or ("malignant" if "malignant" in names else names[-1])
    st.subheader(f"Threshold · {positive} against the rest")
    thr = st.slider(f"Call {positive} when its probability is at least", 0.0, 1.0,
                    float(round(op.get("threshold", 0.5), 3)), 0.001, format="%.3f", key="ev_threshold",
                    help="Moves the operating point live: sensitivity, specificity and the 2 x 2 table update.")
    ss = sensitivity_specificity(y, p[:, names.index(positive)], names.index(positive), thr)
    c1, c2, c3 = st.columns([1, 1, 2])
    c1.metric("Sensitivity", f"{ss['sensitivity']:.3f}", help=f"{ss['tp']} of {ss['tp'] + ss['fn']} {positive}")
    c2.metric("Specificity", f"{ss['specificity']:.3f}", help=f"{ss['tn']} of {ss['tn'] + ss['fp']} others")
    c3.dataframe([{"": f"true {positive}", f"called {positive}": ss["tp"], "not called": ss["fn"]},
                  {"": "true other", f"called {positive}": ss["fp"], "not called": ss["tn"]}], hide_index=True)
    if op:
        st.caption(f"The model card's operating point is {op['threshold']:.3f} (chosen on the {operating_point_source(op)} for sensitivity "
                   f"≥ {op['target_sensitivity']:.2f}).")

st.subheader("ROC and precision-recall curves (one vs rest)")
cv = curves(y, p, names)
roc, pr = go.Figure(), go.Figure()
for c, d in cv.items():
    roc.add_trace(go.Scatter(x=d["fpr"], y=d["tpr"], name=f"{c} (AUC {d['auc']:.3f})", mode="lines"))
    pr.add_trace(go.Scatter(x=d["recall"], y=d["precision"], name=f"{c} (AP {d['ap']:.3f})", mode="lines"))
roc.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"), showlegend=False))
roc.update_layout(xaxis_title="false positive rate", yaxis_title="true positive rate (sensitivity)", height=380)
pr.update_layout(xaxis_title="recall", yaxis_title="precision", height=380)
c1, c2 = st.columns(2)
c1.plotly_chart(roc, width="stretch", key="ev_roc")
c2.plotly_chart(pr, width="stretch", key="ev_pr")

st.subheader("Calibration")
rc = reliability_curve(y, p)
cal = go.Figure()
cal.add_trace(go.Bar(x=[(a + b) / 2 for a, b in zip(rc["bin_lo"], rc["bin_hi"])], y=rc["accuracy"], width=0.09,
                     name="accuracy in bin", text=[f"n={n}" for n in rc["count"]]))
cal.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot"), name="perfect calibration"))
cal.update_layout(xaxis_title="confidence of the predicted class", yaxis_title="accuracy", height=360,
                  title=f"Reliability diagram · ECE {m['ece']:.3f} (temperature "
                        f"{meta.get('calibration', {}).get('temperature', 1):.2f})")
st.plotly_chart(cal, width="stretch", key="ev_cal")

st.subheader("Training curves")
hist = read_csv(ckpt / "history.csv") if (ckpt / "history.csv").is_file() else []
if meta.get("ensemble"):
    st.caption(f"This checkpoint joins {len(meta['ensemble']['members'])} trained models into one and was not trained "
               "itself: each member's settings and training command are on the Home page's model card.")
phases = meta.get("training", {}).get("phases", [])
if len(hist) == 1 and phases and phases[0].get("solver"):  # a closed-form fit has one step and no curve
    h = hist[0]
    st.write(f"Fitted in one closed-form step ({phases[0]['solver']}, {phases[0]['seconds']:.1f} s), so there is no "
             "curve: training loss " + f"{float(h['loss']):.3f}, accuracy {float(h['accuracy']):.3f}"
             + (f"; validation loss {float(h['val_loss']):.3f}, accuracy {float(h['val_accuracy']):.3f}"
                if h.get("val_loss") else "") + ".")
elif hist:
    tc = go.Figure()
    for k in ("loss", "val_loss", "accuracy", "val_accuracy"):
        if k in hist[0]:
            tc.add_trace(go.Scatter(x=[int(h["epoch"]) for h in hist], y=[float(h[k]) for h in hist], name=k,
                                    yaxis="y2" if "acc" in k else "y"))
    tc.update_layout(yaxis=dict(title="loss"), yaxis2=dict(title="accuracy", overlaying="y", side="right",
                     range=[0, 1]), xaxis_title="epoch", height=360)
    st.plotly_chart(tc, width="stretch", key="ev_hist")
    st.caption(" · ".join(f"{ph['phase']}: {ph['epochs']} epochs, {ph['seconds']:.0f} s" for ph in phases))

st.subheader("Classification report and per-class counts")
st.dataframe([{**{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}} for r in m["per_class"]],
             width="stretch")
st.write(f"Macro avg: precision {m['macro_avg']['precision']:.3f}, recall {m['macro_avg']['recall']:.3f}, "
         f"F1 {m['macro_avg']['f1-score']:.3f} · weighted avg F1 {m['weighted_avg']['f1-score']:.3f}")

ui.small_data_evidence(meta, ckpt)

ui.segmenter_evaluation(ckpt, split)

st.subheader("Explanation quality")
ej = svc.explanations_json(ckpt)
if ej is None and meta.get("dataset", {}).get("kind") not in ("busi",):
    st.info("This checkpoint's dataset has no lesion masks, so mask-based explanation scores are not available; "
            "compare methods on single images (deletion / insertion curves) on the Compare page.")
elif ej is None or not ej.get("methods"):
    st.info(f"Explanation quality not measured yet: run `python -m core.explain.evaluate {ckpt}`.")
else:
    def cell_fmt(d):  # mean [95% interval]; one value has no interval
        ci = d.get("ci95")
        return "n/a" if d["mean"] is None else f"{d['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    plain = {"deletion_auc": "deletion AUC (lower is better)", "insertion_auc": "insertion AUC (higher is better)",
             "pointing_game": "pointing game", "energy_in_mask": "share of evidence in the lesion",
             "mask_iou_top15": "top-15% region overlap with the lesion (IoU)",
             "weak_effect": "share of maps with a weak effect", "seconds": "seconds per image"}
    keys = list(dict.fromkeys(k for r in ej["methods"].values() for k in r))  # a gradient method has no weak effect
    table = [{"method": ui.METHOD_LABELS.get(mm, mm), **{plain.get(k, k): cell_fmt(r[k]) if k in r else "n/a"
                                                          for k in keys}}
             for mm, r in ej["methods"].items()]
    st.dataframe(table, width="stretch")
    masks = ej["images"].get("with_masks", True)
    st.caption(f"{ej['images']['n']} test images " + ("with lesion masks " if masks else "")
               + f"({ej['images']['classes']}); deletion: lower is better; insertion"
               + (", pointing game, energy and IoU" if masks else "") + ": higher is better. Mean [95% bootstrap "
               "interval]." + ("" if masks else " The dataset has no lesion masks, so localisation is not scored.")
               + (f" A map has a weak effect when {WEAK_EFFECT_MEANING} (LIME, SHAP and occlusion; lower is better)."
                  if "weak_effect" in keys else "")
               + ui.timed_on(ej.get("machine")))
    if ej.get("agreement"):
        st.dataframe([{"methods": f"{ui.METHOD_LABELS.get(a['a'], a['a'])} vs {ui.METHOD_LABELS.get(a['b'], a['b'])}",
                       "top-15% overlap (IoU)": cell_fmt(a["iou_top15"]), "rank correlation": cell_fmt(a["spearman"])}
                      for a in ej["agreement"]], width="stretch", hide_index=True)
    for mm, r in ej.get("seed_stability", {}).items():
        if r.get("mean") is None:
            continue
        st.caption(f"{ui.METHOD_LABELS.get(mm, mm)} seed stability over {r['seeds']} seeds on {r['images']} images: "
                   f"{cell_fmt(r)}.")

ui.sanity_view(ckpt)

bundles = [s for s in svc.bundle_statuses() if s.ok]
if len(bundles) > 1:
    st.subheader("All checkpoints")
    comp = []
    for b in bundles:
        mt = svc.metadata(b.path).get("metrics", {}).get("test", {})
        comp.append({"checkpoint": b.name, "backbone": svc.metadata(b.path).get("backbone"), "n test": mt.get("n"),
                     "accuracy": mt.get("accuracy"), "macro ROC AUC": mt.get("roc_auc_macro"),
                     "kappa": mt.get("cohen_kappa"), "ECE": mt.get("ece")})
    st.dataframe(comp, width="stretch")
