"""Annotate: draw the lesion, score every method against it, erase it and re-predict."""
import streamlit as st

import components as ui
import services as svc
from core.explain import baseline_image
from core.explain import metrics as M
from core.explain.visualise import mask_outline

CAPTION = ("Draw the region you believe is the lesion (a closed loop is filled). Every method is then "
           "scored against your region, and you can hide the region to see how the prediction changes.")
ckpt, clf, inp = ui.image_page("Annotate", "an", "✏️", caption=CAPTION)
ood = ui.ood_banner(ckpt, inp)
mode = st.radio("Drawing tool", ["freedraw", "rect", "circle", "polygon"], horizontal=True, key="an_mode")
drawn = ui.canvas_region(inp.image, key=f"an_canvas_{inp.sha[:12]}_{mode}", mode=mode)
use_mask = inp.mask is not None and st.checkbox("Use the dataset's lesion mask instead of my drawing",
                                                value=drawn is None, key="an_use_mask")
lesion = ui.predicted_lesion_view(ckpt, inp, "an", ood)
region, region_label = (inp.mask, "the dataset's lesion mask") if use_mask else (drawn, "your drawing")
if region is None and lesion is not None and lesion.mask.any():
    region, region_label = lesion.mask, "the *predicted* lesion (segmenter), not a drawn or true mask"
if region is None:
    st.info("Draw on the image above to define a region.")
    st.stop()
if drawn is not None:
    st.session_state["an_region"], st.session_state["an_region_sha"] = drawn, inp.sha  # for Explain's feedback
colour = ui.PREDICTED_OUTLINE if region_label.startswith("the *predicted*") else ui.TRUE_OUTLINE
st.image(mask_outline(inp.image, region, colour), width=480,
         caption=f"Region: {region_label.replace('*', '')}, {region.mean():.1%} of the image")
st.caption(f"Scores and erasing below use {region_label}.")

methods = st.multiselect("Methods to score", list(ui.METHOD_LABELS), default=["gradcam", "gradcam++", "occlusion"],
                         format_func=ui.METHOD_LABELS.get, key="an_methods")
if st.button("Score methods against this region", type="primary", key="an_score"):
    st.session_state["an_request"] = (inp.sha, methods)
req = st.session_state.get("an_request")
if req and req[0] == inp.sha:
    res = ui.run_methods(ckpt, inp, req[1], {m: ui.default_params(m) for m in req[1]})
    rows = [{"method": ui.METHOD_LABELS[m], "pointing game (max inside)": "hit" if M.pointing_game(e.attribution,
             region) else "miss", "energy inside": round(M.energy_in_mask(e.attribution, region), 3),
             "IoU top-15%": round(M.mask_iou(e.attribution, region, 15), 3)} for m, e in res.items()]
    st.dataframe(rows, width="stretch")
    cols = st.columns(max(len(res), 1))
    for col, (m, e) in zip(cols, res.items()):
        predicted = colour == ui.PREDICTED_OUTLINE
        col.image(ui.render_overlay(inp.image, e, 0.5, None if predicted else region,
                                    predicted=region if predicted else None),
                  caption=ui.METHOD_LABELS[m], width="stretch")

st.subheader("Erase this region and re-predict")
fill = st.selectbox("Fill the region with", ["blur", "mean", "black"], key="an_fill")
erased = inp.image.copy()
erased[region] = baseline_image(inp.image, fill)[region]
before = svc.predict(ckpt, inp.image, inp.sha)
after = clf.predict_proba(erased)[0]
c1, c2 = st.columns(2)
c1.image(erased, caption="Image with the region hidden", width="stretch")
with c2:
    for i, c in enumerate(clf.class_names):
        st.metric(c, f"{after[i]:.1%}", delta=f"{(after[i] - before[i]) * 100:+.1f} points")
    st.caption("A large drop for the predicted class means the model relied on this region.")
if not (req and req[0] == inp.sha):
    svc.warm_up(ckpt, tuple(methods))  # what the chosen methods need, while the region is drawn
