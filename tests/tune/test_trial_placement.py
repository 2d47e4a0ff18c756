"""Trial drivers stay on the sweep driver's node (the head on a cluster), away from spot workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]

# Joins the two-node cluster, takes 0.9 of the driver node's one CPU (so that, left to itself, Ray would
# place 0.01-CPU trial drivers on the idle 4-CPU node), runs 3 trials with the sweep's trial-driver
# resources and prints where each ran.
SCRIPT = """
import json, sys
import ray
from ray import tune
from tune.trial import trial_driver_resources

ray.init(address=sys.argv[1], log_to_driver=False)
node = ray.get_runtime_context().get_node_id()
strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node, soft=False)

@ray.remote(num_cpus=0.9, scheduling_strategy=strategy)
class Blocker:
    def ready(self):
        return True

blocker = Blocker.remote()
ray.get(blocker.ready.remote())

def trial(config):
    tune.report({"node": ray.get_runtime_context().get_node_id()})

tuner = tune.Tuner(
    tune.with_resources(trial, trial_driver_resources()),
    tune_config=tune.TuneConfig(num_samples=3, max_concurrent_trials=3),
    run_config=tune.RunConfig(storage_path=sys.argv[2], name="placement", verbose=0),
)
grid = tuner.fit()
print("RESULT " + json.dumps({"driver": node, "trials": [r.metrics.get("node") for r in grid]}))
"""


def test_trial_drivers_run_on_the_sweep_drivers_node(local_cluster_factory, tmp_path):
    cluster = local_cluster_factory(["--num-cpus=1"])
    cluster.add_node(["--num-cpus=4", '--resources={"spot": 4}'])
    env = dict(cluster.env, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, cluster.gcs_address, str(tmp_path / "tune")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["trials"] == [result["driver"]] * 3, result
