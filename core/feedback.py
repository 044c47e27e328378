"""Clinician feedback: an embedded SQLite store (WAL) of agree/disagree verdicts, corrections and regions.

Default location: $BREASTXAI_FEEDBACK_DB, else the user's data directory
(~/.local/share/breastxai/feedback.sqlite3 on Linux), never inside checkpoints/.
Images are stored only with the user's consent. CLI: `python -m core.feedback export OUT.csv`.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

SCHEMA_VERSION = 1
ENV_VAR = "BREASTXAI_FEEDBACK_DB"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    image_name TEXT,
    checkpoint TEXT NOT NULL,
    checkpoint_sha256 TEXT,
    predicted TEXT NOT NULL,
    probabilities TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('agree', 'disagree')),
    correct_class TEXT,
    comment TEXT,
    region_png BLOB,
    consent INTEGER NOT NULL DEFAULT 0,
    image_png BLOB
);
CREATE INDEX IF NOT EXISTS feedback_checkpoint ON feedback(checkpoint);
"""


def default_path() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or (Path.home() / ".local" / "share")
    return Path(base) / "breastxai" / "feedback.sqlite3"


@dataclass(frozen=True)
class FeedbackRecord:
    image_sha256: str
    checkpoint: str
    predicted: str
    probabilities: dict
    verdict: str  # agree | disagree
    correct_class: Optional[str] = None
    comment: str = ""
    checkpoint_sha256: Optional[str] = None
    image_name: Optional[str] = None
    region: Optional[np.ndarray] = None  # bool (H, W)
    consent: bool = False
    image: Optional[np.ndarray] = None  # uint8 (H, W, 3); stored only if consent


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


class FeedbackStore:
    """Thread- and process-safe store; each call opens a short connection (WAL, busy timeout)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else default_path()
        if "checkpoints" in self.path.resolve().parts:
            raise ValueError("The feedback database must not live inside checkpoints/.")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema version {version}; this BreastXAI understands "
                                   f"{SCHEMA_VERSION}. Upgrade BreastXAI.")

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        con.execute("PRAGMA busy_timeout=60000")
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    def add(self, r: FeedbackRecord) -> int:
        if r.verdict not in ("agree", "disagree"):
            raise ValueError("verdict must be 'agree' or 'disagree'")
        region = _png((np.asarray(r.region, bool) * 255).astype(np.uint8)) if r.region is not None else None
        image = _png(r.image) if (r.consent and r.image is not None) else None
        name = r.image_name if r.consent else None  # without consent nothing identifying: no file name either
        row = (_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), r.image_sha256, name,
               r.checkpoint, r.checkpoint_sha256, r.predicted, json.dumps(r.probabilities), r.verdict,
               r.correct_class, r.comment, region, int(bool(r.consent)), image)
        con = self._connect()
        try:
            cur = con.execute(
                "INSERT INTO feedback (created, image_sha256, image_name, checkpoint, checkpoint_sha256, predicted, "
                "probabilities, verdict, correct_class, comment, region_png, consent, image_png) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            return int(cur.lastrowid)
        finally:
            con.close()

    def count(self) -> int:
        con = self._connect()
        try:
            return int(con.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])
        finally:
            con.close()

    def rows(self, ids: Optional[Sequence[int]] = None) -> list[dict]:
        """Every record, or only those with the given ids (a user's own, in the dashboard), in id order."""
        con = self._connect()
        con.row_factory = sqlite3.Row
        try:
            if ids is None:
                return [dict(r) for r in con.execute("SELECT * FROM feedback ORDER BY id")]
            ids = [int(i) for i in ids]
            marks = ",".join("?" * len(ids))
            return [dict(r) for r in con.execute(f"SELECT * FROM feedback WHERE id IN ({marks}) ORDER BY id", ids)] \
                if ids else []
        finally:
            con.close()

    def delete(self, record_id: int) -> bool:
        """Remove one record (its image and region too); True if it existed."""
        con = self._connect()
        try:
            with con:
                return con.execute("DELETE FROM feedback WHERE id = ?", (int(record_id),)).rowcount > 0
        finally:
            con.close()

    def export_csv(self, out: str | os.PathLike) -> int:
        """Write every record (without image bytes; a has_region / has_image flag instead); returns the count."""
        rows = self.rows()
        cols = ["id", "created", "image_sha256", "image_name", "checkpoint", "checkpoint_sha256", "predicted",
                "probabilities", "verdict", "correct_class", "comment", "consent", "has_region", "has_image"]
        with open(out, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for r in rows:
                r["has_region"] = int(r["region_png"] is not None)
                r["has_image"] = int(r["image_png"] is not None)
                w.writerow([r[c] for c in cols])
        return len(rows)

    def consented_images(self, class_names: Sequence[str]) -> list[tuple[np.ndarray, int]]:
        """(uint8 image, label) for consented records with a correct class among `class_names`.

        For 'agree' records the label is the prediction, for 'disagree' the correction.
        """
        from PIL import Image

        out = []
        for r in self.rows():
            if not r["consent"] or r["image_png"] is None:
                continue
            label = r["predicted"] if r["verdict"] == "agree" else r["correct_class"]
            if label not in class_names:
                continue
            img = np.asarray(Image.open(io.BytesIO(r["image_png"])).convert("RGB"))
            out.append((img, list(class_names).index(label)))
        return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.feedback", description="Clinician feedback database.")
    ap.add_argument("--db", default=None, help=f"database path (default ${ENV_VAR} or {default_path()})")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export", help="export every record to CSV")
    ex.add_argument("out")
    sub.add_parser("count", help="print the number of records")
    args = ap.parse_args(argv)
    store = FeedbackStore(args.db)
    if args.cmd == "export":
        n = store.export_csv(args.out)
        print(f"exported {n} record(s) from {store.path} to {args.out}")
    else:
        print(store.count())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
