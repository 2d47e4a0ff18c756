"""The spot watcher against a real local Ray node and a tiny HTTP server standing in for EC2's instance
metadata service (the `imds` fixture of conftest.py)."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time

import pytest

from cluster.spot_watch import find_node

pytestmark = [pytest.mark.ray]


def _watch(cluster, imds, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.spot_watch",
            "--cloud=aws",
            f"--address={cluster.gcs_address}",
            f"--metadata-url=http://127.0.0.1:{imds.server_address[1]}",
            f"--node-manager-port={port}",
            "--interval=0.2",
        ],
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_notice_drains_the_spot_node_with_the_preemption_reason(local_cluster_factory, imds):
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated.common_pb2 import NodeDeathInfo
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    cluster = local_cluster_factory(["--num-cpus=1"])
    spot_port = cluster.add_node(["--num-cpus=1", '--resources={"spot": 1}'])
    gcs = GcsClient(address=cluster.gcs_address)
    spot_id, _ = find_node(gcs, ray.util.get_node_ip_address(), spot_port)  # the default --node-ip
    head_id = next(i.node_id.hex() for i in gcs.get_all_node_info(timeout=30).values() if i.is_head_node)

    # The head advertises no `spot`: its watcher leaves at once, without polling.
    head_port = next(i.node_manager_port for i in gcs.get_all_node_info(timeout=30).values() if i.is_head_node)
    head_watch = _watch(cluster, imds, head_port)
    out, _ = head_watch.communicate(timeout=60)
    assert head_watch.returncode == 0 and "nothing to watch" in out, out
    assert imds.polls == 0

    watch = _watch(cluster, imds, spot_port)
    try:
        deadline = time.monotonic() + 60
        while imds.polls < 3 and watch.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watch.poll() is None, f"the watcher left before any notice:\n{watch.stdout.read()}"
        assert imds.polls >= 3, "the watcher never polled the metadata endpoint"
        when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=120)
        imds.notice = {"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
        out, _ = watch.communicate(timeout=60)
    finally:
        if watch.poll() is None:
            watch.kill()
    assert watch.returncode == 0 and f"drained node {spot_id}" in out, out

    # Idle, the drained node leaves at once; GCS records why: the preemption, with the watcher's message.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        infos = {i.node_id.hex(): i for i in gcs.get_all_node_info(timeout=30).values()}
        if infos[spot_id].state == GcsNodeInfo.GcsNodeState.DEAD:
            break
        time.sleep(0.5)
    spot = infos[spot_id]
    assert spot.state == GcsNodeInfo.GcsNodeState.DEAD, "the drained spot node is still alive"
    assert spot.death_info.reason == NodeDeathInfo.AUTOSCALER_DRAIN_PREEMPTED, spot.death_info
    assert spot.death_info.reason_message == "aws spot instance reclaimed"
    assert infos[head_id].state == GcsNodeInfo.GcsNodeState.ALIVE
