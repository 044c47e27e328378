"""Feedback store: schema, consent, export, and 8 concurrent writer processes losing no rows."""
from __future__ import annotations

import csv
import sqlite3

import numpy as np
import pytest

from core.feedback import SCHEMA_VERSION, FeedbackRecord, FeedbackStore, main


def rec(i: int = 0, **kw) -> FeedbackRecord:
    base = dict(image_sha256=f"{i:064x}", checkpoint="busi_densenet121", predicted="benign",
                probabilities={"benign": 0.8, "malignant": 0.2}, verdict="agree")
    base.update(kw)
    return FeedbackRecord(**base)


def test_schema_wal_and_roundtrip(tmp_path):
    store = FeedbackStore(tmp_path / "fb.sqlite3")
    con = sqlite3.connect(store.path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    img = np.full((20, 20, 3), 9, np.uint8)
    store.add(rec(1, verdict="disagree", correct_class="malignant", comment="spiculated margin",
                  region=np.eye(20, dtype=bool), image=img, consent=False, image_name="Smith_J_case12.png"))
    store.add(rec(2, image=img, consent=True, image_name="case2.png"))
    rows = store.rows()
    assert [r["image_png"] is None for r in rows] == [True, False], "image kept only with consent"
    assert [r["image_name"] for r in rows] == [None, "case2.png"], "file name kept only with consent"
    assert rows[0]["region_png"] is not None and rows[0]["comment"] == "spiculated margin"
    assert store.consented_images(["benign", "malignant"])[0][1] == 0
    with pytest.raises(ValueError):
        store.add(rec(3, verdict="maybe"))


def test_never_inside_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="checkpoints"):
        FeedbackStore(tmp_path / "checkpoints" / "fb.sqlite3")


def test_export_cli(tmp_path, capsys):
    db = tmp_path / "fb.sqlite3"
    s = FeedbackStore(db)
    for i in range(3):
        s.add(rec(i))
    out = tmp_path / "out.csv"
    assert main(["--db", str(db), "export", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 3 and rows[0]["verdict"] == "agree" and "image_png" not in rows[0]


def _writer(db: str, worker: int, n: int) -> None:
    s = FeedbackStore(db)
    for i in range(n):
        s.add(rec(worker * 10_000 + i, comment=f"w{worker}"))


def test_concurrent_writers_lose_nothing(tmp_path):
    """8 writer processes x 200 inserts; plain subprocesses (independent of whatever __main__ is in this run)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    db = str(tmp_path / "fb.sqlite3")
    FeedbackStore(db)
    code = "import sys; from tests.test_feedback import _writer; _writer(sys.argv[1], int(sys.argv[2]), 200)"
    procs = [subprocess.Popen([sys.executable, "-c", code, db, str(w)], cwd=ROOT) for w in range(8)]
    seen = []
    reader = FeedbackStore(db)
    while any(p.poll() is None for p in procs):
        seen.append(reader.count())
    for p in procs:
        assert p.wait(120) == 0
    assert reader.count() == 1600
    assert seen == sorted(seen), "a reader never sees the count go backwards"
    ids = [r["image_sha256"] for r in reader.rows()]
    assert len(set(ids)) == 1600


def test_train_adds_consented_feedback_images(tiny_tree, tmp_path):
    import json

    import train
    from tests.conftest import make_class_image

    db = tmp_path / "fb.sqlite3"
    s = FeedbackStore(db)
    rng = np.random.default_rng(3)
    s.add(rec(1, verdict="disagree", correct_class="malignant", image=make_class_image(1, rng), consent=True))
    s.add(rec(2, image=make_class_image(0, rng), consent=True))
    s.add(rec(3, image=make_class_image(0, rng), consent=False))  # no consent: not used
    assert train.main(["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "simple_cnn",
                       "--input-size", "32", "--head-epochs", "1", "--fine-tune-epochs", "0", "--head-units", "8",
                       "--feedback", str(db), "--out-dir", str(tmp_path), "--name", "fb", "--quiet"]) == 0
    meta = json.loads((tmp_path / "fb" / "metadata.json").read_text())
    assert meta["split"]["feedback_images_added_to_train"] == 2


def test_rows_by_id_and_delete(tmp_path):
    store = FeedbackStore(tmp_path / "fb.sqlite3")
    a, b, c = (store.add(rec(i, image=np.zeros((4, 4, 3), np.uint8), consent=True)) for i in range(3))
    assert [r["id"] for r in store.rows([c, a])] == [a, c] and store.rows([]) == []
    assert store.delete(b) and not store.delete(b)
    assert [r["id"] for r in store.rows()] == [a, c]
