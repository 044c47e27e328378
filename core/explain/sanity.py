"""Sanity checks for saliency maps (Adebayo et al., NeurIPS 2018): does a map depend on what the model learned?

Model-parameter randomisation: the network's weights are re-drawn from their initialisers block by block,
cascading from the top (the head) down to the input, and each block on its own; a method whose map stays
similar to the trained model's map explains the image (edges, contrast), not the model. Random-logit test: the
map for another class must differ from the map for the predicted class. Similarity of two maps (the [0, 1]
heatmaps the dashboard shows): Spearman rank correlation and SSIM.

Pass rule (stated in every result): with every block randomised, the mean Spearman rank correlation with the
trained model's map must fall below `SanityConfig.pass_below` (0.5). SSIM is reported beside it but is not part
of the rule: two mostly blank maps score a high SSIM whatever their content.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np

PASS_RULE = ("passes when, with every block of the network randomised (cascading from the head to the input), the "
             "mean Spearman rank correlation between its map and the trained model's map is below {t} (a map that goes "
             "blank counts as 0): the map then depends on what the model learned. SSIM is shown beside it but is not "
             "part of the rule, as two mostly blank maps score a high SSIM")


@dataclass(frozen=True)
class SanityConfig:
    """Which methods, their parameters, the randomisation seed and the pass threshold."""

    methods: tuple[str, ...] = ("gradcam", "gradcam++", "integrated_gradients", "occlusion", "lime", "shap")
    params: dict = field(default_factory=dict)  # {method: {param: value}}
    seed: int = 0
    pass_below: float = 0.5
    independent: bool = True  # also randomise each block on its own
    random_logit: bool = True


def _stage(name: str) -> Optional[int]:
    m = re.match(r"^[a-z]+?(\d+)", name)
    return int(m.group(1)) if m else None


def layer_blocks(model) -> list[tuple[str, list[str]]]:
    """The model's layers with weights grouped into blocks, input to output: [(block name, layer names)].

    Backbone layers group by their stage number (Keras names conv3_block2_1_conv, pool3_conv, block5a_...
    give stage 3, 3, 5; a layer without one joins the stage before it); `head_*` layers form the "head" block.
    In an ensemble (`core.models.build_ensemble`) the members' layers (`m1_...`, `m2_...`) join the same blocks.
    Input normalisation layers (no weights) take no part.
    """
    from core.models import HEAD_PREFIX, member_layer_name

    blocks: dict[str, list[str]] = {}
    stage = 0
    for layer in model.layers:
        if not layer.weights:
            continue
        name = member_layer_name(layer.name)  # an ensemble's members' layers: the same stage in every member
        if name.startswith(HEAD_PREFIX):
            key = "head"
        else:
            s = _stage(name)
            stage = s if s is not None else stage
            key = f"stage {stage}"
        blocks.setdefault(key, []).append(layer.name)
    return list(blocks.items())


def randomise_layers(model, names: Sequence[str], seed: int = 0) -> None:
    """Re-draw the weights of the named layers in place from their own initialisers (kernels, biases,
    BatchNorm scale and shift); BatchNorm running statistics are left as they are."""
    import keras

    for i, name in enumerate(names):
        layer = model.get_layer(name)
        for w in layer.weights:
            if not w.trainable and isinstance(layer, keras.layers.BatchNormalization):
                continue
            attr = next((a for a in ("kernel", "depthwise_kernel", "bias", "gamma", "beta", "embeddings")
                         if w.path.endswith("/" + a)), None)
            init = getattr(layer, f"{attr}_initializer", None) if attr else None
            if init is None:
                init = keras.initializers.GlorotUniform()
            init = keras.initializers.get(init) if not callable(init) else init
            if hasattr(init, "seed"):
                init = init.__class__.from_config({**init.get_config(), "seed": seed + i})
            w.assign(np.asarray(init(w.shape, dtype=w.dtype)))


def clone_model(model):
    """An independent copy of a Keras model (same architecture and weights)."""
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def step_similarity(ref: np.ndarray, other: np.ndarray) -> dict:
    """`similarity` of a trained-model map and another map, noting blank maps: a map that goes blank when the
    weights are randomised has nothing left of the original (counted as rank correlation 0 in the summary)."""
    return {**similarity(ref, other), "reference_empty": bool(np.ptp(ref) == 0),
            "other_empty": bool(np.ptp(other) == 0)}


def similarity(a: np.ndarray, b: np.ndarray) -> dict:
    """Spearman rank correlation and SSIM of two (H, W) heatmaps in [0, 1]; None where a map is constant
    (e.g. a constant-output model gives an empty map: no rank order, the similarity is undefined)."""
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"Heatmap shapes differ: {a.shape} vs {b.shape}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"spearman": None, "ssim": None}
    rho = spearmanr(a.ravel(), b.ravel()).statistic
    ssim = structural_similarity(a, b, data_range=1.0)
    return {"spearman": float(rho), "ssim": float(ssim)}


def _mean(values) -> Optional[float]:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def randomised_classifier(clf, model):
    """`clf` with another Keras model behind it (Keras forward; no OOD detector)."""
    return replace(clf, model=model, backend="keras", backend_info={}, _forward=None, _features=None, ood=None,
                   perturbation="float32", _perturb_forward=None)


def fully_randomised(clf, seed: int = 0):
    """`clf` with every block of its network randomised (the last step of the cascade)."""
    model = clone_model(clf.model)
    randomise_layers(model, [n for _, names in layer_blocks(model) for n in names], seed)
    return randomised_classifier(clf, model)


def sanity_checks(clf, images: Sequence[np.ndarray], cfg: SanityConfig = SanityConfig(),
                  progress: Optional[Callable[[float], None]] = None) -> dict:
    """Run the randomisation tests on uint8 RGB images; returns the JSON-ready result.

    {"pass_rule", "blocks", "methods": {method: {"cascading": [{"randomised": [blocks], "spearman", "ssim"}],
    "independent": [...], "random_logit": {...}, "passed": bool | None, "note": str}}, "n_images"}.
    Each step's similarity is the mean over images (images whose maps are constant are left out and counted).
    Random logit: the map for a random other class against the predicted class's map. `n_other_map_empty`: images
    where the other map is blank (nothing of the original left: counted as rank correlation 0).
    """
    from core.explain import explain

    blocks = layer_blocks(clf.model)
    order = list(reversed(blocks))  # head first
    n_steps = len(order) * (2 if cfg.independent else 1) + 1
    total, done = len(images) * len(cfg.methods) * (n_steps + 1), 0
    rng = np.random.default_rng(cfg.seed)

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress(done / total)

    per = {m: {"cascading": [[] for _ in order], "independent": [[] for _ in order], "logit": [], "empty": 0}
           for m in cfg.methods}
    for img in images:
        probs = clf.predict_proba(img)[0]
        target = int(np.argmax(probs))
        ref = {}
        for m in cfg.methods:
            ref[m] = explain(clf, img, m, target, **cfg.params.get(m, {})).heatmap()
            per[m]["empty"] += int(np.ptp(ref[m]) == 0)
            tick()
        cascade = clone_model(clf.model)
        for k, (block, names) in enumerate(order):
            randomise_layers(cascade, names, cfg.seed + 1000 * k)
            rc = randomised_classifier(clf, cascade)
            for m in cfg.methods:
                per[m]["cascading"][k].append(step_similarity(ref[m], explain(rc, img, m, target,
                                                                              **cfg.params.get(m, {})).heatmap()))
                tick()
        if cfg.independent:
            for k, (block, names) in enumerate(order):
                alone = clone_model(clf.model)
                randomise_layers(alone, names, cfg.seed + 1000 * k)
                rc = randomised_classifier(clf, alone)
                for m in cfg.methods:
                    per[m]["independent"][k].append(step_similarity(ref[m], explain(rc, img, m, target,
                                                                                    **cfg.params.get(m, {})).heatmap()))
                    tick()
        if cfg.random_logit and clf.num_classes > 1:
            other = int(rng.choice([c for c in range(clf.num_classes) if c != target]))
            for m in cfg.methods:
                alt = explain(clf, img, m, other, **cfg.params.get(m, {})).heatmap()
                per[m]["logit"].append(step_similarity(ref[m], alt))
                tick()

    def summary(sims: list[dict]) -> dict:
        # Images whose trained-model map is blank have nothing to compare and are left out; a map that is blank
        # only on the other side counts as rank correlation 0 (nothing of the original is left).
        rho = [s["spearman"] if s["spearman"] is not None else 0.0 for s in sims
               if not s["reference_empty"] and (s["spearman"] is not None or s["other_empty"])]
        return {"spearman": _mean(rho), "ssim": _mean(s["ssim"] for s in sims),
                "n_defined": sum(s["spearman"] is not None for s in sims),
                "n_other_map_empty": sum(s["other_empty"] and not s["reference_empty"] for s in sims),
                "n_reference_empty": sum(s["reference_empty"] for s in sims)}

    out = {"pass_rule": PASS_RULE.format(t=cfg.pass_below), "pass_below": cfg.pass_below,
           "blocks": [{"name": b, "n_layers": len(names)} for b, names in order], "n_images": len(images),
           "seed": cfg.seed, "params": cfg.params, "methods": {}}
    for m in cfg.methods:
        casc = [{"randomised": [b for b, _ in order[:k + 1]], **summary(s)} for k, s in enumerate(per[m]["cascading"])]
        res = {"cascading": casc, "random_logit": None}
        if per[m]["logit"]:
            res["random_logit"] = summary(per[m]["logit"])
        if cfg.independent:
            res["independent"] = [{"randomised": [order[k][0]], **summary(s)}
                                  for k, s in enumerate(per[m]["independent"])]
        last = casc[-1] if casc else {}
        if last.get("spearman") is None:
            res["passed"] = None
            res["note"] = (f"undefined: the trained model's map is blank on {per[m]['empty']} of {len(images)} "
                           "image(s) (e.g. a constant-output model), so there is nothing to compare")
        else:
            res["passed"] = bool(last["spearman"] < cfg.pass_below)
            blank = last["n_other_map_empty"]
            res["note"] = (f"fully randomised: Spearman {last['spearman']:.2f}"
                           + (f", SSIM {last['ssim']:.2f}" if last["ssim"] is not None else "")
                           + (f"; the map goes blank on {blank} image(s)" if blank else ""))
        out["methods"][m] = res
    return out
