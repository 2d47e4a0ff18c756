"""The command the training RayJob runs (cluster/kuberay/rayjob-train.yaml), run end to end through
`ray job submit` against a local `ray start --head`, with the tiny config: SUCCEEDED, checkpoint written.

The entrypoint is taken from the manifest as it is; only what a CPU machine cannot have is replaced:
the preset (tiny for r50_box_refine), the bucket paths (a temp folder), the epochs and the worker
range (one or two CPU workers of one CPU). Its other options (the run name, the market resource) stay, and
the local cluster advertises the `spot` resource as the cluster configs' spot workers do. As in the
image, the project is installed and no working directory is shipped.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_PROJECT_DIR = "/home/ray/ddetr"


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """16 train / 5 val generated images of 3 shape classes, 64-96 px."""
    from pipelines.data.synthetic import generate_coco

    root = tmp_path_factory.mktemp("tiny") / "shapes"
    generate_coco(root, 16, 5, image_size=((64, 96), (64, 96)), num_classes=3, max_objects=3, seed=0, threads=2)
    return root


def tiny_command(entrypoint: str, root: Path, storage: Path) -> tuple[list[str], dict[str, str]]:
    """The RayJob's command with the CPU-sized replacements; also its remaining ``--set`` items by key."""
    argv = shlex.split(entrypoint)
    assert argv[1].startswith(IMAGE_PROJECT_DIR + "/"), argv[1]
    out = [argv[0], str(REPO_ROOT / argv[1][len(IMAGE_PROJECT_DIR) + 1 :])]
    replaced = {
        "data.root": str(root),
        "demo_data": "null",
        "train.storage_path": str(storage),
        "train.epochs": "1",
        "train.num_workers": "[1, 2]",
        "train.cpus_per_worker": "1",
    }
    kept, rest = {}, iter(argv[2:])
    for arg in rest:
        value = next(rest)
        if arg == "--preset":
            out += ["--preset", "tiny"]
        elif arg == "--set":
            key = value.partition("=")[0]
            if key not in replaced:
                out += ["--set", value]
                kept[key] = value.partition("=")[2]
        else:
            out += [arg, value]
    for key, value in replaced.items():
        out += ["--set", f"{key}={value}"]
    return out, kept


def test_rayjob_train_entrypoint_runs(ray_head, tiny_root, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    with open(REPO_ROOT / "cluster" / "kuberay" / "rayjob-train.yaml") as f:
        entrypoint = yaml.safe_load(f)["spec"]["entrypoint"]
    storage = tmp_path / "runs"
    command, kept = tiny_command(entrypoint, tiny_root, storage)
    assert "train.name" in kept and "train.worker_resources" in kept, f"the RayJob's options changed: {kept}"
    submission_id = f"rayjob-train-{time.time_ns()}"
    submit = [
        "ray",
        "job",
        "submit",
        f"--address={ray_head['address']}",
        f"--submission-id={submission_id}",
        "--",
        *command,  # the CLI quotes each argument back into one shell line, as the RayJob's entrypoint is
    ]
    deadline = time.time() + 120
    while True:  # the job agent comes up a few seconds after `ray start` returns
        proc = subprocess.run(submit, cwd=REPO_ROOT, env=ray_head["env"], capture_output=True, text=True, timeout=600)
        if "No available agent" not in proc.stderr or time.time() > deadline:
            break
        time.sleep(3)
    client = JobSubmissionClient(ray_head["address"])
    logs = client.get_job_logs(submission_id)
    status = client.get_job_status(submission_id)
    assert proc.returncode == 0 and status == JobStatus.SUCCEEDED, (
        f"status {status}\n{proc.stderr[-2000:]}\n{logs[-5000:]}"
    )
    run = storage / kept["train.name"]
    assert (run / "checkpoint_epoch0000" / "checkpoint.pt").is_file(), logs[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["worker_resources"] == json.loads(kept["train.worker_resources"])
    assert "final COCO AP (val)" in logs
