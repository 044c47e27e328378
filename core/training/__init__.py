"""Training: classifiers (`classify`), lesion segmenters (`segment`) and what they share (`common`).

`train(cfg)` writes a classifier bundle, `train_segmenter(cfg)` a segmenter bundle (`train.py --task
segmentation`); both take the same frozen `TrainConfig`.
"""
from core.training.classify import (TrainConfig, add_cross_validation, cross_validate, cv_work_dir, fit_model,
                                    load_arrays, make_augmenter, train)
from core.training.common import FLIPS, PRECISIONS, cpu_has_bf16, mixed_precision, resolve_precision, set_seeds
from core.training.segment import SEG_DECODERS, SEG_DICE, add_segmenter_cross_validation, train_segmenter

__all__ = ["FLIPS", "PRECISIONS", "SEG_DECODERS", "SEG_DICE", "TrainConfig", "add_cross_validation",
           "add_segmenter_cross_validation", "cpu_has_bf16", "cross_validate", "cv_work_dir", "fit_model", "load_arrays",
           "make_augmenter", "mixed_precision", "resolve_precision", "set_seeds", "train", "train_segmenter"]
