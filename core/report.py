"""Case report: a PDF (and the same pages as PNG) that records what was shown and how much to trust it.

Per image: the image (with the true mask and the predicted lesion when known), the calibrated prediction,
the out-of-distribution check, the operating-point statement, and every overlay with its method, parameters,
seeds and run time. Then the checkpoint: test metrics with intervals (cross-validation when recorded),
explanation quality and sanity-check results, model sha256, git commit, training data and its citation.
Every page carries the not-a-diagnostic-device disclaimer. The file name and free text appear only when the
caller opts in (`ReportOptions.include_names`, `note`).

    python -m core.report CHECKPOINT IMAGE [IMAGE ...] --methods gradcam,lime --out report.pdf [--png-dir DIR]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from core.evaluation import calibration_phrase, operating_point_source
from core.explain.base import WEAK_EFFECT_MEANING

DISCLAIMER = ("Research and teaching aid, not a diagnostic device. Predictions and explanations can be wrong and "
              "must never replace a pathologist's or radiologist's judgement.")
_LATIN1 = {"–": "-", "—": "-", "·": "|", "≥": ">=", "≤": "<=", "×": "x", "“": '"', "”": '"', "’": "'", "‘": "'",
           "…": "...", "±": "+/-", "→": "->", "²": "^2", "≈": "~"}


def latin1(text: str) -> str:
    """Text the PDF core fonts can print (a few typographic characters mapped, anything else replaced)."""
    for a, b in _LATIN1.items():
        text = text.replace(a, b)
    return text.encode("latin-1", "replace").decode("latin-1")


@dataclass(frozen=True)
class ReportOptions:
    """What goes into the report besides the facts: names and a free-text note only on request."""

    include_names: bool = False
    note: Optional[str] = None
    title: str = "BreastXAI case report"


@dataclass
class Case:
    """One image and what was shown for it. `explanations`: core.explain Explanation objects."""

    image: np.ndarray  # uint8 RGB (H, W, 3)
    probabilities: np.ndarray  # calibrated (K,)
    explanations: list = field(default_factory=list)
    name: Optional[str] = None
    true_class: Optional[str] = None
    mask: Optional[np.ndarray] = None  # bool (H, W): true lesion mask
    predicted_lesion: Optional[np.ndarray] = None  # bool (H, W): the segmenter's lesion
    lesion_text: Optional[str] = None
    lesion_caveat: Optional[str] = None  # what to keep in mind about the outline (core.segmentation.lesion_caveat)
    ood: Optional[dict] = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.image).tobytes()).hexdigest()


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_case(clf, image: np.ndarray, methods: Sequence[str], params: Optional[dict] = None,
               segmenter=None, name: Optional[str] = None, true_class: Optional[str] = None,
               mask: Optional[np.ndarray] = None, progress: Optional[Callable[[float], None]] = None) -> Case:
    """Predict, check and explain one image (the CLI's path; the dashboard passes what it already computed)."""
    from core.explain import explain
    from core.segmentation import (describe_lesion, lesion_caveat, lesion_measurements, read_missed_lesions,
                                   read_outline_on_negative)

    params = params or {}
    probs = clf.predict_proba(image)[0]
    ood = (clf.ood_check([image]) or [None])[0]
    exps = []
    for i, m in enumerate(methods):
        exps.append(explain(clf, image, m, **params.get(m, {})))
        if progress:
            progress((i + 1) / max(len(methods), 1))
    lesion, text, caveat = None, None, None
    if segmenter is not None and not (ood or {}).get("out_of_distribution"):
        lesion = segmenter.predict_mask(image)
        text = describe_lesion(lesion_measurements(lesion))
        missed = read_missed_lesions(segmenter.path) if segmenter.path is not None else None
        on_negative = read_outline_on_negative(clf.path, segmenter.path) \
            if clf.path is not None and segmenter.path is not None else None
        caveat = lesion_caveat(missed, on_negative, clf.class_names[int(np.argmax(probs))], lesion)
    return Case(image=image, probabilities=probs, explanations=exps, name=name, true_class=true_class, mask=mask,
                predicted_lesion=lesion, lesion_text=text, lesion_caveat=caveat, ood=ood)


def _png(image: np.ndarray) -> io.BytesIO:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, "PNG")
    buf.seek(0)
    return buf


def _outlined(case: Case, base: Optional[np.ndarray] = None) -> np.ndarray:
    from core.explain.visualise import mask_outline

    out = case.image if base is None else base
    if case.predicted_lesion is not None and case.predicted_lesion.any():
        out = mask_outline(out, case.predicted_lesion, (255, 0, 255))
    if case.mask is not None and case.mask.any():
        out = mask_outline(out, case.mask, (0, 255, 255))
    return out


def _ci(ci) -> str:
    return f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""


def operating_point_text(meta: dict, probs: np.ndarray, class_names: Sequence[str]) -> Optional[str]:
    op = meta.get("operating_point")
    if not op or op.get("positive_class") not in class_names:
        return None
    p = float(probs[list(class_names).index(op["positive_class"])])
    t = op["test"]
    crosses = p >= op["threshold"]
    return (f"P({op['positive_class']}) = {p:.3f} is {'at or above' if crosses else 'below'} the model card's "
            f"operating point {op['threshold']:.3f} (chosen on the {operating_point_source(op)} for sensitivity >= "
            f"{op['target_sensitivity']:.2f}; on the test split sensitivity {t['sensitivity']:.3f}, specificity "
            f"{t['specificity']:.3f}): " + (f"flagged as possibly {op['positive_class']}." if crosses else
                                            f"not flagged as {op['positive_class']}."))


def model_summary(meta: dict, bundle: Optional[Path] = None) -> list[str]:
    """Plain lines on how good the checkpoint is: cross-validation first when recorded (with the tumour subtypes
    it gets wrong most often, from the `bundle`'s out-of-fold predictions), then the test split."""
    from core.evaluation import subtypes_from_bundle, weak_subgroups

    lines = []
    cv = meta.get("cross_validation") or {}
    if cv.get("pooled_roc_auc") is not None and cv.get("scope", "all") == "all":
        parts = [f"accuracy {cv['pooled_accuracy']:.3f}{_ci(cv.get('pooled_accuracy_ci95'))}"
                 if cv.get("pooled_accuracy") is not None else None,
                 f"balanced accuracy {cv['pooled_balanced_accuracy']:.3f}"
                 if cv.get("pooled_balanced_accuracy") is not None else None,
                 f"ROC AUC {cv['pooled_roc_auc']:.3f}"]
        lines.append(f"Cross-validation ({len(cv.get('folds', []))} folds, every image held out once, groups kept "
                     "together): " + ", ".join(p for p in parts if p) + ".")
        rows = subtypes_from_bundle(bundle, "cv") if bundle is not None else None
        weak = weak_subgroups(rows) if rows else ""
        if weak:
            lines.append(f"Tumour subtypes with under 80% of their images right in cross-validation: {weak}.")
    m = meta.get("metrics", {}).get("test", {})
    if m:
        lines.append(f"Test split (n = {m.get('n', '?')}): accuracy {m.get('accuracy', 0):.3f}"
                     f"{_ci(m.get('accuracy_ci95'))}; macro ROC AUC {(m.get('roc_auc_macro') or 0):.3f}"
                     f"{_ci(m.get('roc_auc_ci95'))}; balanced accuracy {(m.get('balanced_accuracy') or 0):.3f}; "
                     "recall " + ", ".join(f"{r['class']} {r['recall']:.3f}" for r in m.get("per_class", [])) + ".")
    for e in meta.get("external_checks", []) or []:
        lines.append(f"External check {e['name']}: {e['n_correct']} of {e['n_images']} correct.")
    return lines


def explanation_quality_rows(expl: Optional[dict]) -> list[list[str]]:
    """[[method, deletion AUC, insertion AUC, pointing game, sanity]] from a bundle's explanations.json."""
    if not expl:
        return []
    sanity = (expl.get("sanity") or {}).get("methods", {})
    rows = []
    for m, r in (expl.get("methods") or {}).items():
        s = sanity.get(m)
        verdict = "-" if s is None else {True: "pass", False: "FAIL", None: "undefined"}[s["passed"]]
        rows.append([m, f"{r['deletion_auc']['mean']:.3f}", f"{r['insertion_auc']['mean']:.3f}",
                     f"{r['pointing_game']['mean']:.2f}" if "pointing_game" in r else "-", verdict])
    for m, s in sanity.items():
        if m not in (expl.get("methods") or {}):
            rows.append([m, "-", "-", "-", {True: "pass", False: "FAIL", None: "undefined"}[s["passed"]]])
    return rows


def _params_text(e) -> str:
    keep = {k: v for k, v in e.params.items() if not isinstance(v, (list, dict, np.ndarray))}
    seeds = {k: v for k, v in keep.items() if "seed" in k}
    rest = {k: v for k, v in keep.items() if "seed" not in k}
    r = e.perturbed_range
    return (", ".join(f"{k}={v}" for k, v in rest.items()) or "defaults") + \
        (" | seeds: " + ", ".join(f"{k}={v}" for k, v in seeds.items()) if seeds else " | deterministic (no seed)") + \
        (f" | P({e.class_name}) over its perturbed images {r[0]:.1%}-{r[1]:.1%}" if r is not None else "")


def make_report(clf, cases: Sequence[Case], opts: ReportOptions = ReportOptions(),
                explanations_json: Optional[dict] = None, app_commit: Optional[str] = None,
                segmenter_meta: Optional[dict] = None) -> bytes:
    """The PDF as bytes (A4 portrait): one section per case, then the checkpoint's page."""
    from fpdf import FPDF

    from core.explain.visualise import overlay

    meta = clf.metadata
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    class PDF(FPDF):
        def header(self):
            self.set_font("Helvetica", "B", 11)
            self.cell(0, 6, latin1(f"{opts.title} | {now}"), new_x="LMARGIN", new_y="NEXT")
            self.set_font("Helvetica", "", 7.5)
            self.set_text_color(150, 0, 0)
            self.multi_cell(0, 3.6, latin1(DISCLAIMER), new_x="LMARGIN", new_y="NEXT")
            self.set_text_color(0, 0, 0)
            self.ln(1)

        def footer(self):
            self.set_y(-10)
            self.set_font("Helvetica", "", 7)
            self.cell(0, 5, latin1(f"checkpoint {clf.name} | model sha256 {str(meta.get('model_sha256'))[:16]} | "
                                   f"page {self.page_no()}/{{nb}}"), align="C")

    pdf = PDF(format="A4")
    pdf.alias_nb_pages()
    pdf.set_auto_page_break(True, margin=14)
    pdf.set_title(latin1(opts.title))

    def text(s: str, size: float = 9, bold: bool = False, h: float = 4.4) -> None:
        pdf.set_font("Helvetica", "B" if bold else "", size)
        pdf.multi_cell(0, h, latin1(s), new_x="LMARGIN", new_y="NEXT", align="L")

    def ensure(space_mm: float) -> None:
        if pdf.get_y() + space_mm > pdf.h - 16:
            pdf.add_page()

    names = list(clf.class_names)
    for n, case in enumerate(cases, start=1):
        pdf.add_page()
        label = f"Case {n} of {len(cases)}" + (f": {case.name}" if opts.include_names and case.name else "")
        text(label, 12, True, 6)
        text(f"Image sha256 {case.sha256} | {case.image.shape[1]} x {case.image.shape[0]} px"
             + (f" | true class (from the dataset): {case.true_class}" if case.true_class else ""), 8)
        y0 = pdf.get_y() + 1
        pdf.image(_png(_outlined(case)), x=pdf.l_margin, y=y0, w=70)
        pdf.set_xy(pdf.l_margin + 74, y0)
        ood = bool((case.ood or {}).get("out_of_distribution"))
        pred = int(np.argmax(case.probabilities))
        pdf.set_font("Helvetica", "B", 11)
        head = ("Out of distribution: no verdict" if ood else
                f"Prediction: {names[pred]} ({case.probabilities[pred]:.1%})")
        pdf.multi_cell(0, 5.5, latin1(head), new_x="LMARGIN", new_y="NEXT")
        col_x = pdf.l_margin + 74
        for i, c in enumerate(names):
            pdf.set_x(col_x)
            pdf.set_font("Helvetica", "", 9)
            pdf.cell(40, 4.6, latin1(c))
            pdf.cell(20, 4.6, f"{case.probabilities[i]:.3f}", new_x="LMARGIN", new_y="NEXT")
        pdf.set_x(col_x)
        pdf.set_font("Helvetica", "", 8)
        lines = [calibration_phrase(meta)]
        if case.ood is None:
            lines.append("Out-of-distribution check: the checkpoint has none.")
        else:
            copy = not ood and case.ood.get("training_copy") and case.ood["score"] > case.ood["threshold"]
            lines.append(f"Out-of-distribution check: distance {case.ood['score']:.0f} "
                         f"{'>' if ood or copy else '<='} threshold {case.ood['threshold']:.0f}: "
                         + ("the image does not resemble the training data; the output is not a prediction."
                            if ood else "the image is (a near-copy of) a training image." if copy
                            else "the image resembles the training data."))
        op = operating_point_text(meta, case.probabilities, names)
        if op and not ood:
            lines.append(op)
        if case.lesion_text:
            lines.append(case.lesion_text + " (magenta outline: predicted by the lesion segmenter"
                         + (f" {segmenter_meta.get('name')}, test Dice "
                            f"{(segmenter_meta.get('metrics', {}).get('test', {}).get('dice') or {}).get('mean', 0):.2f}"
                            if segmenter_meta else "") + ")" + (f". {case.lesion_caveat}" if case.lesion_caveat else ""))
        if case.mask is not None and case.mask.any():
            lines.append("Cyan outline: the dataset's lesion mask.")
        for s in lines:
            pdf.set_x(col_x)
            pdf.multi_cell(0, 3.8, latin1(s), new_x="LMARGIN", new_y="NEXT", align="L")
        pdf.set_y(max(pdf.get_y(), y0 + 70 * case.image.shape[0] / case.image.shape[1]) + 3)
        if opts.note:
            text("Note: " + opts.note, 8.5)
        if case.explanations:
            text("Explanations (heat: evidence for the explained class; blank = none found)", 10, True, 5.5)
            if any(e.weak_effect for e in case.explanations):
                text(f"Weak effect: {WEAK_EFFECT_MEANING}, so that map ranks very small effects; read it as weak "
                     "evidence of where the model looks.", 8.5)
            if ood:
                text("The image is out of distribution: these maps show what the model responds to in an image it "
                     "was not made for. They are no evidence for a diagnosis.", 8.5)
        w = (pdf.w - pdf.l_margin - pdf.r_margin - 6) / 2
        for k, e in enumerate(case.explanations):
            h_img = w * case.image.shape[0] / case.image.shape[1]
            if k % 2 == 0:
                ensure(h_img + 22)
                row_y = pdf.get_y()
            x = pdf.l_margin + (k % 2) * (w + 6)
            pdf.image(_png(_outlined(case, overlay(case.image, e.heatmap(), 0.5))), x=x, y=row_y, w=w)
            pdf.set_xy(x, row_y + h_img + 1)
            pdf.set_font("Helvetica", "B", 8.5)
            pdf.multi_cell(w, 4, latin1(f"{e.method}: explains {e.class_name} ({e.probability:.1%}), "
                                        f"{e.seconds:.1f} s" + ("" if e.has_positive_evidence else
                                                                " | no positive evidence found")
                                        + (" | weak effect (under 1 point)" if e.weak_effect else "")),
                           new_x="LEFT", new_y="NEXT")
            pdf.set_font("Helvetica", "", 7.5)
            pdf.multi_cell(w, 3.5, latin1(_params_text(e)), new_x="LEFT", new_y="NEXT", align="L")
            if k % 2 == 1 or k == len(case.explanations) - 1:
                pdf.set_xy(pdf.l_margin, max(pdf.get_y(), row_y + h_img + 12) + 2)

    # The checkpoint page.
    pdf.add_page()
    text(f"The model: {clf.name}", 12, True, 6)
    ds = meta.get("dataset", {})
    w_ = meta.get("weights", {})
    facts = [f"Classes: {', '.join(names)}",
             f"Training data: {ds.get('kind', '?')}, {ds.get('n_images', '?')} images; split "
             + ", ".join(f"{k} {v}" for k, v in (meta.get('split', {}).get('counts') or {}).items())
             + f" (seed {meta.get('split', {}).get('seed')}, group-aware)",
             f"Citation: {ds.get('citation') or '-'}",
             f"Backbone {meta.get('backbone')}, input {meta.get('input_size')} px; initial weights "
             f"{w_.get('source')} (sha256 {str(w_.get('sha256') or '-')[:16]})",
             f"Model sha256: {meta.get('model_sha256')}",
             f"Checkpoint trained at git commit {meta.get('git_commit')}; report made by the app at commit "
             f"{app_commit or 'unknown'}",
             f"Command: {meta.get('command')}"]
    for s in facts:
        text(s, 8.5)
    pdf.ln(2)
    text("How good the model is", 10, True, 5.5)
    for s in model_summary(meta, getattr(clf, "path", None)):
        text(s, 8.5)
    rows = explanation_quality_rows(explanations_json)
    if rows:
        pdf.ln(2)
        text("How good its explanations are (test images; deletion AUC lower is better, insertion higher; sanity: "
             "the map must change when the network's weights are randomised)", 10, True, 5)
        with pdf.table(col_widths=(40, 30, 30, 30, 30), text_align="LEFT", line_height=4.6) as table:
            pdf.set_font("Helvetica", "", 8.5)
            for r in [["method", "deletion AUC", "insertion AUC", "pointing game", "sanity check"], *rows]:
                row = table.row()
                for v in r:
                    row.cell(latin1(str(v)))
        san = (explanations_json or {}).get("sanity")
        if san:
            text(f"Sanity rule: a method {san['pass_rule']}. Measured on {san['n_images']} test image(s).", 7.5)
    pdf.ln(3)
    text(DISCLAIMER, 8.5, True)
    return bytes(pdf.output())


def pdf_pages_png(pdf: bytes, dpi: int = 110) -> list[bytes]:
    """Every page of a PDF as PNG bytes (pypdfium2), for the same report as images."""
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(pdf)
    out = []
    for page in doc:
        img = page.render(scale=dpi / 72).to_pil()
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(buf.getvalue())
    doc.close()
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    from core.checkpoints import load_classifier, load_segmenter, segmenter_for
    from core.errors import BreastXAIError
    from core.explain import EXPLAINERS, FAST_PARAMS
    from core.preprocessing import load_image
    from core.training.common import git_commit

    ap = argparse.ArgumentParser(prog="python -m core.report", description="Make a case report (PDF) for one or "
                                 "more images: a teaching handout or a record of what was shown.")
    ap.add_argument("checkpoint")
    ap.add_argument("images", nargs="+")
    ap.add_argument("--methods", default="gradcam,lime", help="comma-separated: " + ",".join(EXPLAINERS))
    ap.add_argument("--out", default="report.pdf")
    ap.add_argument("--png-dir", default=None, help="also write every page as PNG into this folder")
    ap.add_argument("--include-names", action="store_true", help="print each image's file name in the report")
    ap.add_argument("--note", default=None, help="free text printed on each case (only when given)")
    ap.add_argument("--no-segmenter", action="store_true", help="do not outline the predicted lesion")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in EXPLAINERS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; choose from {', '.join(EXPLAINERS)}", file=sys.stderr)
        return 2
    try:
        ckpt = Path(args.checkpoint)
        clf = load_classifier(ckpt)
        found = None if args.no_segmenter else segmenter_for(clf.metadata, ckpt.parent)
        seg = load_segmenter(found) if found is not None else None
        seg_meta = seg.metadata if seg is not None else None
        cases = []
        for i, path in enumerate(args.images, start=1):
            image = load_image(path)
            print(f"[{i}/{len(args.images)}] explaining with {', '.join(methods)}", flush=True)
            cases.append(build_case(clf, image, methods, FAST_PARAMS, seg, name=Path(path).name))
        expl = json.loads((ckpt / "explanations.json").read_text()) if (ckpt / "explanations.json").is_file() else None
        pdf = make_report(clf, cases, ReportOptions(include_names=args.include_names, note=args.note), expl,
                          git_commit(), seg_meta)
    except (BreastXAIError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(pdf)
    print(f"written {out} ({len(pdf) // 1024} KB, {len(cases)} case(s))")
    if args.png_dir:
        d = Path(args.png_dir)
        d.mkdir(parents=True, exist_ok=True)
        for k, png in enumerate(pdf_pages_png(pdf), start=1):
            (d / f"{out.stem}_page{k}.png").write_bytes(png)
        print(f"PNG pages in {d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
