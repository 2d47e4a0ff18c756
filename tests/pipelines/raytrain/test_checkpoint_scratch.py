"""A worker killed while it reports leaves its checkpoint's scratch folder; the next report removes it."""

from __future__ import annotations

import os
import subprocess
import tempfile

from pipelines.raytrain.state import checkpoint_scratch


def test_folders_of_processes_gone_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    left = tmp_path / f"ddetr-checkpoint_epoch0003-{gone.pid}-k1ll3d"
    live = tmp_path / f"ddetr-checkpoint_step00000040-{os.getppid()}-w0rk1n"
    others = [tmp_path / "ddetr-checkpoint_epoch0001-ab12cd34", tmp_path / f"ddetr-eval-{gone.pid}-x"]
    for d in (left, live, *others):
        d.mkdir()
        (d / "checkpoint.pt").write_bytes(b"weights")
    new = checkpoint_scratch("checkpoint_epoch0004")
    assert os.path.basename(new).startswith(f"ddetr-checkpoint_epoch0004-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, *others, tmp_path / new))
