"""Joining a Ray cluster or starting a local one: the one place a driver calls ``ray.init``.

The console is the project's: the workers' own output and Ray's logs stay in Ray's log files
(``ray_logs_dir``; the lines Ray prints on a driver's console go to ``driver-console-<pid>.log`` there,
``pipelines.console``), and the run's lines reach the driver through the metrics channel. A failed worker's
cause is printed by the entry script in one line (``raytrain.errors.describe_failure``).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import warnings

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.console import ray_lines_to_its_logs
from pipelines.job_config import ConfigError, JobConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What `ray job submit --working-dir .` and a joined cluster need not receive.
WORKING_DIR_EXCLUDES = [".venv/", ".git/", "runs/", "data/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/"]


log = logging.getLogger(__name__)


def in_ray_job() -> bool:
    """True inside a driver started by ``ray job submit`` (the job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_ray(job: JobConfig | None = None, address: str | None = None) -> bool:
    """Joins a cluster (``address``, e.g. "auto" or "host:6379", or RAY_ADDRESS, which ``ray job submit``
    sets) or starts a local one: sized for ``job``, or with the machine's CPUs as they are when there is
    no training job (batch inference, whose CPU actors take their torch threads from that count). Does
    nothing when Ray is already initialized (a test, a notebook, a Tune trial driver).

    Returns:
        True when this call started a local Ray instance.

    Raises:
        ConfigError: an http(s) address (the dashboard's, which `ray job submit` takes, not a driver).
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise ConfigError(
            f"Ray address {address} is a dashboard's, for `ray job submit`; a driver joins a cluster at host:6379 "
            "or auto (or unset RAY_ADDRESS to run on a local Ray)"
        )
    if ray.is_initialized():
        return False
    if address:
        # A submitted job already ships the working dir; a plain driver ships the repository itself.
        runtime_env = None if in_ray_job() else {"working_dir": REPO_ROOT, "excludes": WORKING_DIR_EXCLUDES}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level=logging.WARNING)
        ray_lines_to_its_logs(ray_logs_dir())
        return False
    num_cpus = None  # Ray counts the machine's
    if job is not None:
        t = job.train
        # Logical CPUs: the workers' plus some for Ray Data's decode tasks, which would otherwise find
        # none free on a small machine and stall the input pipeline.
        data_cpus = max(2, job.data.num_decode_workers or 2)
        num_cpus = max(os.cpu_count() or 1, math.ceil(t.max_workers * t.cpus_per_worker) + data_cpus)
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    # The dashboard on a port of our own, named to every process of this instance: Ray Train's
    # placement-group cleaner asks the state API for it, and with a second Ray instance on this
    # machine (another `ray start`, another test) it cannot tell which one is its own; its monitor
    # thread then dies, and the placement group of a run stopped from outside (a Tune trial that
    # ASHA stops) is never removed, so the next trial waits forever for its CPUs.
    dashboard_port = _free_port()
    env_vars = {"PYTHONPATH": pythonpath, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}
    # Ray 2.60 turns token auth on for a new local cluster and says so: nothing to act on. Its warning
    # that auth is *disabled* stays (that one is the user's call).
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_NotTokenAuthEnabled())
    # address="local": a new instance even when another `ray start` cluster runs on this machine.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        dashboard_port=dashboard_port,
        runtime_env={"env_vars": env_vars},
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    ray_lines_to_its_logs(ray_logs_dir())
    return True


class _NotTokenAuthEnabled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "authentication is enabled for this Ray cluster" not in record.getMessage()


def cluster_autoscales() -> bool:
    """Whether an autoscaler serves the connected cluster (``ray up``, KubeRay with autoscaling).

    Ray's cluster status carries the autoscaler's state version, "0" until an autoscaler first reports;
    a cluster started by ``ray start`` or ``ray.init`` has none, so what it has now is all it gets.
    """
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception as e:  # noqa: BLE001 - an unknown answer must not stop a run: assume it may grow
        log.debug("cluster status unavailable (%s): assuming the cluster autoscales", e)
        return True
    return status.stats.autoscaler_version not in ("", "0")


def pending_demands() -> str | None:
    """What Ray cannot place now on the connected cluster, with what the cluster has (``describe_pending``);
    None when nothing waits or Ray's status cannot be read."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception as e:  # noqa: BLE001 - a warning's extra detail must not stop a run
        log.debug("cluster status unavailable (%s)", e)
        return None
    return describe_pending(status)


def describe_pending(status) -> str | None:
    """One phrase of a ``ClusterStatus`` (``ray.autoscaler.v2.schema``; what ``ray status`` shows): its
    pending task/actor and placement-group demands, then the cluster's resources in use; None without
    pending demands.

    E.g. "tasks or actors waiting for {CPU: 1} x3; placement group 1a2b3c4d (PACK, PENDING) of
    {CPU: 1} x2; the cluster: CPU 2 of 2 in use".
    """
    demands = status.resource_demands
    parts = [
        f"tasks or actors waiting for {_bundle(b.bundle)} x{b.count}"
        for demand in demands.ray_task_actor_demand
        for b in demand.bundles_by_count
    ]
    for group in demands.placement_group_demand:
        bundles = " + ".join(f"{_bundle(b.bundle)} x{b.count}" for b in group.bundles_by_count)
        parts.append(f"placement group {(group.pg_id or '?')[:8]} ({group.strategy}, {group.state}) of {bundles}")
    if not parts:
        return None
    usage = ", ".join(
        f"{u.resource_name} {u.used:g} of {u.total:g} in use"
        for u in status.cluster_resource_usage
        if u.resource_name in ("CPU", "GPU")
    )
    return "; ".join(parts) + f"; the cluster: {usage or 'no CPU or GPU'}"


def _bundle(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in sorted(resources.items())) + "}"


def quiet_ray_warnings() -> None:
    """Hides Ray's own deprecation warnings about Ray's internals (nothing a user of this project acts on).

    Entry scripts call it in ``main``; a library import never changes warning filters.
    """
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"ray(\.|$)")


def ray_data_lines_to_its_log() -> None:
    """Ray Data's lines (execution plans, timings, the progress-bar notice) stay in its log file in the
    session's log folder; the console shows only its errors. Call after ``import ray.data``."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console; its file handler is not a stream
            handler.setLevel(logging.ERROR)


def on_driver_node() -> dict:
    """``.options(**on_driver_node())`` pins a run's small actors (metrics sink, epoch clock) to the
    driver's node: Ray would otherwise place them on any node, a spot worker's included, whose
    reclamation would take them and the run with them. The driver's node is the head on a cluster."""
    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}


def ray_logs_dir() -> str | None:
    """The log folder of this driver's Ray session (on the head node for a joined cluster), if known."""
    try:
        from ray._private.worker import _global_node

        return _global_node.get_logs_dir_path() if _global_node is not None else None
    except Exception:  # a private API: absent in another Ray version
        return None
