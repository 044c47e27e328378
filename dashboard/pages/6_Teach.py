"""Teach: a quiz for teaching sessions with a running score."""
import numpy as np
import streamlit as st

import components as ui
import services as svc
from core.explain import metrics as M
from core.explain.visualise import mask_outline

ui.page_setup("Teach", "🎓")
ckpt = ui.sidebar()
st.title("Teach: what would you say?")
if ckpt is None:
    st.stop()
clf = svc.classifier(ckpt)
pool = [e for e in svc.examples(per_class=12) if e.class_name in clf.class_names]
if not pool:
    st.info("The quiz needs example images of this checkpoint's classes. " + svc.gallery.WHERE_TO_GET)
    st.stop()

q = st.session_state.setdefault("teach", {"seed": 0, "i": 0, "score": 0, "answered": 0, "revealed": False})
order = np.random.default_rng(q["seed"]).permutation(len(pool))
ex = pool[int(order[q["i"] % len(pool)])]
data = svc.read_file(ex.path)
img = svc.decode(data).array
sha = svc.sha256(data)
score_slot = st.empty()  # filled after the buttons below have updated the score
st.write(f"**Case {q['i'] + 1}.** Which class is this? Then draw a box where you look.")
box = ui.canvas_region(img, key=f"teach_canvas_{q['i']}", mode="rect")
guess = st.radio("Your answer", list(clf.class_names), index=None, horizontal=True, key=f"teach_guess_{q['i']}")

c1, c2 = st.columns(2)
if c1.button("Reveal", type="primary", disabled=guess is None or q["revealed"], key="teach_reveal"):
    q["revealed"] = True
    q["answered"] += 1
    q["score"] += int(guess == ex.class_name)
    st.session_state["teach_last"] = guess
if c2.button("Next case", key="teach_next"):
    q["i"] += 1
    q["revealed"] = False
    st.rerun()

score_slot.metric("Session score", f"{q['score']} / {q['answered']}")
if q["revealed"]:
    last = st.session_state.get("teach_last")
    probs = svc.predict(ckpt, img, sha)
    pred = clf.class_names[int(probs.argmax())]
    (st.success if last == ex.class_name else st.error)(
        f"Truth: **{ex.class_name}** · you said **{last}** · the model says **{pred}** ({probs.max():.1%}).")
    inp = ui.ImageInput(img, sha, ex.path, svc.mask_for(tuple(ex.mask_paths), img.shape[:2]), ex.class_name)
    e = ui.run_methods(ckpt, inp, ["gradcam"], {"gradcam": {}})["gradcam"]
    a, b = st.columns(2)
    a.image(ui.render_overlay(img, e, 0.5, inp.mask), caption="Where the model looked (Grad-CAM); cyan: lesion mask",
            width="stretch")
    shown = mask_outline(img, box, color=(255, 200, 0)) if box is not None else img
    b.image(mask_outline(shown, inp.mask) if inp.mask is not None else shown,
            caption="Your box (yellow) and the lesion mask (cyan)", width="stretch")
    if box is not None:
        top = M.top_k_mask(e.attribution, 15)
        st.write(f"Overlap of your box with the model's top-15% region: IoU {M.iou(box, top):.2f}"
                 + (f"; with the lesion: IoU {M.iou(box, inp.mask):.2f}" if inp.mask is not None else ""))
    st.caption(svc.DISCLAIMER)
