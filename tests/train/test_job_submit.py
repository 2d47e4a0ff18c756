"""`ray start --head` on loopback, then `ray job submit --working-dir . -- python pipelines/train.py`: SUCCEEDED.

The job also fine-tunes from a checkpoint in the authors' format, with another class count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line names our cluster's temp dir (only the cluster this test started)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry))
    return pids


def _stop_cluster(temp_dir: str) -> None:
    # Not `ray stop`: it would stop every Ray on the machine, other people's included.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_using(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while pids and time.time() < deadline and _pids_using(temp_dir):
            time.sleep(0.5)


@pytest.fixture
def authors_checkpoint(tmp_path) -> Path:
    """A tiny model's weights in the authors' .pth layout (pickled argparse args), 91 COCO classes."""
    from core.build import build_model
    from pipelines.config import load_job_config

    job = load_job_config(preset="tiny", overrides=["model.num_classes=91"])
    model, _, _ = build_model(job.detr_config())
    args = argparse.Namespace(
        **job.model.model_dump(), **job.matcher.model_dump(), **job.loss.model_dump(), dataset_file="coco", masks=False
    )
    path = tmp_path / "authors_tiny.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 49}, path)
    return path


def test_ray_job_submit_succeeds(tmp_path, tiny_data, authors_checkpoint):
    from ray.job_submission import JobStatus, JobSubmissionClient

    # A short temp dir: Ray's socket paths must stay under the Unix limit.
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    flags = (
        "port",
        "dashboard-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
        "ray-client-server-port",
    )
    ray_cli = str(BIN / "ray")
    try:
        # Every port of our own: other Ray instances may be running on this machine (CI shards, people).
        # Ray's own components take random ports too and may take one of ours between picking and
        # binding it: a failed start is cleaned up and tried again with fresh ports.
        for _ in range(3):
            ports = {flag: _free_port() for flag in flags}
            start = subprocess.run(
                [
                    ray_cli,
                    "start",
                    "--head",
                    "--node-ip-address=127.0.0.1",
                    "--dashboard-host=127.0.0.1",
                    *[f"--{flag}={port}" for flag, port in ports.items()],
                    "--num-cpus=4",
                    "--object-store-memory=200000000",
                    f"--temp-dir={temp_dir}",
                    "--disable-usage-stats",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            if start.returncode == 0:
                break
            _stop_cluster(temp_dir)
        assert start.returncode == 0, f"ray start failed 3 times:\n{start.stdout[-2000:]}\n{start.stderr[-3000:]}"
        address = f"http://127.0.0.1:{ports['dashboard-port']}"
        client = JobSubmissionClient(address)
        submission_id = f"ddetr-test-{os.getpid()}"
        storage = tmp_path / "runs"
        command = [
            ray_cli,
            "job",
            "submit",
            f"--address={address}",
            f"--submission-id={submission_id}",
            "--working-dir",
            ".",
            "--",
            "python",
            "pipelines/train.py",
            "--preset",
            "tiny",
            "--set",
            f"data.root={tiny_data['root']}",
            "--set",
            "demo_data=null",
            "--set",
            f"train.storage_path={storage}",
            "--set",
            "train.name=submitted",
            "--set",
            "train.epochs=1",
            "--set",
            f"train.finetune_from={authors_checkpoint}",
        ]
        deadline = time.time() + 120
        while True:  # the job agent comes up a few seconds after `ray start` returns
            submit = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=480)
            if "No available agent" not in submit.stderr or time.time() > deadline:
                break
            time.sleep(3)
        assert submit.returncode == 0, f"{submit.stdout[-3000:]}\n{submit.stderr[-3000:]}"
        status = client.get_job_status(submission_id)
        logs = client.get_job_logs(submission_id)
        assert status == JobStatus.SUCCEEDED, f"status {status}\n{submit.stderr[-2000:]}\n{logs[-4000:]}"
        assert "final COCO AP (val)" in logs
        run = storage / "submitted"
        assert (run / "checkpoint_epoch0000" / "checkpoint.pt").is_file()
        assert (run / "config.json").is_file() and (run / "ap_table.md").is_file()
    finally:
        _stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
