"""The KubeRay manifests (cluster/kuberay/): KubeRay v1.7's strict schemas, the operator's rules those
schemas leave out, and what the project relies on (autoscaler v2, token auth, GPU groups from zero with
limits, tolerations and a /dev/shm, a head without GPUs, off spot nodes, never evicted and sized for the
CPU pool, no public Service, RayJob deadlines, the image pinned like the launcher's).

Each check returns the problems it finds; each runs on the real manifests (none) and on a broken copy.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBERAY = REPO_ROOT / "cluster" / "kuberay"
# The Ray resources (RayCluster, RayJob); the Kubernetes ones beside them (ServiceAccount) are checked apart.
MANIFESTS = sorted(p.name for p in KUBERAY.glob("*.yaml") if re.search(r"^kind: Ray", p.read_text(), re.MULTILINE))
SERVICE_ACCOUNTS = KUBERAY / "serviceaccount.yaml"
# <registry>/ray-deformable-detr:<project version>-ray<Ray version>-py<XY>-cu<XYZ> (cluster/Dockerfile).
IMAGE = re.compile(
    r"/ray-deformable-detr:(?P<project>[\w.]+)-ray(?P<ray>\d+\.\d+\.\d+)-py3(?P<py>\d+)-cu(?P<cuda>\d{3})$"
)


def load(name: str) -> dict:
    with open(KUBERAY / name) as f:
        return yaml.safe_load(f)


def validator(kind: str) -> jsonschema.Draft7Validator:
    with open(KUBERAY / "schemas" / f"kuberay-v1.7.0-{kind.lower()}_v1.schema.json") as f:
        return jsonschema.Draft7Validator(json.load(f))


def schema_problems(doc: dict) -> list[str]:
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") not in ("RayCluster", "RayJob"):
        return [
            f"expected apiVersion ray.io/v1 and kind RayCluster or RayJob, got {doc.get('apiVersion')} {doc.get('kind')}"
        ]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(doc["kind"]).iter_errors(doc)]


def cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, RayCluster spec) of a manifest: a RayCluster's spec or a RayJob's rayClusterSpec."""
    if doc["kind"] == "RayCluster":
        return [("spec", doc["spec"])]
    return [("spec.rayClusterSpec", doc["spec"]["rayClusterSpec"])] if "rayClusterSpec" in doc["spec"] else []


# The CPU node pool the README's GKE commands make for the head, and what GKE leaves a pod of one node:
# the vCPUs less 6% of the first core, 1% of the second, 0.5% of the next two and 0.25% of the rest, and
# the memory less 25% of the first 4 GiB, 20% of the next 4, 10% of the next 8 and 6% up to 128, less
# the 100 MiB eviction threshold; of that, DAEMONS for GKE's own per-node pods.
HEAD_POOL = {"machine": "n2-standard-8", "cpus": 8, "memory_gib": 32}
DAEMONS = {"cpu": 1.0, "memory_gib": 2.0}
# The autoscaler's sidecar beside the head container (autoscalerOptions.resources, else KubeRay's default).
SIDECAR_DEFAULT = {"cpu": 0.5, "memory_gib": 0.5}


def allocatable(cpus: int, memory_gib: float) -> tuple[float, float]:
    """GKE's allocatable CPUs and GiB on one node of ``cpus`` vCPUs and ``memory_gib`` GiB."""
    cpu_reserved = 0.06 + 0.01 * (cpus > 1) + 0.005 * min(max(cpus - 2, 0), 2) + 0.0025 * max(cpus - 4, 0)
    tiers = [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06)]
    left, mem_reserved = memory_gib, 0.0
    for size, share in tiers:
        mem_reserved += min(left, size) * share
        left = max(left - size, 0)
    return cpus - cpu_reserved, memory_gib - mem_reserved - 100 / 1024


def quantity(value: str | int | float) -> float:
    """A Kubernetes CPU (``500m``, ``"6"``) or memory (``22Gi``, ``512Mi``) quantity, in cores or GiB."""
    text = str(value)
    for suffix, scale in (("m", 1e-3), ("Gi", 1.0), ("Mi", 1 / 1024), ("Ki", 1 / 1024**2)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text)


def off_spot(pod: dict) -> bool:
    """Whether a pod spec requires nodes that GKE has not labelled spot."""
    terms = (
        pod.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms", [])
    )
    required = {"key": "cloud.google.com/gke-spot", "operator": "DoesNotExist"}
    return (
        bool(terms)
        and all(required in t.get("matchExpressions", []) for t in terms)
        and (pod.get("nodeSelector", {}).get("cloud.google.com/gke-spot") != "true")
    )


def head_placement_problems(where: str, spec: dict) -> list[str]:
    """The head off spot nodes, never evicted by the cluster autoscaler, and small enough for HEAD_POOL."""
    problems = []
    template = spec["headGroupSpec"]["template"]
    annotations = template.get("metadata", {}).get("annotations", {})
    if annotations.get("cluster-autoscaler.kubernetes.io/safe-to-evict") != "false":
        problems.append(
            f'{where}.headGroupSpec: needs the annotation cluster-autoscaler.kubernetes.io/safe-to-evict: "false"'
        )
    pod = template["spec"]
    if not off_spot(pod):
        problems.append(f"{where}.headGroupSpec: the head must require nodes without cloud.google.com/gke-spot")
    sidecar = spec.get("autoscalerOptions", {}).get("resources", {}).get("requests", {})
    cpu = quantity(sidecar.get("cpu", SIDECAR_DEFAULT["cpu"]))
    memory = quantity(sidecar.get("memory", f"{SIDECAR_DEFAULT['memory_gib']}Gi"))
    for c in pod["containers"]:
        requests = c.get("resources", {}).get("requests", {})
        cpu += quantity(requests.get("cpu", 0))
        memory += quantity(requests.get("memory", 0))
    free_cpu, free_memory = allocatable(HEAD_POOL["cpus"], HEAD_POOL["memory_gib"])
    free_cpu, free_memory = free_cpu - DAEMONS["cpu"], free_memory - DAEMONS["memory_gib"]
    if cpu > free_cpu or memory > free_memory:
        problems.append(
            f"{where}.headGroupSpec: the head pod asks {cpu:g} CPUs and {memory:g} GiB, one {HEAD_POOL['machine']} "
            f"node has {free_cpu:.2f} CPUs and {free_memory:.1f} GiB for it"
        )
    return problems


def shm_problems(where: str, pod: dict) -> list[str]:
    """A GPU pod mounts a memory-backed /dev/shm of bounded size (the container's default is 64 MiB)."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod["containers"]:
        for mount in c.get("volumeMounts", []):
            empty_dir = volumes.get(mount["name"], {}).get("emptyDir", {})
            if mount["mountPath"] == "/dev/shm" and empty_dir.get("medium") == "Memory" and empty_dir.get("sizeLimit"):
                return []
    return [f"{where}: no /dev/shm (an emptyDir of medium Memory with a sizeLimit)"]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def cluster_problems(where: str, spec: dict, pins: dict[str, str]) -> list[str]:
    """What the project relies on in a RayCluster spec, beyond the schema."""
    problems = []
    if not spec.get("enableInTreeAutoscaling"):
        problems.append(f"{where}: enableInTreeAutoscaling must be true (GPU groups scale from zero)")
    options = spec.get("autoscalerOptions", {})
    if options.get("version") != "v2" or not options.get("idleTimeoutSeconds"):
        problems.append(f"{where}.autoscalerOptions: version v2 and an idleTimeoutSeconds are required")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append(f"{where}.authOptions.mode must be token")
    if not str(spec.get("rayVersion", "")).startswith(pins["ray_minor"] + "."):
        problems.append(f"{where}.rayVersion {spec.get('rayVersion')!r} is not Ray {pins['ray_minor']}.x")
    head = spec["headGroupSpec"]
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append(f"{where}.headGroupSpec: the head Service must stay ClusterIP without ingress")
    if head.get("rayStartParams", {}).get("num-gpus") != "0":
        problems.append(f'{where}.headGroupSpec.rayStartParams: num-gpus must be "0" (the head runs no training)')
    problems += head_placement_problems(where, spec)
    pods = [(f"{where}.headGroupSpec", head["template"]["spec"], False)]
    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    if len(set(names)) != len(names):
        problems.append(f"{where}: worker group names repeat: {names}")
    for group in spec.get("workerGroupSpecs", []):
        gw = f"{where}.workerGroupSpecs[{group['groupName']}]"
        if group["minReplicas"] != 0 or group["maxReplicas"] < 1 or group.get("replicas", 0) > group["maxReplicas"]:
            problems.append(f"{gw}: scale range must be minReplicas 0 .. maxReplicas >= 1")
        spot = "spot" in group["groupName"]
        market = group.get("resources", {})
        if market.get("spot" if spot else "on_demand") != "1":
            problems.append(f'{gw}.resources: must name its market ({"spot" if spot else "on_demand"}: "1")')
        pod = group["template"]["spec"]
        tolerated = {t.get("key") for t in pod.get("tolerations", [])}
        if "nvidia.com/gpu" not in tolerated:
            problems.append(f"{gw}: GPU pods must tolerate the nvidia.com/gpu taint")
        if spot and pod.get("nodeSelector", {}).get("cloud.google.com/gke-spot") != "true":
            problems.append(f"{gw}: a spot group must select spot nodes")
        if not spot and not off_spot(pod):  # GKE labels spot nodes but taints them only if asked to
            problems.append(f"{gw}: an on-demand group must require nodes without cloud.google.com/gke-spot")
        problems += shm_problems(gw, pod)
        pods.append((gw, pod, True))
    for pw, pod, gpu in pods:
        if pod.get("restartPolicy") not in (None, "Never"):
            problems.append(f"{pw}: restartPolicy {pod['restartPolicy']!r} (autoscaler v2 needs it unset or Never)")
        for c in pod["containers"]:
            limits, requests = c.get("resources", {}).get("limits", {}), c.get("resources", {}).get("requests", {})
            gpus = limits.get("nvidia.com/gpu")
            if gpu and (not gpus or int(gpus) < 1 or requests.get("nvidia.com/gpu", gpus) != gpus):
                problems.append(f"{pw}.{c['name']}: GPU limits (nvidia.com/gpu >= 1, equal to requests) are required")
            if not gpu and gpus:
                problems.append(f"{pw}.{c['name']}: the head must not take GPUs")
            if gpu != (_env(c).get("MSDA_BACKEND") == "cuda"):
                problems.append(f"{pw}.{c['name']}: MSDA_BACKEND=cuda belongs on GPU pods, and only there")
            match = IMAGE.search(c.get("image", ""))
            if not match or match["ray"] != spec.get("rayVersion"):
                problems.append(
                    f"{pw}.{c['name']}: image {c.get('image')!r} must be cluster/Dockerfile's, tagged with rayVersion"
                )
    return problems


def job_problems(doc: dict) -> list[str]:
    """The RayJob rules of KubeRay's validation that the schema does not hold, and the project's."""
    spec, problems = doc["spec"], []
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        problems.append("spec: exactly one of rayClusterSpec and clusterSelector")
    if not str(spec.get("entrypoint", "")).strip():
        problems.append("spec.entrypoint is empty")
    if "rayClusterSpec" in spec and not (
        spec.get("shutdownAfterJobFinishes") and spec.get("ttlSecondsAfterFinished") is not None
    ):
        problems.append(
            "spec: a job's own cluster must be deleted after it (shutdownAfterJobFinishes, ttlSecondsAfterFinished)"
        )
    pre, active = spec.get("preRunningDeadlineSeconds"), spec.get("activeDeadlineSeconds")
    if not (isinstance(pre, int) and isinstance(active, int) and 0 < pre < active):
        problems.append(
            "spec: preRunningDeadlineSeconds and activeDeadlineSeconds are required, the first below the second "
            f"(a job that never starts or never ends bills its nodes), got {pre} and {active}"
        )
    for path in re.findall(r"(?:storage_path|root)=(\S+)", str(spec.get("entrypoint", ""))):
        if not re.match(r"(gs|s3)://", path):
            problems.append(f"spec.entrypoint: {path!r} is a pod's local disk; use gs:// or s3://")
    return problems


# -------------------------------------------------------------------------------------------- tests


def test_manifests_present():
    assert {"raycluster.yaml", "rayjob-train.yaml", "rayjob-sweep.yaml", "rayjob-infer.yaml"} <= set(MANIFESTS)


@pytest.mark.parametrize("name", MANIFESTS)
def test_strict_schema(name):
    doc = load(name)
    assert schema_problems(doc) == []
    # Strict: a misspelled field is an error, as on a live API server.
    broken = copy.deepcopy(doc)
    spec = broken["spec"] if doc["kind"] == "RayCluster" else broken["spec"]["rayClusterSpec"]
    spec["workerGroupSpecs"][0]["maxReplica"] = spec["workerGroupSpecs"][0].pop("maxReplicas")
    spec["enableInTreeAutoscalling"] = spec.pop("enableInTreeAutoscaling")
    if doc["kind"] == "RayJob":
        broken["spec"]["shutdownAfterJobFinish"] = broken["spec"].pop("shutdownAfterJobFinishes")
    found = "\n".join(schema_problems(broken))
    for text in ("maxReplica'", "enableInTreeAutoscalling", "'maxReplicas' is a required property"):
        assert text in found, f"{text!r} not reported in:\n{found}"


@pytest.mark.parametrize("name", MANIFESTS)
def test_cluster_spec(name, pins):
    doc = load(name)
    specs = cluster_specs(doc)
    assert specs, f"{name}: no cluster spec"
    for where, spec in specs:
        assert cluster_problems(where, spec, pins) == []
    where, spec = specs[0]
    broken = copy.deepcopy(spec)
    broken["autoscalerOptions"]["version"] = "v1"
    broken.pop("authOptions")
    broken["headGroupSpec"]["serviceType"] = "LoadBalancer"
    group = broken["workerGroupSpecs"][0]
    group["minReplicas"] = 1
    group["template"]["spec"]["tolerations"] = []
    group["template"]["spec"]["restartPolicy"] = "Always"
    worker = group["template"]["spec"]["containers"][0]
    del worker["resources"]["limits"]["nvidia.com/gpu"]
    worker["env"] = []
    del worker["volumeMounts"]
    head = broken["headGroupSpec"]["template"]
    del head["metadata"]["annotations"]
    del head["spec"]["affinity"]
    for group in broken["workerGroupSpecs"]:
        group["template"]["spec"].pop("affinity", None)
    head["spec"]["containers"][0]["resources"]["requests"]["memory"] = "26Gi"
    found = "\n".join(cluster_problems(where, broken, pins))
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    for text in (
        "version v2",
        "authOptions.mode must be token",
        "must stay ClusterIP",
        "scale range",
        "tolerate the nvidia.com/gpu taint",
        "restartPolicy 'Always'",
        "GPU limits",
        "MSDA_BACKEND=cuda",
        "no /dev/shm",
        "safe-to-evict",
        "the head must require nodes without cloud.google.com/gke-spot",
        "26.5 GiB, one n2-standard-8 node",
        *(["an on-demand group must require nodes without"] if any("ondemand" in n for n in names) else []),
    ):
        assert text in found, f"{text!r} not reported in:\n{found}"


@pytest.mark.parametrize("name", [n for n in MANIFESTS if n.startswith("rayjob-")])
def test_rayjob_rules(name):
    doc = load(name)
    assert doc["kind"] == "RayJob"
    assert job_problems(doc) == []
    broken = copy.deepcopy(doc)
    broken["spec"]["clusterSelector"] = {"ray.io/cluster": "ddetr"}
    broken["spec"]["shutdownAfterJobFinishes"] = False
    broken["spec"]["entrypoint"] += " --set train.storage_path=/tmp/runs"
    del broken["spec"]["preRunningDeadlineSeconds"]
    found = "\n".join(job_problems(broken))
    for text in ("exactly one of", "must be deleted after it", "'/tmp/runs' is a pod's local disk", "got None and"):
        assert text in found, f"{text!r} not reported in:\n{found}"


def test_images_agree_with_the_dockerfile(pins):
    """Every pod runs the image that cluster/Dockerfile builds from the launcher configs' base image."""
    base = re.search(r"^FROM\s+rayproject/ray:(\S+)$", (REPO_ROOT / "cluster" / "Dockerfile").read_text(), re.MULTILINE)
    assert base, "cluster/Dockerfile should start FROM rayproject/ray:<tag>"
    version = re.search(r'^version\s*=\s*"([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    images = set()
    for name in MANIFESTS:
        for _, spec in cluster_specs(load(name)):
            for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
                images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    for image in images:
        match = IMAGE.search(image)
        assert match, image
        assert f"{match['ray']}-py3{match['py']}-cu{match['cuda']}" == base.group(1), f"{image} vs FROM {base.group(1)}"
        assert match["project"] == version, f"{image}: tagged {match['project']}, the project is {version}"


def service_account_problems(manifests: dict[str, dict], accounts: list[dict]) -> list[str]:
    """Service accounts the pods name that no manifest defines (KubeRay makes none: the pods never
    start), and accounts without a Workload Identity binding to a Google service account."""
    defined = {
        a["metadata"]["name"] for a in accounts if a.get("apiVersion") == "v1" and a.get("kind") == "ServiceAccount"
    }
    problems = []
    for name, doc in manifests.items():
        for where, spec in cluster_specs(doc):
            for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
                used = group["template"]["spec"].get("serviceAccountName")
                if used and used not in defined:
                    problems.append(f"{name}: {where} runs as service account {used!r}, which no manifest defines")
    for account in accounts:
        google = account.get("metadata", {}).get("annotations", {}).get("iam.gke.io/gcp-service-account", "")
        if not re.fullmatch(r"[a-z][a-z0-9-]+@[a-z][a-z0-9-]+\.iam\.gserviceaccount\.com", google):
            problems.append(f"service account {account['metadata']['name']!r}: no Workload Identity annotation")
    return problems


def test_every_service_account_used_is_defined():
    manifests = {name: load(name) for name in MANIFESTS}
    accounts = list(yaml.safe_load_all(SERVICE_ACCOUNTS.read_text()))
    assert service_account_problems(manifests, accounts) == []
    renamed = copy.deepcopy(accounts)
    renamed[0]["metadata"]["name"] = "ddetr"
    del renamed[0]["metadata"]["annotations"]
    found = "\n".join(service_account_problems(manifests, renamed))
    for text in ("raycluster.yaml: spec runs as service account 'ddetr-ray'", "no Workload Identity annotation"):
        assert text in found, f"{text!r} not reported in:\n{found}"


def test_the_readme_makes_the_head_pool():
    """The GKE cluster of the README's commands has the CPU pool HEAD_POOL that the heads are sized for."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"--machine-type {HEAD_POOL['machine']} --num-nodes 1" in readme.replace("\\\n  ", "")
