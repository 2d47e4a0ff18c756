"""Joining a Ray cluster or starting a local one: the one place a driver calls ``ray.init``.

The console is the project's: the workers' own output and Ray's logs stay in Ray's log files
(``ray_logs_dir``), and the run's lines reach the driver through the metrics channel. A failed worker's
cause is printed by the entry script in one line (``raytrain.errors.describe_failure``).
"""

from __future__ import annotations

import logging
import math
import os

import ray

from pipelines.config import JobConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# What `ray job submit --working-dir .` and a joined cluster need not receive.
WORKING_DIR_EXCLUDES = [".venv/", ".git/", "runs/", "data/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/"]


def in_ray_job() -> bool:
    """True inside a driver started by ``ray job submit`` (the job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def connect_ray(job: JobConfig, address: str | None = None) -> bool:
    """Joins a cluster (``address``, e.g. "auto" or "host:6379", or RAY_ADDRESS, which ``ray job submit``
    sets) or starts a local one sized for ``job``. Does nothing when Ray is already initialized (a test,
    a notebook, a Tune trial driver).

    Returns:
        True when this call started a local Ray instance.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A submitted job already ships the working dir; a plain driver ships the repository itself.
        runtime_env = None if in_ray_job() else {"working_dir": REPO_ROOT, "excludes": WORKING_DIR_EXCLUDES}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level=logging.WARNING)
        return False
    t = job.train
    # Logical CPUs: the workers' plus some for Ray Data's decode tasks, which would otherwise find
    # none free on a small machine and stall the input pipeline.
    data_cpus = max(2, job.data.num_decode_workers or 2)
    num_cpus = max(os.cpu_count() or 1, math.ceil(t.num_workers * t.cpus_per_worker) + data_cpus)
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    # address="local": a new instance even when another `ray start` cluster runs on this machine.
    ray.init(
        address="local",
        num_cpus=num_cpus,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return True


def ray_logs_dir() -> str | None:
    """The log folder of this driver's Ray session (on the head node for a joined cluster), if known."""
    try:
        from ray._private.worker import _global_node

        return _global_node.get_logs_dir_path() if _global_node is not None else None
    except Exception:  # a private API: absent in another Ray version
        return None
