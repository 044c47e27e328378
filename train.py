#!/usr/bin/env python
"""Train a BreastXAI checkpoint, or refresh every committed one.

    python train.py                      # retrain every bundle in checkpoints/ from its recorded command
    python train.py --dataset busi --data-dir ../shared/data/busi/Dataset_BUSI_with_GT \\
        --backbone densenet121 --weights ../shared/weights/densenet121_imagenet_notop.weights.h5
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent
DEFAULT_INPUT_SIZE = {"breakhis": 150, "busi": 224, "ucsb": 224, "idc": 50, "folder": 224}


def build_parser() -> argparse.ArgumentParser:
    from core.models import BACKBONES
    from core.training import FLIPS, PRECISIONS, SEG_DECODERS, SEG_DICE, TrainConfig
    from core.training.classify import CALIBRATIONS
    from core.training.common import DISTRIBUTE

    d = TrainConfig()
    ap = argparse.ArgumentParser(
        description="Train a breast-image classifier and write a checkpoint bundle "
                    "(model.keras, metadata.json, history.csv, predictions.csv, split.csv). "
                    "With no arguments, retrain every bundle in checkpoints/ from the command in its metadata.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, choices=("busi", "breakhis", "ucsb", "idc", "folder"),
                   help="dataset layout: BUSI, BreakHis v1 official tree, UCSB H&E, or root/<class>/*.png")
    g.add_argument("--data-dir", default=d.data_dir, help="dataset root folder")
    g.add_argument("--task", default=d.task, choices=("binary", "subtype", "segmentation"),
                   help="binary / subtype: BreakHis benign/malignant or the 8 tumour subtypes; segmentation: a "
                        "U-Net lesion segmenter on the DenseNet121 encoder from the masks beside the images "
                        "(BUSI); --head-epochs then trains the decoder with the encoder frozen, --fine-tune-* "
                        "the encoder")
    g.add_argument("--magnification", type=int, default=None, choices=(40, 100, 200, 400),
                   help="BreakHis only: keep one magnification")
    g.add_argument("--split", type=float, nargs=3, default=list(d.split), metavar=("TRAIN", "VAL", "TEST"),
                   help="split fractions (stratified, group-aware: no patient in two splits)")
    g.add_argument("--split-file", default=None, help="reuse a saved split.csv instead of drawing a new split")
    g.add_argument("--limit", type=int, default=None, help="use a random subset of N images (smoke tests)")
    g.add_argument("--clahe", action="store_true", help="CLAHE contrast enhancement (ultrasound)")
    g.add_argument("--patches", type=int, default=d.patches, metavar="N",
                   help="patch training for large histology images: N tissue-aware random crops per training "
                        "image per epoch; predictions average the tiles of a regular grid over the whole image "
                        "(0: whole-image training)")
    g.add_argument("--patch-size", type=int, default=d.patch_size, metavar="S",
                   help="with --patches: crop side in original pixels (each crop is resized to --input-size)")
    g.add_argument("--patch-stride", type=int, default=None, metavar="P",
                   help="with --patches: step of the prediction grid in original pixels (default: the patch size)")
    g.add_argument("--patch-scale-jitter", type=float, default=d.patch_scale_jitter, metavar="J",
                   help="with --patches: training crop side = patch size x 2^U(-J, J) (octaves), for robustness "
                        "to magnification")
    g.add_argument("--cv-folds", type=int, default=d.cv_folds, metavar="K",
                   help="also run group-wise K-fold cross-validation over the whole dataset with the same "
                        "settings and record it in metadata.json (small datasets)")
    g.add_argument("--cv-scope", default=d.cv_scope, choices=("all", "train+val"),
                   help="images the cross-validation covers: the whole dataset (the checkpoint's reported CV), or "
                        "only the training and validation patients of the split, keeping the test patients out "
                        "(for choosing settings when the validation split holds too few patients)")
    g.add_argument("--calibration", default=d.calibration, choices=CALIBRATIONS,
                   help="where the softmax temperature is fitted: the validation split (default), the out-of-fold "
                        "predictions of a group-wise CV over training + validation groups (for validation splits "
                        "of a few patients), or nowhere (T = 1)")
    g.add_argument("--cv-only", action="store_true",
                   help="only run the --cv-folds cross-validation of these settings and record it in the existing "
                        "bundle --out-dir/--name (its model, split and test metrics stay unchanged)")
    g.add_argument("--external", action="append", default=[], metavar="KIND=DIR",
                   help="after training, predict another dataset as an external check and record it "
                        "(e.g. breakhis=../shared/data/breakhis_samples); repeatable")
    g.add_argument("--feedback", default=None, metavar="DB",
                   help="clinician feedback database: add its consented, relabelled images to the training split")
    g = ap.add_argument_group("model")
    g.add_argument("--ensemble", nargs="+", default=None, metavar="BUNDLE",
                   help="join trained classifier bundles of the same task and split into one checkpoint whose "
                        "logits are the mean of theirs (one model: every explainer works on it, its Grad-CAM is "
                        "the mean of the members' maps; each prediction costs every member's forward pass); its "
                        "cross-validation combines the members' cv_predictions.csv. Takes --name, --out-dir, "
                        "--data-dir and --external; the members' own settings stay theirs")
    g.add_argument("--distil-from", default=None, metavar="BUNDLE",
                   help="train on this teacher bundle's softened probabilities (an ensemble distilled into one "
                        "network); with --cv-folds the teacher's recipe is retrained in every fold")
    g.add_argument("--distil-weight", type=float, default=d.distil_weight, metavar="W",
                   help="share of the teacher's soft targets in the training targets, 0-1 (rest: the true labels)")
    g.add_argument("--distil-temperature", type=float, default=d.distil_temperature, metavar="T",
                   help="the teacher's logits are divided by T before the softmax (T > 1 softens)")
    g.add_argument("--backbone", default=d.backbone, choices=BACKBONES)
    g.add_argument("--input-size", type=int, default=None,
                   help="square input side in pixels (default: 150 for BreakHis, as in the seeds; 224 otherwise)")
    g.add_argument("--weights", default=d.weights,
                   help="'imagenet' (Keras download, needs network), 'none' (from scratch), a trunk weights file "
                        "or a lesion segmenter bundle (its encoder; with --pooling lesion the whole segmenter)")
    g.add_argument("--pooling", default=d.pooling, choices=("avg", "flatten", "lesion"),
                   help="GAP or Flatten before the head; 'lesion': with --weights SEGMENTER_BUNDLE and --trunk-layer, "
                        "the whole segmenter runs and the encoder map is averaged over its predicted lesion")
    g.add_argument("--head-units", type=int, nargs="+", default=list(d.head_units),
                   help="Dense layer sizes; 0: a linear head (pooled features -> softmax)")
    g.add_argument("--trunk-layer", default=None, metavar="LAYER",
                   help="cut the backbone at this layer (DenseNet121: pool2_relu, pool3_relu, pool4_relu): "
                        "earlier, more textural features, a smaller and faster model")
    g.add_argument("--scales", type=int, nargs="+", default=[], metavar="SIDE",
                   help="also run the trunk (same weights) on the input resized to these smaller sides and "
                        "concatenate the pooled features of every scale (multi-scale; costs each scale's forward)")
    g.add_argument("--logistic-c", type=float, default=None, metavar="C",
                   help="fit a linear head on the frozen trunk's pooled features with scikit-learn's "
                        "LogisticRegression (inverse L2 strength C, standardised features) instead of Adam; "
                        "needs --head-units 0 and --fine-tune-epochs 0")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout after each head Dense layer")
    g.add_argument("--l2", type=float, default=d.l2, help="L2 penalty on the head's Dense kernels")
    g.add_argument("--fine-tune-layers", type=int, default=d.fine_tune_layers,
                   help="unfreeze the last N backbone layers in phase 2 (-1: all; 0: head only)")
    g = ap.add_argument_group("optimisation")
    g.add_argument("--head-epochs", type=int, default=d.head_epochs, help="max epochs of phase 1 (head only)")
    g.add_argument("--fine-tune-epochs", type=int, default=d.fine_tune_epochs, help="max epochs of phase 2")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate, phase 1")
    g.add_argument("--fine-tune-lr", type=float, default=d.fine_tune_lr, help="Adam learning rate, phase 2")
    g.add_argument("--patience", type=int, default=d.patience, help="EarlyStopping patience (restores best)")
    g.add_argument("--lr-factor", type=float, default=d.lr_factor, help="ReduceLROnPlateau factor")
    g.add_argument("--lr-patience", type=int, default=d.lr_patience, help="ReduceLROnPlateau patience")
    g.add_argument("--no-class-weights", dest="class_weights", action="store_false",
                   help="do not weight classes inversely to their frequency")
    g.add_argument("--no-augment", dest="augment", action="store_false", help="no flip/rotate/zoom/brightness/contrast")
    g.add_argument("--colour-jitter", type=float, default=d.colour_jitter, metavar="F",
                   help="random hue (± F of the colour wheel) and saturation changes (H&E stain variation); 0: off")
    g.add_argument("--mixup", type=float, default=d.mixup, metavar="A",
                   help="mixup: train on pairs of images (or cached activations) and their labels mixed with a "
                        "weight drawn from Beta(A, A) per batch (0.2-0.4 is usual); 0: off")
    g.add_argument("--aux-mask", type=float, default=d.aux_mask, metavar="W",
                   help="ultrasound with lesion masks (BUSI): also train a lesion map on the last feature map "
                        "against the masks, its loss weighted W (training only: the saved classifier is unchanged "
                        "in shape); 0: off")
    g.add_argument("--seg-dice", default=d.seg_dice, choices=SEG_DICE,
                   help="segmentation: the loss's soft Dice term averaged over every image (a few stray pixels on a "
                        "scan without a lesion then cost nearly a whole image's Dice) or over the images with a "
                        "lesion only (binary cross-entropy alone then teaches the empty scans), or the Tversky index "
                        "(tversky: a missed lesion pixel weighted 0.7, a stray one 0.3)")
    g.add_argument("--seg-decoder", default=d.seg_decoder, choices=SEG_DECODERS,
                   help="segmentation: the U-Net's skip connections concatenated as they are (unet) or each first "
                        "weighted pixel by pixel by an attention gate the decoder computes (attention: Attention "
                        "U-Net, Oktay et al. 2018)")
    g.add_argument("--ema", type=float, default=d.ema, metavar="M",
                   help="segmentation: keep an exponential moving average of the weights (momentum M per step, "
                        "e.g. 0.99) and validate, early-stop and save on it; 0: off")
    g.add_argument("--deep-supervision", type=float, default=d.deep_supervision, metavar="W",
                   help="segmentation: during training also map the lesion from decoder steps 1-4 (1/16 to 1/2 of "
                        "the input side, upsampled) against the same mask, each such loss weighted W (deep "
                        "supervision; the saved segmenter is unchanged in shape); 0: off")
    g.add_argument("--seg-classify", type=float, default=d.seg_classify, metavar="W",
                   help="segmentation: during training also predict the image's class (e.g. benign / malignant / "
                        "normal) from the encoder's last features, its cross-entropy weighted W (multi-task: the "
                        "encoder learns what tells a lesion scan from a normal one; the saved segmenter is unchanged "
                        "in shape); 0: off")
    g.add_argument("--elastic", type=float, default=d.elastic, metavar="S",
                   help="segmentation: also deform about half the training images and their masks elastically "
                        "(as in the original U-Net) with magnitude S in (0, 1]: at 0.5 a smooth displacement of "
                        "1.6%% of the image side on average; 0: off")
    g.add_argument("--stain-standardise", action="store_true",
                   help="H&E: standardise each image's colour in-graph (per-image optical-density mean and spread "
                        "mapped to the training set's), so stain strength and colour cast matter less")
    g.add_argument("--flip", default=d.flip, choices=FLIPS,
                   help="random flips; 'horizontal' keeps an ultrasound's skin-at-the-top geometry and shadowing")
    g.add_argument("--rotation", type=float, default=d.rotation, metavar="F",
                   help="random rotation, ± F of a full turn (0.1 = ±36 degrees; 0: off)")
    g.add_argument("--augment-copies", type=int, default=d.augment_copies,
                   help="augmented copies per training image in the activation cache")
    g.add_argument("--no-cache", dest="cache", action="store_false",
                   help="plain model.fit on images instead of caching frozen-trunk activations")
    g.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="bfloat16: oneDNN mixed precision for training (1.4x per cached DenseNet121 fine-tuning "
                        "epoch on a 2-core AMX CPU; weights stay float32; float32 on CPUs without native bfloat16)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--distribute", default=d.distribute, choices=DISTRIBUTE,
                   help="multiworker: train across machines with tf.distribute.MultiWorkerMirroredStrategy; run the "
                        "same command on every worker with its own TF_CONFIG (the chief writes the bundle)")
    g = ap.add_argument_group("output")
    g.add_argument("--name", default=None, help="bundle name (default: <dataset>_<backbone>)")
    g.add_argument("--out-dir", default=d.out_dir, help="folder that holds checkpoint bundles")
    g.add_argument("--log-file", default=None, help="also write the log to this file")
    g.add_argument("--quiet", action="store_true", help="no per-epoch output")
    return ap


def config_from_args(args: argparse.Namespace):
    from core.training import TrainConfig

    return TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, name=args.name, out_dir=args.out_dir, task=args.task,
        magnification=args.magnification, backbone=args.backbone,
        input_size=args.input_size or DEFAULT_INPUT_SIZE.get(args.dataset, 224),
        weights=args.weights, pooling=args.pooling,
        head_units=tuple(u for u in args.head_units if u > 0), trunk_layer=args.trunk_layer,
        scales=tuple(args.scales), logistic_c=args.logistic_c, dropout=args.dropout,
        l2=args.l2, fine_tune_layers=args.fine_tune_layers, head_epochs=args.head_epochs,
        fine_tune_epochs=args.fine_tune_epochs, batch_size=args.batch_size, lr=args.lr,
        fine_tune_lr=args.fine_tune_lr, patience=args.patience, lr_factor=args.lr_factor,
        lr_patience=args.lr_patience, seed=args.seed, split=tuple(args.split), split_file=args.split_file,
        clahe=args.clahe, class_weights=args.class_weights, augment=args.augment,
        augment_copies=args.augment_copies, cache=args.cache, limit=args.limit, feedback=args.feedback,
        patches=args.patches, patch_size=args.patch_size, patch_stride=args.patch_stride, cv_folds=args.cv_folds,
        cv_scope=args.cv_scope, calibration=args.calibration, patch_scale_jitter=args.patch_scale_jitter,
        colour_jitter=args.colour_jitter, mixup=args.mixup, aux_mask=args.aux_mask, seg_dice=args.seg_dice,
        seg_decoder=args.seg_decoder, ema=args.ema, deep_supervision=args.deep_supervision,
        seg_classify=args.seg_classify, elastic=args.elastic, flip=args.flip,
        rotation=args.rotation, precision=args.precision, stain_standardise=args.stain_standardise,
        external=tuple(args.external), distribute=args.distribute, distil_from=args.distil_from,
        distil_weight=args.distil_weight, distil_temperature=args.distil_temperature, verbose=0 if args.quiet else 1)


def setup_logging(log_file: str | None) -> None:
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers, force=True)


def refresh_all(out_dir: Path) -> int:
    """Retrain every bundle from the argv recorded in its metadata.json."""
    from core.checkpoints import list_bundles, read_metadata

    bundles = list_bundles(out_dir)
    if not bundles:
        print(f"No checkpoints in {out_dir}; pass options to train one (see --help).")
        return 1
    failures = 0
    for b in bundles:
        meta = read_metadata(b)
        argv = meta.get("argv")
        if argv is None:
            print(f"skip {b.name}: its metadata records no command")
            continue
        if meta.get("ensemble"):  # retrain every member from its own command on this split, then join them again
            paths = []
            for i, m in enumerate(meta["ensemble"]["members"], start=1):
                paths.append(str(out_dir / ".members" / f"{b.name}_member{i}"))
                margv, failed = encoder_first(m, m["argv"], out_dir)  # a member on a segmenter's encoder
                failures += failed
                print(f"== refreshing {b.name} member {i}: python train.py {' '.join(margv)}", flush=True)
                failures += main([*margv, "--split-file", str(b / "split.csv"), "--out-dir",
                                  str(out_dir / ".members"), "--name", f"{b.name}_member{i}"]) != 0
            argv = ["--ensemble", *paths, *ensemble_options(argv)]
        argv, failed = encoder_first(meta, argv, out_dir)
        failures += failed
        print(f"== refreshing {b.name}: python train.py {' '.join(argv)}", flush=True)
        failures += main([*argv, "--out-dir", str(out_dir), "--name", b.name]) != 0
    return 1 if failures else 0


def encoder_first(meta: dict, argv: list[str], out_dir: Path) -> tuple[list[str], int]:
    """For a classifier started from a lesion segmenter (its encoder, or with lesion pooling the whole of it) whose
    bundle is not here: retrain the segmenter from its recorded command into `out_dir/.encoders` first -> (the
    classifier's argv with --weights pointing there, 1 if that training failed else 0). Any other bundle's argv is
    returned as it is. `meta`: the classifier's metadata, or an ensemble member's entry in the ensemble's (it keeps
    the member's weights)."""
    from core.models import segmenter_bundle

    w = meta.get("weights") or {}
    if w.get("source") not in ("segmenter encoder", "segmenter") or "--weights" not in argv:
        return argv, 0
    i = argv.index("--weights") + 1
    if segmenter_bundle(argv[i]) is not None:
        return argv, 0
    if not w.get("segmenter_argv"):
        print(f"{meta.get('name')}: its encoder's segmenter {argv[i]} is not here and its command is not recorded")
        return argv, 1
    dest = out_dir / ".encoders"
    print(f"== refreshing {meta.get('name')}'s encoder first: python train.py {' '.join(w['segmenter_argv'])}",
          flush=True)
    failed = main([*w["segmenter_argv"], "--out-dir", str(dest), "--name", w["segmenter"]]) != 0
    return [*argv[:i], str(dest / w["segmenter"]), *argv[i + 1:]], int(failed)


def ensemble_options(argv: list[str]) -> list[str]:
    """An --ensemble command's arguments without its member bundles."""
    out, skipping = [], False
    for a in argv:
        if a == "--ensemble":
            skipping = True
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    from core.training.common import git_commit

    git_commit()  # the code this run starts from, recorded in every bundle it writes (read once per process)
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        return refresh_all(ROOT / "checkpoints")
    args = build_parser().parse_args(argv)
    setup_logging(args.log_file)
    from core.errors import BreastXAIError
    from core.training import add_cross_validation, add_segmenter_cross_validation, train, train_segmenter

    if args.ensemble:
        from core.training.ensemble import EnsembleConfig, train_ensemble

        cfg = EnsembleConfig(members=tuple(args.ensemble), name=args.name, out_dir=args.out_dir,
                             data_dir=args.data_dir if "--data-dir" in argv else None,
                             external=tuple(args.external), seed=args.seed)
        try:
            dest = train_ensemble(cfg, argv=argv)
        except BreastXAIError as exc:
            logging.getLogger("breastxai.train").error("%s", exc)
            return 2
        print(f"Checkpoint written: {dest}")
        return 0
    if args.task == "segmentation":
        run = add_segmenter_cross_validation if args.cv_only else train_segmenter
    else:
        run = add_cross_validation if args.cv_only else train
    try:
        dest = run(config_from_args(args), argv=argv)
    except BreastXAIError as exc:
        logging.getLogger("breastxai.train").error("%s", exc)
        return 2
    print("Worker finished; the chief wrote the checkpoint." if dest is None else f"Checkpoint written: {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
