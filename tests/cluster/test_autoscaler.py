"""The autoscaler for real, without a cloud: Ray's autoscaler v2 on its fake multi-node provider (worker
nodes are raylets on this machine), with the node types, limits and idle timeout of cluster/aws.yaml
scaled down, and one elastic training run through everything a spot cluster does to it.

The run asks for one GPU worker on the spot market, [1, 2] workers. It starts on the one 1-GPU spot node
the cluster holds (the autoscaler started it, from zero, for the type's min_workers). Spot capacity for a
second node appears: the autoscaler launches a 1-GPU spot node for the run's demand, never an on-demand
one, and Ray Train grows the group to two workers, a restart from the latest step checkpoint. The second
node then gets EC2's reclamation notice from a fake metadata server: the spot watcher that the launcher
starts on every worker drains it with Ray's preemption reason, the workers write a checkpoint, the node
dies at the notice's time, and the run goes on from that checkpoint although train.max_failures is 0
(the autoscaler replaces the node; the group may grow again). Each restart costs at most
train.checkpoint_every_steps steps. After the run the idle nodes go away.

The GPU of the YAML's node types is a custom resource here (FAKE_GPU): the workers ask for it through
train.worker_resources, and nothing touches CUDA.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

# pytest-timeout: the suite's 900 s is not enough on a 2-core machine shared with other clusters.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1800)]

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_GPU = "fake_GPU"
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # the fake provider's id of the head (its node_provider.py)
# A 1-GPU node type's 8 vCPUs become 1 CPU: one training worker per node, as on the GPU nodes, and the
# decode tasks of Ray Data on the head, on a machine of 2 cores.
CPU_DIVISOR = 8
MAX_NODES_PER_TYPE = 2  # this machine holds a few raylets, not the YAML's 8 per type
EVERY = 3  # train.checkpoint_every_steps
KILL_AFTER_S = 10
NOTICE_S = 15  # the notice's lead (EC2 gives 120 s): time to see it and write the checkpoint, on a slow CI
# 28 steps an epoch on one worker, 14 on two. What trains after the reclaimed node's restart only ends
# the run, but some must be left then: on this 2-core machine runs had trained 60 to 100 of these 168
# images when that node died (5 epochs of 48 images left 140 or more to train after it).
IMAGES, EPOCHS = 56, 3
TIMEOUT_S = 600  # any one wait; the test fails on what it did not see, never on how long it took


def fake_cluster_config(launcher_yaml: Path) -> tuple[dict, dict]:
    """The fake-provider autoscaling config of a launcher config, and its head's Ray resources.

    Node types, resources, min/max workers, upscaling speed and idle timeout come from the YAML: GPU
    becomes FAKE_GPU, a worker's CPUs are divided by CPU_DIVISOR, at most MAX_NODES_PER_TYPE nodes a
    type, and the idle timeout's minutes become seconds. Node configs (instance types, images) are the
    cloud's: the fake provider takes none.
    """
    launcher = yaml.safe_load(launcher_yaml.read_text())
    types = launcher["available_node_types"]
    head = dict(types[launcher["head_node_type"]]["resources"])
    head.pop("GPU", None)  # the head of our configs has none
    workers = {}
    for name, node_type in types.items():
        if name == launcher["head_node_type"]:
            continue
        resources = dict(node_type["resources"])
        if resources.get("GPU"):
            resources[FAKE_GPU] = resources.pop("GPU")
        resources["CPU"] = max(1, resources["CPU"] // CPU_DIVISOR)
        workers[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": node_type.get("min_workers", 0),
            "max_workers": min(node_type["max_workers"], MAX_NODES_PER_TYPE),
        }
    workers["ray.head.default"] = {"resources": {}, "node_config": {}, "max_workers": 0}
    config = {
        "cluster_name": "autoscaler-test",
        "max_workers": launcher["max_workers"],
        "upscaling_speed": launcher["upscaling_speed"],
        "idle_timeout_minutes": launcher["idle_timeout_minutes"] / 60,
        # Ray's fake provider under its class name: as type `fake_multinode` the autoscaler would read that
        # type's defaults file, fake_multi_node/example.yaml, which the Ray 2.60 wheel does not ship.
        "provider": {
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "launch_multiple": True,
            "head_node_id": FAKE_HEAD_NODE_ID,
            "disable_node_updaters": True,  # nothing to install on a raylet of this machine
        },
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": workers,
        "head_node_type": "ray.head.default",
        **{k: [] for k in ("cluster_synced_files", "initialization_commands", "setup_commands")},
        **{k: [] for k in ("head_setup_commands", "worker_setup_commands")},
        **{k: [] for k in ("head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }
    return config, head


@pytest.mark.parametrize("launcher", ["aws.yaml", "gcp.yaml"])
def test_fake_cluster_config_follows_the_launcher_yaml(launcher):
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID as rays_head_id

    config, head = fake_cluster_config(REPO_ROOT / "cluster" / launcher)
    types = config["available_node_types"]
    assert head == {"CPU": 4}
    assert set(types) == {"gpu1_spot", "gpu1_ondemand", "gpu8_spot", "gpu8_ondemand", "ray.head.default"}
    assert types["gpu1_spot"]["resources"] == {"CPU": 1, FAKE_GPU: 1, "spot": 1}
    assert types["gpu8_ondemand"]["resources"] == {"CPU": 12, FAKE_GPU: 8, "on_demand": 1}
    assert (types["gpu1_spot"]["min_workers"], types["gpu1_spot"]["max_workers"]) == (0, MAX_NODES_PER_TYPE)
    assert config["idle_timeout_minutes"] == pytest.approx(10 / 60)
    assert config["provider"]["head_node_id"] == rays_head_id


class Phases:
    """The cloud and the operator around the run, in a thread: waits for the run to reach each point
    (read off its metrics.jsonl) and then changes the cluster. ``seen`` keeps what happened."""

    def __init__(self, cluster, imds, metrics: Path) -> None:
        self.cluster, self.imds, self.metrics = cluster, imds, metrics
        self.seen: dict = {"node_types": set()}
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def records(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        lines = self.metrics.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]

    def wait_for(self, what: str, check) -> object:
        deadline = time.monotonic() + TIMEOUT_S
        while not self.stop.is_set():
            self.seen["node_types"] |= {n["type"] for n in self.nodes()} - {"?"}  # "?": not in the status yet
            found = check()
            if found:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"never saw {what}")
            time.sleep(0.5)
        raise TimeoutError(f"stopped while waiting for {what}")

    def nodes(self) -> list[dict]:
        """The worker nodes alive now: node type (the autoscaler's view), id, address and raylet port."""
        from ray._raylet import GcsClient
        from ray.autoscaler.v2.sdk import get_cluster_status
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        status = get_cluster_status(self.cluster.gcs_address)
        types = {n.node_id: n.ray_node_type_name for n in (*status.active_nodes, *status.idle_nodes)}
        infos = GcsClient(address=self.cluster.gcs_address).get_all_node_info(
            timeout=30, state_filter=GcsNodeInfo.GcsNodeState.ALIVE
        )
        return [
            {
                "type": types.get(info.node_id.hex(), "?"),
                "id": info.node_id.hex(),
                "ip": info.node_manager_address,
                "port": info.node_manager_port,
            }
            for info in infos.values()
            if not info.is_head_node
        ]

    def events(self, name: str) -> list[dict]:
        return [r for r in self.records() if r.get("kind") == "event" and r["event"] == name]

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def _run(self) -> None:
        # 1. The run starts on the one 1-GPU spot node there is.
        start = self.wait_for("the run's start", lambda: self.events("start"))[0]
        self.seen["start"] = start
        self.wait_for("a step checkpoint", lambda: self.events("checkpoint"))
        # 2. Then spot capacity for a second node: the autoscaler launches it for the run's demand, Ray Train
        # grows the group. (And no node is kept warm any more: idle ones may go.)
        config = json.loads(self.cluster.autoscaling_config_path.read_text())
        config["available_node_types"]["gpu1_spot"].update(min_workers=0, max_workers=MAX_NODES_PER_TYPE)
        self.cluster.write_autoscaling_config(config)
        grown = self.wait_for(
            "the group grown to 2 workers",
            lambda: [e for e in self.events("resume") + self.events("start")[1:] if e["world_size"] == 2],
        )[0]
        self.seen["grown"] = grown
        # The fake provider numbers its nodes in launch order: the second launched is reclaimed.
        spot = max(self.nodes(), key=lambda n: n["id"])
        self.seen["reclaimed"] = spot
        # What the launcher's worker start command runs on every node.
        watcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cluster.spot_watch",
                "--cloud=aws",
                f"--address={self.cluster.gcs_address}",
                f"--metadata-url=http://127.0.0.1:{self.imds.server_address[1]}",
                f"--node-ip={spot['ip']}",
                f"--node-manager-port={spot['port']}",
                "--interval=0.5",
            ],
            env=self.cluster.env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # 3. Two workers train; then EC2 posts the notice, and reclaims the node at the notice's time.
        self.wait_for(
            "a checkpoint of the 2-worker group",
            lambda: [e for e in self.events("checkpoint") if e["time"] > grown["time"]],
        )
        when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=NOTICE_S)
        self.imds.notice = {"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")}
        self.seen["watcher"] = watcher.communicate(timeout=TIMEOUT_S)[0]
        self.seen["watcher_rc"] = watcher.returncode
        # The VM goes KILL_AFTER_S after the notice's time: Ray stops the group at that time, and a kill
        # racing it could fail a survivor's collective before Ray learns the node was preempted. Ray may
        # have let the drained node go already, once idle.
        kill_at = when + datetime.timedelta(seconds=KILL_AFTER_S)
        while datetime.datetime.now(datetime.timezone.utc) < kill_at and not self.stop.is_set():
            time.sleep(0.2)
        self.seen["killed"] = self.cluster.kill_node(spot["id"], missing_ok=True)


def test_spot_cluster_scales_grows_and_survives_a_reclamation(local_cluster_factory, imds, tmp_path):
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated.common_pb2 import NodeDeathInfo

    from pipelines.data.synthetic import generate_coco
    from pipelines.job_config import load_job_config
    from pipelines.raytrain.training import run_training

    root = tmp_path / "shapes"
    generate_coco(root, IMAGES, 5, image_size=((64, 96), (64, 96)), num_classes=3, max_objects=3, seed=0, threads=2)
    config, head = fake_cluster_config(REPO_ROOT / "cluster" / "aws.yaml")
    # Spot capacity: none for the 8-GPU type (open, autoscaler v2 packs both workers of this job onto one
    # gpu8_spot node, seen here, where the YAML means one worker per 1-GPU node for elastic runs), and one
    # 1-GPU node, kept warm, until the run has started on it. Autoscaler v2 asks the cloud for an elastic
    # run's max at once and launches nothing while that does not fit: from zero, both nodes would be
    # asked for together and the run could start on either count.
    types = config["available_node_types"]
    types["gpu8_spot"]["max_workers"] = 0
    types["gpu1_spot"].update(min_workers=1, max_workers=1)
    env = {
        "RAY_FAKE_CLUSTER": "1",
        "RAY_enable_autoscaler_v2": "1",
        "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
        "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "60",
        "PYTHONPATH": str(REPO_ROOT),
    }
    system = '{"health_check_period_ms": 1000, "health_check_failure_threshold": 3}'
    cluster = local_cluster_factory([f"--num-cpus={head['CPU']}", f"--system-config={system}"], env, config)
    storage = tmp_path / "runs"
    job = load_job_config(
        preset="tiny",
        overrides=[
            f"data.root={root}",
            "demo_data=null",
            f"train.storage_path={storage}",
            "train.name=autoscale",
            f"train.epochs={EPOCHS}",
            "train.eval_every=0",
            "train.num_vis_images=0",
            "train.num_workers=[1, 2]",
            # What a GPU job on the spot nodes asks for (train.use_gpu=true, gpus_per_worker=1), GPU renamed.
            f'train.worker_resources={{"{FAKE_GPU}": 1, "spot": 0.01}}',
            "train.elastic_resize_interval_s=2",
            "train.max_failures=0",
            "train.max_preemption_failures=2",
            f"train.checkpoint_every_steps={EVERY}",
        ],
    )
    phases = Phases(cluster, imds, storage / "autoscale" / "metrics.jsonl")
    thread = threading.Thread(target=phases.run, daemon=True)
    ray.init(address=cluster.gcs_address, log_to_driver=False)
    try:
        thread.start()
        outcome = run_training(job)
        # The run's own actors live on the driver's node (the head), never on one that can be reclaimed.
        from ray.util.state import list_actors

        head_id = ray.get_runtime_context().get_node_id()
        for name in ("MetricsSink", "EpochClock"):
            filters = [("class_name", "=", name)]
            placed = {
                a.node_id for a in list_actors(cluster.gcs_address, filters=filters, raise_on_missing_output=False)
            }
            assert placed == {head_id}, f"{name} actors on nodes {placed}, the driver's is {head_id}"
    finally:
        phases.stop.set()
        thread.join(timeout=60)
        ray.shutdown()
    if phases.error is not None:
        raise phases.error
    seen = phases.seen
    assert outcome.error is None, f"the run failed: {outcome.error}"

    # Started on the one node there was; nodes of the 1-GPU spot type only, never another.
    assert seen["start"]["world_size"] == 1
    # Grown from the 1-worker group's step checkpoint, not from the start.
    assert seen["grown"]["event"] == "resume" and seen["grown"]["global_step"] >= EVERY, seen["grown"]
    assert seen["node_types"] == {"gpu1_spot"}, seen["node_types"]

    # The reclaimed node: drained by the watcher with the preemption reason, then gone.
    spot = seen["reclaimed"]
    assert seen["watcher_rc"] == 0 and f"drained node {spot['id']}" in seen["watcher"], seen["watcher"]
    infos = {i.node_id.hex(): i for i in GcsClient(address=cluster.gcs_address).get_all_node_info(timeout=30).values()}
    assert infos[spot["id"]].death_info.reason in (
        NodeDeathInfo.AUTOSCALER_DRAIN_PREEMPTED,
        NodeDeathInfo.UNEXPECTED_TERMINATION,  # killed by the "cloud" while still draining
    ), infos[spot["id"]].death_info

    records = outcome.run_dir.read_metrics()
    events = [r for r in records if r.get("kind") == "event"]
    resumes = [e for e in events if e["event"] == "resume"]
    notice = [e for e in events if e["event"] == "checkpoint" and e.get("reason") == "preemption"]
    assert notice, "no checkpoint on the preemption notice"
    after_notice = [r for r in resumes if r["time"] > notice[0]["time"]]
    assert after_notice, f"the run never restarted after the notice: {events}"
    assert after_notice[0]["global_step"] >= notice[0]["global_step"]
    # Every restart continues where its checkpoint left the epoch: a step checkpoint's images, in whole
    # steps of the new group (an epoch's checkpoint: at the next epoch's first step).
    checkpoints = {e["global_step"]: e for e in events if e["event"] == "checkpoint"}
    for resume in resumes:
        ckpt = checkpoints.get(resume["global_step"])
        if ckpt is None:
            assert resume["epoch_step"] == 0, (resume, "resumed mid-epoch from an epoch's checkpoint")
        else:
            expected = ckpt["epoch_step"] * ckpt["world_size"] // resume["world_size"]
            assert (resume["epoch"], resume["epoch_step"]) == (ckpt["epoch"], expected), (resume, ckpt)
    # Every restart (the resize, the reclamation) costs at most EVERY steps of the group: steps logged
    # before it, past the step it resumed after.
    for resume in resumes:
        before = [r["global_step"] for r in records if r.get("kind") == "step" and r["time"] < resume["time"]]
        assert max(before) - resume["global_step"] <= EVERY, (resume, max(before))
    epochs = [r for r in records if r.get("kind") == "epoch"]
    assert sorted({e["epoch"] for e in epochs}) == list(range(job.train.epochs))
    # Each group trains at the lr of its size (train.lr is the lr at 2 workers; the tiny preset's lr is
    # constant over these epochs).
    starts = [e for e in events if e["event"] in ("start", "resume")]
    for epoch in epochs:
        world = [e for e in starts if e["time"] < epoch["time"]][-1]["world_size"]
        assert epoch["lr"] == pytest.approx(job.train.lr * world / 2), (epoch["epoch"], world, epoch["lr"])

    # The nodes go idle after the run: the autoscaler removes them after the (scaled) idle timeout.
    deadline = time.monotonic() + TIMEOUT_S
    while phases.nodes() and time.monotonic() < deadline:
        time.sleep(1)
    assert not phases.nodes(), phases.nodes()
