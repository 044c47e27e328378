"""Distillation (`train.py --distil-from`): the soft targets, the teacher's recipes, and a tiny end-to-end run
whose cross-validation retrains the teacher in every fold."""
from __future__ import annotations

import json

import numpy as np
import pytest

import core.training.classify as T
import train
from core.checkpoints import load_classifier
from core.errors import ConfigError
from core.training.classify import config_from_json
from core.training.distil import soft_targets, teacher_recipes


def test_soft_targets_by_hand():
    # p = (0.8, 0.2) at T = 2: softmax(log p / 2) = (sqrt 0.8, sqrt 0.2) / (sqrt 0.8 + sqrt 0.2) = (2/3, 1/3).
    t = soft_targets(np.array([[0.8, 0.2], [0.8, 0.2]]), np.array([1, 0]), weight=0.5, temperature=2.0)
    np.testing.assert_allclose(t, [[1 / 3, 2 / 3], [5 / 6, 1 / 6]], atol=1e-6)
    np.testing.assert_allclose(soft_targets(np.array([[0.8, 0.2]]), np.array([1]), 0.0, 2.0), [[0, 1]])
    np.testing.assert_allclose(soft_targets(np.array([[0.8, 0.2]]), np.array([1]), 1.0, 1.0), [[0.8, 0.2]],
                               atol=1e-6)
    for weight, temperature in ((1.5, 2.0), (-0.1, 2.0), (0.5, 0.0)):
        with pytest.raises(ConfigError):
            soft_targets(np.array([[0.8, 0.2]]), np.array([1]), weight, temperature)


def test_teacher_recipes_of_an_ensemble_are_its_members_configs(tmp_path):
    member = tmp_path / "m2"
    member.mkdir()
    (member / "metadata.json").write_text(json.dumps({"config": {"head_units": [], "logistic_c": 0.003,
                                                                 "scales": [160], "not_an_option": 1}}))
    ens = tmp_path / "ens"
    ens.mkdir()
    (ens / "metadata.json").write_text(json.dumps({"ensemble": {"members": [
        {"bundle": "elsewhere", "config": {"fine_tune_layers": 286, "head_units": [256, 128, 64]}},
        {"bundle": str(member)}]}}))  # no recorded config: read from the member's own bundle
    first, second = teacher_recipes(ens)
    assert first.fine_tune_layers == 286 and first.head_units == (256, 128, 64)
    assert second.logistic_c == 0.003 and second.scales == (160,) and second.head_units == ()
    assert config_from_json({"lr": 0.5}).lr == 0.5 and config_from_json({}).lr == T.TrainConfig().lr
    (ens / "metadata.json").write_text(json.dumps({"ensemble": {"members": [{"bundle": str(tmp_path / "gone")}]}}))
    with pytest.raises(ConfigError, match="no recorded configuration"):
        teacher_recipes(ens)


@pytest.mark.slow
def test_distillation_end_to_end(tiny_bundle, tiny_tree, tmp_path, monkeypatch):
    """The student trains on the teacher bundle's softened probabilities of its own training images; its CV
    retrains the teacher's recipe on every fold's training part before training the fold's student on it."""
    calls = []
    real = T.train_model

    def spy(cfg, k, train_data, val_data, soft_targets=None, masks=None):
        calls.append((cfg, np.array(train_data[0]), np.array(train_data[1]), soft_targets))
        return real(cfg, k, train_data, val_data, soft_targets=soft_targets, masks=masks)

    monkeypatch.setattr(T, "train_model", spy)
    rc = train.main(["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "simple_cnn",
                     "--input-size", "32", "--head-epochs", "2", "--fine-tune-epochs", "0", "--head-units", "8",
                     "--dropout", "0", "--lr", "3e-3", "--batch-size", "8", "--cv-folds", "2",
                     "--distil-from", str(tiny_bundle), "--distil-weight", "0.7", "--distil-temperature", "3",
                     "--split-file", str(tiny_bundle / "split.csv"), "--name", "student", "--out-dir",
                     str(tmp_path), "--quiet"])
    assert rc == 0
    teacher = load_classifier(tiny_bundle, backend="keras")
    # Final student: targets from the committed teacher on exactly its training images.
    cfg, x, y, soft = calls[0]
    assert cfg.distil_from == str(tiny_bundle) and cfg.head_units == (8,)
    np.testing.assert_allclose(soft, soft_targets(teacher.raw_proba(x), y, 0.7, 3.0), atol=1e-4)
    assert np.all(soft[np.arange(len(y)), y] >= 0.3 - 1e-6)
    # CV: per fold the teacher's recipe (its recorded head of 16 units, no targets), then the student on targets.
    assert len(calls) == 1 + 2 * 2
    for fold in (calls[1:3], calls[3:5]):
        (t_cfg, t_x, _, t_soft), (s_cfg, s_x, s_y, s_soft) = fold
        assert t_cfg.head_units == (16,) and t_cfg.distil_from is None and t_soft is None
        assert s_cfg.head_units == (8,) and s_soft is not None and s_soft.shape == (len(s_y), 2)
        np.testing.assert_array_equal(t_x, s_x)  # the fold's teacher saw only the fold's training images
        np.testing.assert_allclose(s_soft.sum(axis=1), 1.0, atol=1e-5)
    meta = json.loads((tmp_path / "student" / "metadata.json").read_text())
    d = meta["distillation"]
    assert d["teacher_model_sha256"] == teacher.metadata["model_sha256"] and (d["weight"], d["temperature"]) == (0.7, 3)
    assert "teacher's recipe is retrained" in meta["cross_validation"]["method"]
    assert meta["config"]["distil_from"] == str(tiny_bundle)
    load_classifier(tmp_path / "student", backend="keras")


def test_distillation_refuses_a_teacher_of_another_input(tiny_bundle, tiny_tree, tmp_path, capsys):
    rc = train.main(["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "simple_cnn",
                     "--input-size", "40", "--head-epochs", "1", "--fine-tune-epochs", "0", "--head-units", "8",
                     "--distil-from", str(tiny_bundle), "--name", "bad", "--out-dir", str(tmp_path), "--quiet"])
    assert rc == 2 and "same input" in capsys.readouterr().out and not (tmp_path / "bad").exists()
