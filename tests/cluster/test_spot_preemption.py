"""Spot-safe elastic training on the CPU: a two-node local cluster, one training worker per node, the
second node reclaimed as a spot node is (drained with Ray's preemption reason, then killed). The run
goes on with the one worker left, at half the lr and twice the steps per epoch, and finishes, although
train.max_failures is 0: a preemption is counted against train.max_preemption_failures instead.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = {2: 4, 1: 8}  # steps per epoch of 16 images, 2 per worker, by world size


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    from pipelines.data.synthetic import generate_coco

    root = tmp_path_factory.mktemp("tiny") / "shapes"
    generate_coco(root, 16, 5, image_size=((64, 96), (64, 96)), num_classes=3, max_objects=3, seed=0, threads=2)
    return root


def _reclaim_after_first_checkpoint(cluster, node_port: int, node_id: str, run: Path, done: dict) -> None:
    """What a cloud does to a spot node: notice (Ray's drain, reason preemption, short deadline), then kill."""
    deadline = time.time() + 600
    while not (run / "checkpoint_epoch0000" / "checkpoint.pt").is_file():
        if time.time() > deadline:
            return
        time.sleep(0.5)
    drain = subprocess.run(
        [
            "ray",
            "drain-node",
            f"--address={cluster.gcs_address}",
            f"--node-id={node_id}",
            "--reason=DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message=spot instance reclaimed",
            "--deadline-remaining-seconds=2",
        ],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    done["drain"] = drain
    time.sleep(2)
    done["killed"] = cluster.kill_node(node_port)


def test_run_survives_a_spot_reclamation_on_fewer_workers(local_cluster_factory, tiny_root, tmp_path):
    import ray

    from pipelines.job_config import load_job_config
    from pipelines.raytrain.training import run_training

    # Fast node-death detection and worker-group restarts, for a test on a loaded 2-core machine.
    env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}
    system = '{"health_check_period_ms": 1000, "health_check_failure_threshold": 3}'
    # One `slot` per node and one per training worker: one worker per node, as one GPU per node.
    cluster = local_cluster_factory(["--num-cpus=3", '--resources={"slot": 1}', f"--system-config={system}"], env)
    node_port = cluster.add_node(["--num-cpus=1", '--resources={"slot": 1}'])
    ray.init(address=cluster.gcs_address, log_to_driver=False)
    try:
        second = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerPort"] == node_port]
        assert second, ray.nodes()
        storage = tmp_path / "runs"
        job = load_job_config(
            preset="tiny",
            overrides=[
                f"data.root={tiny_root}",
                "demo_data=null",
                f"train.storage_path={storage}",
                "train.name=spot",
                "train.epochs=3",
                "train.eval_every=0",
                "train.num_vis_images=0",
                "train.num_workers=[1, 2]",
                'train.worker_resources={"slot": 1}',
                "train.max_failures=0",
                "train.max_preemption_failures=2",
                # Epoch checkpoints only: the resume is then at an epoch boundary whichever way the
                # drain's notice and the kill race (the mid-epoch resume has its own test in test_train_ray).
                "train.checkpoint_every_steps=0",
            ],
        )
        done: dict = {}
        reclaimer = threading.Thread(
            target=_reclaim_after_first_checkpoint,
            args=(cluster, node_port, second[0]["NodeID"], storage / "spot", done),
            daemon=True,
        )
        reclaimer.start()
        outcome = run_training(job)
        reclaimer.join(timeout=60)
        # The run's own actors live on the driver's node (the head), never on one that can be reclaimed.
        from ray.util.state import list_actors

        head = ray.get_runtime_context().get_node_id()
        for name in ("MetricsSink", "EpochClock"):
            placed = {
                a.node_id
                for a in list_actors(
                    cluster.gcs_address, filters=[("class_name", "=", name)], raise_on_missing_output=False
                )
            }
            assert placed == {head}, f"{name} actors on nodes {placed}, the driver's is {head}"
    finally:
        ray.shutdown()

    assert done.get("drain") is not None and done["drain"].returncode == 0, done.get("drain")
    assert done.get("killed"), "the second node was never reclaimed"
    assert outcome.error is None, f"the run failed: {outcome.error}"

    records = outcome.run_dir.read_metrics()
    events = [r for r in records if r.get("kind") == "event"]
    assert events[0]["event"] == "start" and events[0]["world_size"] == 2
    resumes = [e for e in events if e["event"] == "resume"]
    assert resumes and resumes[-1]["world_size"] == 1, events
    resumed_at = resumes[-1]["epoch"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    assert sorted({e["epoch"] for e in epochs}) == [0, 1, 2]
    last = {e["epoch"]: e for e in epochs}  # an epoch cut short by the reclamation runs again
    lr = job.train.lr  # the tiny preset's step schedule drops after the last epoch: a constant lr
    for epoch, record in last.items():
        world = 2 if epoch < resumed_at else 1
        assert record["lr"] == pytest.approx(lr * world / 2), (epoch, record["lr"])
    steps = [r for r in records if r.get("kind") == "step" and r["global_step"] > resumes[-1]["global_step"]]
    assert max(s["step"] for s in steps) == STEPS[1]
    assert resumes[-1]["global_step"] == resumed_at * STEPS[2]
    final = outcome.result.checkpoint
    assert final is not None and Path(final.path).name == "checkpoint_epoch0002"
