"""Teach: a quiz for teaching sessions: the educator picks the cases, the class answers, the reveal explains."""
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

with st.expander("Session set-up (educator)", expanded="teach" not in st.session_state):
    with st.form("teach_setup"):
        classes = st.multiselect("Classes", list(clf.class_names), default=list(clf.class_names),
                                 key="teach_opt_classes")
        which = st.radio("Cases", ["all", "the model is right", "the model is wrong", "the model is unsure (< 70%)",
                                   "hand-picked"], horizontal=True, key="teach_opt_which")
        picked = st.multiselect("Hand-picked cases", [e.label for e in pool], key="teach_opt_picked")
        n_cases = st.number_input("Number of cases", 1, len(pool), min(10, len(pool)), key="teach_opt_n")
        show_names = st.checkbox("Show file names", value=False, key="teach_opt_names")
        started = st.form_submit_button("Start session", type="primary")

# The session resets cleanly when it is (re)started or the checkpoint changes.
q = st.session_state.get("teach")
if started or q is None or q.get("checkpoint") != str(ckpt):
    cases = [e for e in pool if e.class_name in (classes or clf.class_names)]
    if which == "hand-picked":
        cases = [e for e in pool if e.label in picked]
    elif which != "all":
        def keep(e):
            p = svc.predict(ckpt, svc.decode(svc.read_file(e.path)).array, svc.sha256(svc.read_file(e.path)))
            right = clf.class_names[int(p.argmax())] == e.class_name
            return right if which == "the model is right" else (not right if which == "the model is wrong"
                                                                 else float(p.max()) < 0.7)
        with st.spinner("Selecting cases…"):
            cases = [e for e in cases if keep(e)]
    order = np.random.default_rng(0).permutation(len(cases))[:int(n_cases)]
    q = st.session_state["teach"] = {"checkpoint": str(ckpt), "cases": [cases[i].path for i in order], "i": 0,
                                     "answers": {}, "revealed": False, "names": show_names}
if not q["cases"]:
    st.warning("No case matches this set-up; choose other classes or cases above and start again.")
    st.stop()
by_path = {e.path: e for e in pool}
if q["i"] >= len(q["cases"]):
    st.subheader("Session summary")
    rows, class_right, model_right = [], 0, 0
    for k, path in enumerate(q["cases"]):
        e = by_path[path]
        a = q["answers"].get(path, {})
        class_right += a.get("guess") == e.class_name
        model_right += a.get("model") == e.class_name
        rows.append({"case": k + 1, "image": e.label if q["names"] else f"case {k + 1}", "truth": e.truth,
                     "class said": a.get("guess", "—"), "model said": a.get("model", "—"),
                     "class right": "✓" if a.get("guess") == e.class_name else "✗",
                     "model right": "✓" if a.get("model") == e.class_name else "✗"})
    c1, c2 = st.columns(2)
    c1.metric("Class score", f"{class_right} / {len(q['cases'])}")
    c2.metric("Model score", f"{model_right} / {len(q['cases'])}")
    st.dataframe(rows, hide_index=True, width="stretch")
    missed_by_class = [r["case"] for r in rows if r["class right"] == "✗"]
    missed_by_model = [r["case"] for r in rows if r["model right"] == "✗"]
    st.write(f"The class missed cases {', '.join(map(str, missed_by_class)) or 'none'}; the model missed cases "
             f"{', '.join(map(str, missed_by_model)) or 'none'}.")
    if st.button("Start again", key="teach_restart"):
        st.session_state.pop("teach")
        st.rerun()
    st.stop()

path = q["cases"][q["i"]]
ex = by_path[path]
data = svc.read_file(ex.path)
img = svc.decode(data).array
sha = svc.sha256(data)
score_slot = st.empty()  # filled after the buttons below have updated the answers
st.write(f"**Case {q['i'] + 1} of {len(q['cases'])}**" + (f" · {ex.label}" if q["names"] else "")
         + ". Which class is this? Then draw a box where you look.")
box = ui.canvas_region(img, key=f"teach_canvas_{q['i']}", mode="rect")
guess = st.radio("Your answer", list(clf.class_names), index=None, horizontal=True, key=f"teach_guess_{q['i']}")

c1, c2 = st.columns(2)
if c1.button("Reveal", type="primary", disabled=guess is None or q["revealed"], key="teach_reveal"):
    probs = svc.predict(ckpt, img, sha)
    q["answers"][path] = {"guess": guess, "model": clf.class_names[int(probs.argmax())]}
    q["revealed"] = True
if c2.button("Next case" if q["i"] + 1 < len(q["cases"]) else "Finish: summary", key="teach_next"):
    q["i"] += 1
    q["revealed"] = False
    st.rerun()

score = sum(a.get("guess") == by_path[p].class_name for p, a in q["answers"].items())
score_slot.metric("Session score", f"{score} / {len(q['answers'])}")
if q["revealed"] and path in q["answers"]:
    said = q["answers"][path]["guess"]
    probs = svc.predict(ckpt, img, sha)
    pred = clf.class_names[int(probs.argmax())]
    (st.success if said == ex.class_name else st.error)(
        f"Truth: **{ex.truth}** · you said **{said}** · the model says **{pred}** ({probs.max():.1%}).")
    method = st.selectbox("Show the model's evidence with", list(ui.METHOD_LABELS), format_func=ui.METHOD_LABELS.get,
                          key="teach_opt_method")
    inp = ui.ImageInput(img, sha, ex.path, svc.mask_for(tuple(ex.mask_paths), img.shape[:2]), ex.class_name)
    e = ui.run_methods(ckpt, inp, [method], {method: ui.default_params(method)}).get(method)
    if e is not None:
        e = ui.evidence_view(e, "teach")
        a, b = st.columns(2)
        a.image(ui.render_overlay(img, e, 0.5, inp.mask), width="stretch",
                caption=f"Where the model looked ({ui.METHOD_LABELS[method]}, for {e.class_name}); cyan: lesion mask")
        shown = mask_outline(img, box, color=(255, 200, 0)) if box is not None else img
        b.image(mask_outline(shown, inp.mask) if inp.mask is not None else shown,
                caption="Your box (yellow) and the lesion mask (cyan)", width="stretch")
        if box is not None:
            top = M.top_k_mask(e.attribution, 15)
            st.write(f"Overlap of your box with the model's top-15% region: IoU {M.iou(box, top):.2f}"
                     + (f"; with the lesion: IoU {M.iou(box, inp.mask):.2f}" if inp.mask is not None else ""))
    if st.button("Open this case in Compare (all methods side by side)", key="teach_compare"):
        ui.set_current_image(data, ex.path.rsplit("/", 1)[-1], ex.mask_paths, ex.class_name, "example")
        st.switch_page("pages/3_Compare.py")
    st.caption(svc.DISCLAIMER)
if not q["revealed"]:
    svc.warm_up(ckpt, ("gradcam",))  # the evidence shown at the reveal, prepared while the case is read
