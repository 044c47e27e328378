"""train.py --distribute multiworker: two workers on localhost train in lockstep; the chief writes one bundle."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

import train
from tests.conftest import ROOT


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_two_local_workers_agree_and_one_bundle_is_written(tiny_tree, tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = [sys.executable, str(ROOT / "train.py"), "--dataset", "folder", "--data-dir", str(tiny_tree),
            "--backbone", "simple_cnn", "--input-size", "32", "--head-epochs", "2", "--fine-tune-epochs", "0",
            "--head-units", "16", "--dropout", "0", "--batch-size", "8", "--distribute", "multiworker",
            "--name", "dist", "--out-dir", str(tmp_path / "out"), "--quiet"]
    procs = []
    for i in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
               "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=420)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-worker training did not finish")
    assert [p.returncode for p in procs] == [0, 0], outs
    digests = [re.search(r"final trainable weights sha256 ([0-9a-f]{64})", o).group(1) for o in outs]
    assert digests[0] == digests[1]  # synchronous training: both workers hold the same weights
    assert "Checkpoint written" in outs[0] and "the chief wrote the checkpoint" in outs[1]
    bundles = [p.name for p in (tmp_path / "out").iterdir()]
    assert bundles == ["dist"]
    meta = json.loads((tmp_path / "out" / "dist" / "metadata.json").read_text())
    d = meta["training"]["distribute"]
    assert d["workers"] == 2 and d["trainable_weights_sha256"] == digests[0] and meta["config"]["distribute"] == "multiworker"


def test_multiworker_without_tf_config_is_a_message(tiny_tree, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    rc = train.main(["--dataset", "folder", "--data-dir", str(tiny_tree), "--backbone", "simple_cnn",
                     "--input-size", "32", "--distribute", "multiworker", "--out-dir", str(tmp_path), "--quiet"])
    assert rc == 2 and "needs TF_CONFIG" in capsys.readouterr().out
