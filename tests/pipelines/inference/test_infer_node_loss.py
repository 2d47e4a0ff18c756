"""A node lost in the middle of a batch-inference job: the job still gives every image exactly one row."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data.synthetic import generate_coco
from pipelines.inference.job import InferenceConfig, run_inference

pytestmark = [pytest.mark.ray, pytest.mark.slow]


class _Blocker:
    def ready(self) -> bool:
        return True


def _kill_after_first_part(cluster, node_port: int, blocker, out: Path, done: dict) -> None:
    """Kills the second node once a part is written, then frees the head for the rest of the job."""
    import ray

    deadline = time.monotonic() + 240
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)
    done["parts_before"] = len(list(out.glob("part-*.parquet")))
    done["killed"] = cluster.kill_node(node_port)
    ray.kill(blocker)


def test_job_survives_a_lost_node_with_every_image_once(local_cluster_factory, checkpoint, tmp_path):
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from ray.util.state import list_tasks

    # Node death noticed within seconds on a loaded 2-core machine.
    system = '{"health_check_period_ms": 1000, "health_check_failure_threshold": 3}'
    # Until the kill an actor holds the head's CPUs, so that the job starts on the second node alone:
    # its model actor and decode tasks, and the blocks they hold, are lost with it. Then the head takes over.
    cluster = local_cluster_factory(["--num-cpus=2", f"--system-config={system}"])
    node_port = cluster.add_node(["--num-cpus=2"])
    paths = generate_coco(tmp_path / "coco", 0, 12, image_size=((80, 120), (80, 120)), seed=7)
    images = Path(paths["root"]) / "val"
    out = tmp_path / "out"
    cfg = InferenceConfig(
        checkpoint=str(checkpoint),
        input=str(images),
        output=str(out),
        images_per_part=2,
        batch_size=1,
        decode_batch=1,
        score_threshold=0.3,
        top_k=5,
    )
    ray.init(address=cluster.gcs_address, log_to_driver=False)
    try:
        (second,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerPort"] == node_port]
        head = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        blocker = ray.remote(num_cpus=2)(_Blocker).options(scheduling_strategy=head).remote()
        ray.get(blocker.ready.remote())
        done: dict = {}
        args = (cluster, node_port, blocker, out, done)
        killer = threading.Thread(target=_kill_after_first_part, args=args, daemon=True)
        killer.start()
        summary = run_inference(cfg)
        killer.join(timeout=60)
        ran_there = list_tasks(cluster.gcs_address, filters=[("node_id", "=", second)], raise_on_missing_output=False)
    finally:
        ray.shutdown()

    assert done.get("killed"), "the second node was never killed"
    assert done["parts_before"] < 6, "the job had finished before the node was lost"
    assert [t for t in ran_there if "Predict" in t.name], "the model actor never ran there"
    assert summary["images_this_run"] == 12
    uris = [u for p in sorted(out.glob("part-*.parquet")) for u in pq.read_table(p).column("uri").to_pylist()]
    assert sorted(uris) == sorted(str(p) for p in images.iterdir()), "an image is missing or has two rows"
