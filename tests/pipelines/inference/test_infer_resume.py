"""A batch-inference driver killed midway leaves only whole parts; the same command then finishes the job.

Its console holds only the project's lines: Ray's (ray#53727's line at the actor pool's start, the raylet's
messages) are in Ray's log folder instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data.synthetic import generate_coco
from pipelines.inference.job import InferenceConfig, run_inference

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
# Lines of Ray's that reached the console before (issue 22); none is ours.
RAY_LINES = ("core_worker.cc", "53727", "worker processes have been started", "Progress bars disabled", "(raylet)")


def test_killed_job_finishes_on_rerun_with_every_image_once(ray_local, checkpoint, tmp_path):
    paths = generate_coco(tmp_path / "coco", 0, 60, image_size=((80, 120), (80, 120)), seed=5)
    images = Path(paths["root"]) / "val"
    out = tmp_path / "out"
    args = dict(checkpoint=str(checkpoint), input=str(images), output=str(out), images_per_part=2)
    args.update(batch_size=1, decode_batch=2, score_threshold=0.3, top_k=5)
    command = [sys.executable, str(REPO / "pipelines" / "infer.py")]
    for key, value in args.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    command += ["--address", ray_local.get_runtime_context().gcs_address]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log = open(tmp_path / "driver.log", "wb")
    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not list(out.glob("part-*.parquet")):
        assert driver.poll() is None, (
            f"the driver exited before writing a part: {(tmp_path / 'driver.log').read_text()}"
        )
        assert time.monotonic() < deadline, "no part written in 240 s"
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    log.close()
    console = (tmp_path / "driver.log").read_text()
    assert not [line for line in console.splitlines() if any(s in line for s in RAY_LINES)], console
    logs = Path(ray_local._private.worker._global_node.get_logs_dir_path())
    kept = logs / f"driver-console-{driver.pid}.log"
    assert "53727" in kept.read_text(), f"Ray's line about the actor's arguments is not in {kept}"

    killed = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    assert 0 < len(killed) < 30, f"{len(killed)} of 30 parts before the kill: the kill came too late to test resuming"
    done_before = sum(pq.read_table(out / name).num_rows for name in killed)  # every visible part reads whole
    assert done_before == 2 * len(killed)

    summary = run_inference(InferenceConfig(**args))
    assert summary["images_done_before"] == done_before
    assert summary["images_this_run"] == 60 - done_before
    uris = [u for p in sorted(out.glob("part-*.parquet")) for u in pq.read_table(p).column("uri").to_pylist()]
    assert sorted(uris) == sorted(str(p) for p in images.iterdir()), "an image is missing or has two rows"
    assert all((out / name).read_bytes() == data for name, data in killed.items()), "a part of the killed run changed"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
