"""The commands the RayJobs run name scripts and options that exist: each entrypoint is split as the
shell splits it, its script found in this repository (the image holds the project at /home/ray/ddetr),
and its arguments parsed by that script's own ``parse_args``, then turned into the script's validated
config where the script has a ``config_from_args`` (a misspelled field fails there, not on the cluster).
The training RayJob's workers must also fit the pods of its own cluster.
"""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBERAY = REPO_ROOT / "cluster" / "kuberay"
IMAGE_PROJECT_DIR = "/home/ray/ddetr"  # cluster/Dockerfile's COPY target and WORKDIR
RAYJOBS = sorted(p.name for p in KUBERAY.glob("rayjob-*.yaml"))


def entrypoint(name: str) -> str:
    with open(KUBERAY / name) as f:
        return yaml.safe_load(f)["spec"]["entrypoint"]


def split_entrypoint(command: str) -> tuple[Path, list[str]]:
    """(the script in this repository, its arguments) of ``python /home/ray/ddetr/<script> ARGS``."""
    argv = shlex.split(command)
    assert len(argv) >= 2 and argv[0] in ("python", "python3"), f"entrypoint should run a Python script: {command!r}"
    script = argv[1]
    if script.startswith(IMAGE_PROJECT_DIR + "/"):
        script = script[len(IMAGE_PROJECT_DIR) + 1 :]
    assert not script.startswith("/"), f"entrypoint script {argv[1]!r} is outside the project ({IMAGE_PROJECT_DIR})"
    return REPO_ROOT / script, argv[2:]


def load_script(path: Path):
    """The entry script as a module (its ``__main__`` block does not run)."""
    name = "entry_" + "_".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", RAYJOBS)
def test_entrypoint_parses_with_its_script(name, capsys):
    script, args = split_entrypoint(entrypoint(name))
    # A mistyped script path is the mistake this test is for: it fails, never skips.
    assert script.is_file(), (
        f"{name}: its entrypoint runs {script.relative_to(REPO_ROOT)}, which is not in the repository"
    )
    module = load_script(script)
    assert hasattr(module, "parse_args"), f"{script.name} has no parse_args(argv) to check {name} with"
    try:
        parsed = module.parse_args(args)
    except SystemExit as e:
        pytest.fail(f"{name}: {script.name} rejects its arguments (exit {e.code}): {capsys.readouterr().err.strip()}")
    if hasattr(module, "config_from_args"):
        module.config_from_args(parsed)  # raises the script's ConfigError naming the field


def test_a_bad_option_fails():
    """The parse above can fail: an option train.py does not have, and a field its config does not have."""
    from pipelines.job_config import ConfigError

    script, args = split_entrypoint(entrypoint("rayjob-train.yaml"))
    module = load_script(script)
    with pytest.raises(SystemExit):
        module.parse_args([*args, "--num-gpus", "8"])
    with pytest.raises(ConfigError, match="train.num_worker"):
        module.config_from_args(module.parse_args([*args, "--set", "train.num_worker=8"]))


def _pod_resources(group: dict) -> dict[str, float]:
    """The Ray resources one pod of a worker group offers: its container's CPU and GPU limits, and the
    group's custom resources."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu = str(limits.get("cpu", "0"))
    out = {
        "CPU": float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu),
        "GPU": float(limits.get("nvidia.com/gpu", 0)),
    }
    out.update({k: float(v) for k, v in group.get("resources", {}).items()})
    return out


def worker_fit_problems(job, cluster_spec: dict) -> list[str]:
    """Whether the training workers of ``job`` fit the RayJob's own cluster: a pod holds at least one,
    and the groups' maxReplicas hold train.max_workers of them."""
    t = job.train
    need = {"CPU": t.cpus_per_worker, **t.worker_resources, **({"GPU": t.gpus_per_worker} if t.use_gpu else {})}
    capacity = 0
    for group in cluster_spec.get("workerGroupSpecs", []):
        pod = _pod_resources(group)
        per_pod = min(int(pod.get(k, 0) // v) for k, v in need.items())
        capacity += per_pod * group["maxReplicas"]
    if capacity < t.max_workers:
        return [f"the cluster holds {capacity} training workers of {need}, the job asks for up to {t.max_workers}"]
    return []


def test_training_rayjob_fits_its_cluster():
    """A worker that no pod can hold would wait forever: the training RayJob's workers fit its cluster."""
    with open(KUBERAY / "rayjob-train.yaml") as f:
        doc = yaml.safe_load(f)
    script, args = split_entrypoint(doc["spec"]["entrypoint"])
    module = load_script(script)
    job = module.config_from_args(module.parse_args(args))
    assert worker_fit_problems(job, doc["spec"]["rayClusterSpec"]) == []
    # The R50 preset's 8 CPUs per worker would not fit a 1-GPU pod of 7 CPUs.
    too_big = module.config_from_args(module.parse_args([*args, "--set", "train.cpus_per_worker=8"]))
    assert "holds 0 training workers" in "\n".join(worker_fit_problems(too_big, doc["spec"]["rayClusterSpec"]))
