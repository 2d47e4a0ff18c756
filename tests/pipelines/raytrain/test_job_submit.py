"""`ray start --head` on loopback, then `ray job submit --working-dir . -- python pipelines/train.py`: SUCCEEDED.

The job also fine-tunes from a checkpoint in the authors' format, with another class count. The checkpoint
it writes holds what the workers trained: the authors' frozen stem, which carries a value no initialization
gives, and trainable weights that moved away from the authors'. The job's console holds only the project's
lines: not the raylet's messages, nor matplotlib's INFO line when it builds a new font cache.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
STEM = "backbone.0.body.conv1.weight"  # frozen in training: what the workers hold is what they loaded
STEM_MARK = 0.0123
STEPS = 4  # 16 train images, 2 workers of 2 images


@pytest.fixture
def authors_checkpoint(tmp_path) -> Path:
    """A tiny model's weights in the authors' .pth layout (pickled argparse args), 91 COCO classes."""
    from core.build import build_model
    from pipelines.job_config import load_job_config

    job = load_job_config(preset="tiny", overrides=["model.num_classes=91"])
    model, _, _ = build_model(job.detr_config())
    with torch.no_grad():
        model.state_dict()[STEM].fill_(STEM_MARK)
    args = argparse.Namespace(
        **job.model.model_dump(), **job.matcher.model_dump(), **job.loss.model_dump(), dataset_file="coco", masks=False
    )
    path = tmp_path / "authors_tiny.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 49}, path)
    return path


def test_ray_job_submit_succeeds(tmp_path, tiny_data, authors_checkpoint, local_cluster_factory):
    from ray.job_submission import JobStatus, JobSubmissionClient

    # A fresh matplotlib cache: its "generated new fontManager" INFO line comes once per cache.
    cluster = local_cluster_factory(["--num-cpus=4"], {"MPLCONFIGDIR": str(tmp_path / "matplotlib")})
    address, env, ray_cli = cluster.address, cluster.env, str(BIN / "ray")
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
    theirs = ("(raylet)", "worker processes have been started", "core_worker.cc", "matplotlib", "Progress bars")
    assert not [line for line in logs.splitlines() if any(s in line for s in theirs)], logs[-4000:]
    run = storage / "submitted"
    assert (run / "checkpoint_epoch0000" / "checkpoint.pt").is_file()
    assert (run / "config.json").is_file() and (run / "ap_table.md").is_file()

    from core.build import build_model
    from core.checkpoint import FORMAT, read_checkpoint

    trained = read_checkpoint(run / "checkpoint_epoch0000" / "checkpoint.pt")
    assert trained.source_format == FORMAT and trained.config.model.num_classes == 3
    assert trained.extra["epoch"] == 0 and trained.extra["global_step"] == STEPS
    weights, authors = trained.model, torch.load(authors_checkpoint, weights_only=False)["model"]
    assert torch.equal(weights[STEM], authors[STEM]), "the workers did not start from the authors' weights"
    model, _, _ = build_model(trained.config, load_backbone_weights=False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and weights[n].shape == authors[n].shape]
    unchanged = [n for n in trainable if torch.equal(weights[n], authors[n])]
    assert trainable and not unchanged, (
        f"{len(unchanged)} of {len(trainable)} trained tensors never moved: {unchanged[:5]}"
    )
