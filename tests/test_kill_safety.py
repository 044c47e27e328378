"""Training never destroys what exists: SIGKILL a real tiny run mid-epoch and mid-write."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core.checkpoints import list_bundles, load_classifier
from tests.conftest import ROOT


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def existing(tiny_bundle, tmp_path):
    import shutil

    shutil.copytree(tiny_bundle, tmp_path / "tiny")
    return tmp_path / "tiny"


def test_sigkill_mid_epoch_keeps_previous_bundle(existing, tiny_tree):
    before = digest(existing)
    cmd = [sys.executable, "-u", str(ROOT / "train.py"), "--dataset", "folder", "--data-dir", str(tiny_tree),
           "--backbone", "simple_cnn", "--input-size", "64", "--head-epochs", "500", "--fine-tune-epochs", "0",
           "--patience", "500", "--batch-size", "2", "--name", "tiny", "--out-dir", str(existing.parent)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
    deadline = time.time() + 180
    seen = ""
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen += line
        if "Epoch 2/" in line:  # the first epoch is done and the second has started
            time.sleep(0.3)
            break
    assert proc.poll() is None, seen[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert digest(existing) == before
    load_classifier(existing)
    assert list_bundles(existing.parent) == [existing]


def test_sigkill_while_writing_keeps_previous_bundle(existing):
    before = digest(existing)
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from core.checkpoints import write_bundle
        def fill(tmp):
            (tmp / "model.keras").write_bytes(b"half a model")
            print("writing", flush=True)
            time.sleep(60)
        write_bundle(Path({str(existing)!r}), fill)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert digest(existing) == before
    load_classifier(existing)
    leftovers = [p for p in existing.parent.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and list_bundles(existing.parent) == [existing]
    # the next writer of that bundle clears the dead writer's temporary folder
    from core.checkpoints import write_bundle
    write_bundle(existing.parent / "other", lambda t: (t / "x").write_text("1"))
    write_bundle(existing, lambda t: [(t / n).write_bytes((existing / n).read_bytes()) for n in before])
    assert not [p for p in existing.parent.iterdir() if p.name.startswith(".tmp-")]
    assert digest(existing) == before
