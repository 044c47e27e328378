"""Compare: methods side by side, agreement matrix, deletion/insertion curves, mask localisation."""
import numpy as np
import plotly.graph_objects as go
import streamlit as st

import components as ui
import services as svc
from core.explain import metrics as M
from core.preprocessing import resize

ckpt, clf, inp = ui.image_page("Compare explanations", "cmp", "⚖️")
probs = svc.predict(ckpt, inp.image, inp.sha)
pred = int(probs.argmax())
ood = ui.prediction_headline(ckpt, inp, probs, clf.class_names)
lesion = ui.predicted_lesion_view(ckpt, inp, "cmp", ood)
pm = lesion.mask if lesion is not None else None
if st.session_state.get("cmp_target_for") != (str(ckpt), inp.sha) or \
        st.session_state.get("cmp_target", clf.class_names[pred]) not in clf.class_names:
    # a new image or checkpoint: explain its predicted class, not the class chosen for the last one (set through
    # session state, so the browser's picker shows it too)
    st.session_state["cmp_target"] = clf.class_names[pred]
    st.session_state["cmp_target_for"] = (str(ckpt), inp.sha)
with st.form("cmp_form"):
    target_name = st.selectbox("Explain class", list(clf.class_names), key="cmp_target",
                               **({} if "cmp_target" in st.session_state else {"index": pred}),
                               format_func=lambda c: f"{c} (predicted, {probs[pred]:.1%})" if c == clf.class_names[pred]
                               else f"{c} ({probs[list(clf.class_names).index(c)]:.1%})")
    methods = st.multiselect("Methods", list(ui.METHOD_LABELS), default=["gradcam", "gradcam++", "occlusion",
                                                                          "integrated_gradients"],
                             format_func=ui.METHOD_LABELS.get, key="cmp_methods")
    k = st.slider("Top region size for agreement (% of pixels)", 5, 50, 15, 5, key="cmp_k")
    go_btn = st.form_submit_button("Compare", type="primary")
if go_btn:
    st.session_state["cmp_request"] = (inp.sha, methods, k, list(clf.class_names).index(target_name))
req = st.session_state.get("cmp_request")
if not req or req[0] != inp.sha or len(req[1]) < 1:
    st.info("Pick at least one method and press **Compare** (LIME/SHAP use the fast settings of the Explain page).")
    svc.warm_up(ckpt, tuple(methods))  # what the chosen methods need, while they are chosen
    st.stop()
_, methods, k, target = (*req, pred)[:4]
params = {m: ui.default_params(m) for m in methods}
st.markdown(f"These maps explain **{clf.class_names[target]}**"
            + (" (the predicted class)." if target == pred else
               f", not the predicted class {clf.class_names[pred]}: they show evidence for the alternative."))
progress = st.container()
cols = st.columns(min(len(methods), 3))
slots = {m: cols[i % len(cols)].empty() for i, m in enumerate(methods)}  # filled as each map is ready
with progress:
    res = ui.run_methods(ckpt, inp, methods, params, None if target == pred else target,
                         on_result=lambda m, e: slots[m].image(
                             ui.render_overlay(inp.image, e, 0.5, inp.mask, predicted=pm), width="stretch",
                             caption=f"{ui.METHOD_LABELS[m]} · {e.seconds:.1f} s{ui.effect_caption(e)}"))
ui.show_legend()
ui.report_download(ckpt, inp, res, "cmp", lesion)
legend = ui.outline_legend(inp.mask is not None, pm is not None and pm.any())
if legend:
    st.caption(legend)

names = list(res)
if len(names) >= 2:
    st.subheader("Agreement between methods")
    n = len(names)
    iou_m, rho_m = np.eye(n), np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            a = M.agreement(res[names[i]].attribution, res[names[j]].attribution, k)
            iou_m[i, j] = iou_m[j, i] = a["iou_top"]
            rho_m[i, j] = rho_m[j, i] = a["spearman"]
    labels = [ui.METHOD_LABELS[m] for m in names]
    c1, c2 = st.columns(2)
    for col, mat, title in ((c1, iou_m, f"IoU of top-{k}% regions"), (c2, rho_m, "Spearman rank correlation")):
        fig = go.Figure(go.Heatmap(z=mat, x=labels, y=labels, zmin=-1 if "Spearman" in title else 0, zmax=1,
                                   colorscale="RdBu" if "Spearman" in title else "Viridis",
                                   text=np.round(mat, 2), texttemplate="%{text}"))
        fig.update_layout(title=title, height=380, margin=dict(l=10, r=10, t=40, b=10))
        col.plotly_chart(fig, width="stretch", key=f"cmp_{title}")

st.subheader("Faithfulness: deletion and insertion curves")
st.caption("Deletion: the most important pixels are blurred away first; a faithful map makes the probability "
           "fall fast (low area). Insertion: they are revealed first on a blurred image (high area is better).")
predict = lambda x: clf.predict_work(np.asarray(x))
work = clf.work_image(inp.image)
figs = {"deletion": go.Figure(), "insertion": go.Figure()}
scores = []
region, region_label = ui.localisation_region(inp, lesion)
for m, e in res.items():
    a = resize(e.attribution, work.shape[:2])
    row = {"method": ui.METHOD_LABELS[m]}
    for mode in ("deletion", "insertion"):
        f, p = M.perturbation_curve(predict, work, a, e.target, mode, steps=16)
        figs[mode].add_trace(go.Scatter(x=f, y=p, mode="lines+markers", name=ui.METHOD_LABELS[m]))
        row[f"{mode} AUC"] = round(M.auc(f, p), 3)
    if region is not None:
        row["pointing game"] = M.pointing_game(e.attribution, region)
        row["energy in lesion"] = round(M.energy_in_mask(e.attribution, region), 3)
        row[f"IoU top-{k}%"] = round(M.mask_iou(e.attribution, region, k), 3)
    scores.append(row)
c1, c2 = st.columns(2)
for col, mode in ((c1, "deletion"), (c2, "insertion")):
    figs[mode].update_layout(title=f"{mode.title()} curve", xaxis_title="fraction of pixels", height=360,
                             yaxis=dict(title="target probability", range=[0, 1]), margin=dict(l=10, r=10, t=40, b=10))
    col.plotly_chart(figs[mode], width="stretch", key=f"cmp_curve_{mode}")
st.dataframe(scores, width="stretch")
if region is None:
    st.caption("No lesion mask for this image: localisation scores need a BUSI example (or draw one on Annotate).")
else:
    st.caption(f"Localisation scores (pointing game, energy in lesion, IoU) are measured against the **{region_label}**.")

st.subheader("Sanity check: does each map depend on what the model learned?")
st.caption(ui.SANITY_TEACHING)
if st.button("Show the maps of a randomised copy of the model", key="cmp_sanity_run"):
    st.session_state["cmp_sanity"] = (inp.sha, tuple(res))
if st.session_state.get("cmp_sanity") == (inp.sha, tuple(res)):
    from core.explain.sanity import similarity

    for m, e in res.items():
        r = svc.randomised_explanation(ckpt, inp.image, inp.sha, m, params[m], e.target)
        sim = similarity(e.heatmap(), r.heatmap())
        c1, c2, c3 = st.columns([2, 2, 1.4])
        c1.image(ui.render_overlay(inp.image, e, 0.5), caption=f"{ui.METHOD_LABELS[m]} · trained model", width="stretch")
        c2.image(ui.render_overlay(inp.image, r, 0.5), caption=f"{ui.METHOD_LABELS[m]} · every weight random",
                 width="stretch")
        if sim["spearman"] is None:
            c3.write("Similarity undefined: one of the maps is blank.")
        else:
            c3.metric("Rank correlation", f"{sim['spearman']:.2f}")
            c3.metric("SSIM", f"{sim['ssim']:.2f}")
            c3.caption("Still alike: the map shows the image more than the model." if sim["spearman"] >= 0.5 else
                       "Changed: the map depends on the learned weights.")
ui.sanity_view(ckpt)
