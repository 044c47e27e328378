"""Explain: prediction and explanations for one image."""
import streamlit as st

import components as ui
import services as svc
from core.evaluation import calibration_phrase

ckpt, clf, inp = ui.image_page("Explain a prediction", "ex", "🔬")

probs = svc.predict(ckpt, inp.image, inp.sha)
pred = int(probs.argmax())
left, right = st.columns([1, 1])
with right:
    ood = ui.prediction_headline(ckpt, inp, probs, clf.class_names)
with left:
    lesion = ui.predicted_lesion_view(ckpt, inp, "ex", ood)
    shown = ui.render_overlay(inp.image, None, 0.0, predicted=lesion.mask if lesion else None)
    st.image(shown, caption=inp.name + (f" · true class: {inp.true_class}" if inp.true_class else "")
             + (" · " + ui.outline_legend(False, True) if lesion is not None and lesion.mask.any() else ""),
             width="stretch")
with right:
    if not ood:
        st.plotly_chart(ui.prediction_chart(probs, clf.class_names), width="stretch", key="ex_pred_chart")
        ui.operating_point_note(svc.metadata(ckpt), probs, clf.class_names)
        ui.subtype_caution(ckpt, probs, clf.class_names)
    ui.ood_notice(ckpt, inp)
    st.caption(calibration_phrase(svc.metadata(ckpt)) + " " + svc.DISCLAIMER)
ui.feedback_form(ckpt, inp, probs, clf.class_names)
ui.tile_map_view(ckpt, inp, clf, pred if clf.num_classes != 2 else 1)
ui.mosaic_view(ckpt, clf, "ex")


@st.fragment
def explanations(ckpt, clf, inp, lesion, ood: bool) -> None:
    """The methods form and its maps. A fragment: pressing Explain, moving the opacity or toggling outlines reruns
    only this part, not the prediction above it, so a cached explanation comes back without recomputing the page."""
    with st.form("ex_form"):
        methods = st.multiselect("Methods", list(ui.METHOD_LABELS), default=["gradcam", "lime"],
                                 format_func=ui.METHOD_LABELS.get, key="ex_methods")
        target = st.selectbox("Explain class", ["predicted"] + list(clf.class_names), key="ex_target")
        params = {}
        cols = st.columns(3)
        for i, m in enumerate(ui.METHOD_LABELS):
            if ui.PARAM_UI.get(m):
                with cols[i % 3].expander(f"{ui.METHOD_LABELS[m]} settings"):
                    params[m] = ui.params_form_fields(m, "ex")
        submitted = st.form_submit_button("Explain", type="primary")

    if submitted:
        st.session_state["ex_request"] = (inp.sha, methods, params, target)
    req = st.session_state.get("ex_request")
    if not req or req[0] != inp.sha:
        st.info("Choose methods and press **Explain**. LIME and SHAP take a few seconds to a minute on a CPU.")
        return

    _, methods, params, target = req
    t = None if target == "predicted" else list(clf.class_names).index(target)
    alpha = st.slider("Overlay opacity", 0.0, 1.0, 0.5, 0.05, key="ex_alpha")
    ui.show_legend()
    show_mask = inp.mask is not None and st.checkbox("Outline the lesion mask", value=True, key="ex_mask")
    legend = ui.outline_legend(show_mask, lesion is not None and lesion.mask.any())
    if legend:
        st.caption(legend)
    if ood:
        st.warning("The image is out of distribution: these maps show what the model responds to in an image it was not "
                   "made for. They are no evidence for a diagnosis.", icon=":material/warning:")
    report = st.container()
    progress = st.container()
    slots = {m: st.container() for m in methods}  # in the user's order, each filled as soon as its map is ready
    pm = lesion.mask if lesion is not None else None

    def show(m, e) -> None:
        with slots[m]:
            st.subheader(f"{ui.METHOD_LABELS[m]} · {e.class_name} ({e.probability:.1%}) · {e.seconds:.1f} s")
            e = ui.evidence_view(e, "ex")
            over = ui.overlay_for(inp.sha, inp.image, e, alpha, inp.mask if show_mask else None, show_segments=False,
                                  predicted=pm)
            c1, c2 = st.columns(2)
            if e.segments is not None:
                c1.image(over, caption="LIME heatmap (segment weights)", width="stretch")
                bounds = ui.overlay_for(inp.sha, inp.image, e, 0.0, inp.mask if show_mask else None,
                                        show_segments=True, predicted=pm)
                c2.image(bounds, caption="Top positive superpixels (boundaries)", width="stretch")
            else:
                c1.image(over, caption=f"{ui.METHOD_LABELS[m]} overlay", width="stretch")
                c2.image(inp.image, caption="Original", width="stretch")
            c1.download_button("Download overlay PNG", lambda over=over: ui.png_bytes(over),
                               file_name=f"{inp.name}.{m}.png", mime="image/png", key=f"ex_dl_{m}")
            with c2.expander("Parameters used"):
                st.json(e.params)

    with progress:
        results = ui.run_methods(ckpt, inp, methods, params, t, on_result=show)
    with report:
        ui.report_download(ckpt, inp, results, "ex", lesion)


explanations(ckpt, clf, inp, lesion, ood)
svc.warm_up(ckpt)  # the Keras model and the gradient graph, while the prediction is read
