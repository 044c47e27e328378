"""LIME Lab: live superpixels, run-time estimate, and seed stability."""
import streamlit as st

import components as ui
import services as svc
from core.explain.lime_explainer import LimeParams, segment
from core.explain.metrics import seed_stability
from core.explain.visualise import boundaries, colorize

CAPTION = ("LIME perturbs superpixels and fits a local linear model. Tune the segmentation live here, "
           "then run it and check how much the answer depends on the random seed.")
ckpt, clf, inp = ui.image_page("LIME Lab", "ll", "🧪", caption=CAPTION)
ui.ood_banner(ckpt, inp)

c1, c2, c3 = st.columns(3)
algo = c1.selectbox("Segmentation", ["slic", "quickshift", "felzenszwalb"], key="ll_algo")
n_segments = c1.slider("Segment count (SLIC)", 5, 300, 50, 5, key="ll_nseg", disabled=algo != "slic")
kernel_size = c2.slider("Kernel size (quickshift)", 1.0, 10.0, 4.0, 0.5, key="ll_ks", disabled=algo != "quickshift")
scale = c2.slider("Scale (Felzenszwalb)", 10, 500, 100, 10, key="ll_scale", disabled=algo != "felzenszwalb")
num_samples = c3.slider("Samples", 50, 3000, 500, 50, key="ll_samples")
kernel_width = c3.slider("Kernel width", 0.05, 1.0, 0.25, 0.05, key="ll_kw")
hide = c1.selectbox("Hide colour", ["mean", "black", "blur"], key="ll_hide")
seed = c2.number_input("Random seed", 0, 10_000, 0, key="ll_seed")
params = dict(segmentation=algo, n_segments=n_segments, kernel_size=kernel_size, scale=float(scale),
              num_samples=num_samples, kernel_width=kernel_width, hide_color=hide, random_seed=int(seed))

n_tiles = svc.tile_count(ckpt, inp.image)
if n_tiles > ui.MAX_PERTURBATION_TILES:
    st.warning(f"This image is {n_tiles} tiles of the model's patch size: every LIME sample "
               "would re-classify all of them. Upload one patch or a small region to use the LIME Lab.",
               icon=":material/timer:")
    st.stop()
work = clf.work_image(inp.image)
segs = segment(work, LimeParams(**params))
estimate = svc.lime_estimate(ckpt, inp.image, inp.sha, params)
left, right = st.columns(2)
left.image(boundaries(work, segs), caption=f"{int(segs.max()) + 1} superpixels at model resolution "
           f"({work.shape[1]}×{work.shape[0]})", width="stretch")
right.metric("Estimated run time", f"{estimate:.1f} s" if estimate < 10 else f"{estimate:.0f} s",
             help=f"{num_samples} samples, timed on this image with these settings (short runs of 16 and 64 "
                  "samples: fixed cost plus cost per sample)" + (" ; each sample is read as a grid of tiles"
                                                                if clf.patches else ""))

if st.button("Run LIME", type="primary", key="ll_run"):
    st.session_state["ll_request"] = (inp.sha, params)
req = st.session_state.get("ll_request")
if req and req[0] == inp.sha:
    e = ui.run_methods(ckpt, inp, ["lime"], {"lime": req[1]})["lime"]
    a, b = st.columns(2)
    a.image(ui.render_overlay(inp.image, e, 0.5, show_segments=False), caption=f"LIME heatmap for "
            f"{e.class_name} · local fit R² {e.extras['score']:.2f} · {e.seconds:.1f} s", width="stretch")
    b.image(ui.render_overlay(inp.image, e, 0.0, show_segments=True), caption="Top positive superpixels",
            width="stretch")
    ui.show_legend()
    ui.effect_note(e)

st.subheader("Seed stability")
k = st.slider("Number of seeds", 2, 8, 3, key="ll_k")
if st.button(f"Run LIME with {k} seeds", key="ll_stab"):
    st.session_state["ll_stab_req"] = (inp.sha, params, k)
sreq = st.session_state.get("ll_stab_req")
if sreq and sreq[0] == inp.sha:
    _, p, k = sreq
    maps = []
    bar = st.progress(0.0, text="Seeds…")
    for sd in range(k):
        e = svc.explain(ckpt, inp.image, inp.sha, "lime", {**p, "random_seed": sd})
        maps.append(e.attribution)
        bar.progress((sd + 1) / k, text=f"seed {sd + 1}/{k}")
    bar.empty()
    stab = seed_stability(maps)
    c1, c2 = st.columns(2)
    std = stab["std_map"]
    c1.image(colorize(std / max(float(std.max()), 1e-7)), caption="Per-pixel spread (std) across seeds "
             "(bright = unstable)", width="stretch")
    if stab["stability"] is None:
        c2.warning(f"{stab['empty_maps']} of {k} runs found no evidence at all (empty maps): stability is not "
                   "defined, and an empty map is not a stable explanation.")
    else:
        c2.metric("Stability score", f"{stab['stability']:.3f}", help="1 − mean per-pixel std of the signed maps "
                  "(each scaled to [−1, 1]: evidence for and against); 1 = identical across seeds")
    c2.metric("Mean per-pixel std", f"{stab['mean_std']:.4f}")
