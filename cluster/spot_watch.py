"""The spot watcher: a small process beside the raylet of a spot VM that polls the cloud's metadata endpoint
for the reclamation notice and, on notice, drains the node with Ray's preemption reason and the notice's
deadline. Ray Train then counts the lost workers against `train.max_preemption_failures`, not
`train.max_failures`, and restarts the worker group from the last checkpoint. Ray drains a node on SIGTERM
only under `ray start --block` (KubeRay's pods); the launcher VMs need this.

The launcher configs' worker start commands start it on every worker; it watches only a node that
advertises the `spot` resource (the spot node types) and exits at once on the others:

    python -m cluster.spot_watch --cloud aws --address $RAY_HEAD_IP:6379

EC2 gives two minutes' notice (`meta-data/spot/instance-action`, IMDSv2), GCE about 30 s on VMs and about
15 s on GKE nodes (`instance/preempted`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import urllib.error
import urllib.request

AWS_METADATA = "http://169.254.169.254"
GCP_METADATA = "http://metadata.google.internal"
GCP_NOTICE_S = 30  # GCE's grace between the preemption notice and the stop (VMs; GKE nodes get ~15 s)
HTTP_TIMEOUT_S = 2


def aws_notice(base: str) -> float | None:
    """Seconds left before EC2 reclaims this instance, or None when no notice is posted (HTTP 404)."""
    token_req = urllib.request.Request(
        f"{base}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}
    )
    with urllib.request.urlopen(token_req, timeout=HTTP_TIMEOUT_S) as reply:
        token = reply.read().decode()
    req = urllib.request.Request(
        f"{base}/latest/meta-data/spot/instance-action", headers={"X-aws-ec2-metadata-token": token}
    )
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as reply:
            action = json.loads(reply.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise
    # {"action": "terminate" | "stop", "time": "2026-12-06T17:45:00Z"}
    when = datetime.datetime.fromisoformat(action["time"].replace("Z", "+00:00"))
    return max(0.0, when.timestamp() - time.time())


def gcp_notice(base: str) -> float | None:
    """Seconds left before GCE stops this preempted VM, or None while `instance/preempted` is FALSE."""
    req = urllib.request.Request(f"{base}/computeMetadata/v1/instance/preempted", headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as reply:
        preempted = reply.read().decode().strip().upper() == "TRUE"
    return float(GCP_NOTICE_S) if preempted else None


NOTICES = {"aws": (aws_notice, AWS_METADATA), "gcp": (gcp_notice, GCP_METADATA)}


def find_node(gcs, node_ip: str, node_manager_port: int | None) -> tuple[str, dict[str, float]]:
    """The hex id and total resources of the alive node on ``node_ip`` (and ``node_manager_port``, where
    several nodes share an address); raises naming what matched when not exactly one does."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    infos = list(gcs.get_all_node_info(timeout=30, state_filter=GcsNodeInfo.GcsNodeState.ALIVE).values())
    mine = [i for i in infos if i.node_manager_address == node_ip and node_manager_port in (None, i.node_manager_port)]
    if len(mine) != 1:
        where = f"{node_ip}" + (f" port {node_manager_port}" if node_manager_port else "")
        seen = ", ".join(f"{i.node_manager_address}:{i.node_manager_port}" for i in infos) or "none"
        raise LookupError(f"{len(mine)} alive Ray nodes on {where}, expected 1 (alive nodes: {seen})")
    return mine[0].node_id.hex(), dict(mine[0].resources_total)


def drain(gcs, node_id: str, seconds_left: float, cloud: str) -> None:
    """Ray's drain with the preemption reason: running tasks may finish until the deadline; nothing new
    is scheduled on the node."""
    from ray.core.generated.autoscaler_pb2 import DrainNodeReason

    deadline_ms = int((time.time() + seconds_left) * 1000)
    accepted, why = gcs.drain_node(
        node_id,
        DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        f"{cloud} spot instance reclaimed",
        deadline_ms,
    )
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node_id}: {why}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.spot_watch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cloud", choices=sorted(NOTICES), required=True)
    parser.add_argument("--address", required=True, help="the GCS address, host:port ($RAY_HEAD_IP:6379)")
    parser.add_argument("--metadata-url", help="the metadata server's base URL (default: the cloud's)")
    parser.add_argument("--node-ip", help="this node's Ray address (default: the one Ray picks)")
    parser.add_argument("--node-manager-port", type=int, help="this node's raylet port, where IPs are shared")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between two polls")
    args = parser.parse_args(argv)

    import ray
    from ray._raylet import GcsClient

    gcs = GcsClient(address=args.address)
    node_ip = args.node_ip or ray.util.get_node_ip_address()
    node_id, resources = find_node(gcs, node_ip, args.node_manager_port)
    if not resources.get("spot"):
        print(f"spot_watch: node {node_id} has no `spot` resource, nothing to watch", flush=True)
        return 0
    notice, default_base = NOTICES[args.cloud]
    base = (args.metadata_url or default_base).rstrip("/")
    print(f"spot_watch: watching {base} for node {node_id}", flush=True)
    while True:
        try:
            seconds_left = notice(base)
        except (OSError, ValueError, KeyError) as e:  # the endpoint briefly unreachable, a malformed notice
            print(f"spot_watch: metadata poll failed ({e}); polling on", flush=True)
            seconds_left = None
        if seconds_left is not None:
            drain(gcs, node_id, seconds_left, args.cloud)
            print(f"spot_watch: notice, drained node {node_id} with {seconds_left:.0f} s left", flush=True)
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
