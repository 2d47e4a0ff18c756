"""The Ray cluster launcher configs (cluster/aws.yaml, cluster/gcp.yaml): Ray's offline validation, and the
checks Ray's schema does not make (provider and node_config keys, GPU counts, spot settings, setup
commands, no public dashboard, token auth, image tags that agree with pyproject.toml).

Every check is a function returning the problems it finds, run once on the real config (no problem) and
once on a config broken on purpose (the problem named), so that none of them can pass vacuously.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {"aws": REPO_ROOT / "cluster" / "aws.yaml", "gcp": REPO_ROOT / "cluster" / "gcp.yaml"}

# GPUs and vCPUs of the machine types the configs use (the providers' published specifications).
MACHINES = {
    "m7i.2xlarge": (0, 8),
    "g6e.2xlarge": (1, 8),
    "p4d.24xlarge": (8, 96),
    "n2-standard-8": (0, 8),
    "g2-standard-8": (1, 8),
    "a2-highgpu-8g": (8, 96),
}
# The CUDA that torch's PyPI wheels are built for, by torch minor version (torch 2.13.0's metadata
# requires cuda-toolkit==13.0.3). Bumping torch in ./dev without checking its CUDA fails here.
TORCH_CUDA = {"2.13": "130"}

# Keys Ray's AWS and GCP providers read (ray/autoscaler/_private/{aws,gcp}/config.py, node_provider.py).
PROVIDER_KEYS = {
    "aws": {
        "type", "region", "availability_zone", "cache_stopped_nodes", "use_internal_ips", "security_group",
        "vpc_id", "use_external_head_ip", "key_pair", "cloudwatch", "disable_launch_config_check",
        "foreground_node_launch", "prefer_spot_node", "iam_role",
    },
    "gcp": {
        "type", "region", "availability_zone", "project_id", "use_internal_ips", "cache_stopped_nodes",
        "use_external_head_ip", "_has_tpus",
    },
}  # fmt: skip
# Ray's own additions to EC2's RunInstances arguments (it turns them into SubnetId / SecurityGroupIds).
RAY_AWS_NODE_KEYS = {"SubnetIds"}
# Compute Engine's Instance resource (instances.insert), the fields a node_config may hold, and the
# nested ones these configs use. https://cloud.google.com/compute/docs/reference/rest/v1/instances
GCP_INSTANCE_KEYS = {
    "machineType",
    "disks",
    "networkInterfaces",
    "scheduling",
    "serviceAccounts",
    "guestAccelerators",
    "metadata",
    "labels",
    "tags",
    "minCpuPlatform",
    "shieldedInstanceConfig",
    "confidentialInstanceConfig",
    "advancedMachineFeatures",
    "reservationAffinity",
    "resourcePolicies",
    "canIpForward",
    "description",
    "displayDevice",
    "networkPerformanceConfig",
    "params",
    "deletionProtection",
    "hostname",
}
GCP_NESTED_KEYS = {
    "disks": {"boot", "autoDelete", "type", "mode", "deviceName", "source", "interface", "initializeParams",
              "diskSizeGb", "guestOsFeatures", "diskEncryptionKey"},
    "initializeParams": {"diskSizeGb", "diskType", "sourceImage", "diskName", "labels", "provisionedIops",
                         "provisionedThroughput", "resourcePolicies", "sourceSnapshot", "architecture"},
    "scheduling": {"preemptible", "onHostMaintenance", "automaticRestart", "provisioningModel",
                   "instanceTerminationAction", "maxRunDuration", "terminationTime", "nodeAffinities",
                   "minNodeCpus", "localSsdRecoveryTimeout", "availabilityDomain"},
    "serviceAccounts": {"email", "scopes"},
}  # fmt: skip
PUBLIC = {"0.0.0.0/0", "::/0"}


def load(name: str) -> dict:
    with open(CONFIGS[name]) as f:
        return yaml.safe_load(f)


def worker_types(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def instance_type(provider: str, node_config: dict) -> str:
    return node_config["InstanceType"] if provider == "aws" else node_config["machineType"]


def is_spot(provider: str, node_config: dict) -> bool:
    if provider == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    return isinstance(scheduling, dict) and (
        scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True
    )


# ------------------------------------------------------------------------------------------- checks


def _botocore_problems(shape, value, path: str) -> list[str]:
    """Keys and enum values of ``value`` that EC2's API model of ``shape`` does not know."""
    kind = shape.type_name
    if kind == "structure":
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping, got {value!r}"]
        problems = []
        for key, item in value.items():
            if key not in shape.members:
                problems.append(f"{path}.{key}: not a field of EC2 {shape.name}")
            else:
                problems += _botocore_problems(shape.members[key], item, f"{path}.{key}")
        return problems
    if kind == "list":
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        return [p for i, item in enumerate(value) for p in _botocore_problems(shape.member, item, f"{path}[{i}]")]
    if kind == "string" and shape.enum and value not in shape.enum:
        return [f"{path}: {value!r} is not one of {shape.enum}"]
    return []


def provider_problems(provider: str, cfg: dict) -> list[str]:
    """``provider`` and ``node_config`` keys that Ray or the cloud's API would not read (Ray's schema
    takes both as free-form mappings, so a typo there is silently ignored or fails at launch)."""
    problems = [f"provider.{k}: not a key Ray's {provider} provider reads" for k in cfg["provider"]]
    problems = [p for p, k in zip(problems, cfg["provider"]) if k not in PROVIDER_KEYS[provider]]
    if cfg["provider"].get("type") != provider:
        problems.append(f"provider.type: expected {provider!r}, got {cfg['provider'].get('type')!r}")
    for name, node in cfg["available_node_types"].items():
        nc, where = node["node_config"], f"available_node_types.{name}.node_config"
        if provider == "aws":
            import botocore.session

            shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
            shape = shape.input_shape
            problems += _botocore_problems(shape, {k: v for k, v in nc.items() if k not in RAY_AWS_NODE_KEYS}, where)
            image = str(nc.get("ImageId", ""))
            if not (image.startswith("ami-") or image.startswith("resolve:ssm:")):
                problems.append(f"{where}.ImageId: an explicit ami-... or resolve:ssm:... image, got {image!r}")
        else:
            problems += [
                f"{where}.{k}: not a field of a Compute Engine instance" for k in nc if k not in GCP_INSTANCE_KEYS
            ]
            if "scheduling" in nc and not isinstance(nc["scheduling"], dict):
                problems.append(
                    f"{where}.scheduling: must be a mapping (ray#46248), got {type(nc['scheduling']).__name__}"
                )
            for disk in nc.get("disks", []):
                problems += [
                    f"{where}.disks.{k}: unknown disk field" for k in disk if k not in GCP_NESTED_KEYS["disks"]
                ]
                params = disk.get("initializeParams", {})
                problems += [
                    f"{where}.disks.initializeParams.{k}: unknown field"
                    for k in params
                    if k not in GCP_NESTED_KEYS["initializeParams"]
                ]
                if disk.get("boot") and not str(params.get("sourceImage", "")).startswith("projects/"):
                    problems.append(f"{where}: the boot disk needs an explicit sourceImage (projects/...)")
            if isinstance(nc.get("scheduling"), dict):
                problems += [
                    f"{where}.scheduling.{k}: unknown field"
                    for k in nc["scheduling"]
                    if k not in GCP_NESTED_KEYS["scheduling"]
                ]
            for account in nc.get("serviceAccounts", []):
                problems += [
                    f"{where}.serviceAccounts.{k}: unknown field"
                    for k in account
                    if k not in GCP_NESTED_KEYS["serviceAccounts"]
                ]
                project = cfg["provider"].get("project_id")
                if not str(account.get("email", "")).endswith(f"@{project}.iam.gserviceaccount.com"):
                    problems.append(f"{where}.serviceAccounts: {account.get('email')!r} is not in project {project!r}")
    return problems


def node_type_problems(provider: str, cfg: dict) -> list[str]:
    """GPU counts, the head, the scale range, and the spot / on-demand pairs of GPU worker types."""
    problems = []
    if not isinstance(cfg.get("max_workers"), int) or not isinstance(cfg.get("idle_timeout_minutes"), (int, float)):
        problems.append("max_workers and idle_timeout_minutes must be set explicitly")
    for name, node in cfg["available_node_types"].items():
        machine = instance_type(provider, node["node_config"])
        if machine not in MACHINES:
            problems.append(f"{name}: machine type {machine!r} is not in the test's table; add its GPU and vCPU counts")
            continue
        gpus, vcpus = MACHINES[machine]
        resources = node.get("resources", {})
        if resources.get("GPU") != gpus:
            problems.append(f"{name}: resources.GPU={resources.get('GPU')!r} but {machine} has {gpus} GPUs")
        if not 1 <= resources.get("CPU", 0) <= vcpus:
            problems.append(f"{name}: resources.CPU={resources.get('CPU')!r}, expected 1..{vcpus} for {machine}")
    head = cfg["available_node_types"][cfg["head_node_type"]]
    if head["resources"].get("GPU", 0) != 0 or is_spot(provider, head["node_config"]):
        problems.append("the head must be an on-demand CPU node (it runs no training and holds the drivers)")
    pairs = {}
    for name, node in worker_types(cfg).items():
        spot = is_spot(provider, node["node_config"])
        resources = node.get("resources", {})
        if node.get("min_workers") != 0 or not isinstance(node.get("max_workers"), int) or node["max_workers"] < 1:
            problems.append(f"{name}: needs min_workers: 0 and an explicit max_workers >= 1")
        if resources.get("GPU", 0) < 1:
            problems.append(f"{name}: a worker type without GPUs")
        market = "spot" if spot else "on_demand"
        if resources.get(market) != 1 or resources.get("on_demand" if spot else "spot"):
            problems.append(f"{name}: the custom resource must say its market ({market}: 1), got {resources}")
        if (
            provider == "gcp"
            and not spot
            and node["node_config"].get("scheduling", {}).get("onHostMaintenance") != "TERMINATE"
        ):
            problems.append(f"{name}: a GPU machine needs scheduling.onHostMaintenance: TERMINATE")
        pairs.setdefault(resources.get("GPU"), set()).add(spot)
    for gpus in (1, 8):
        if pairs.get(gpus) != {True, False}:
            problems.append(f"no spot and on-demand pair of {gpus}-GPU worker types (got {pairs.get(gpus)})")
    return problems


def setup_problems(raw: dict, prepared: dict) -> list[str]:
    """Setup commands written out (Ray's defaults would install a nightly wheel), nothing installed on a
    node's start (the image has it), and a kernel build that cannot fail the node's setup (a failed
    setup makes the autoscaler replace the node, again and again)."""
    problems = [
        f"{key} must be written out (even [])"
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
        if raw.get(key) is None
    ]
    every = [
        c
        for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands")
        for c in prepared.get(key) or []
    ]
    for command in every:
        if re.search(r"ray-wheels|ray-\d+\.\d+\.\d+\.dev|install\s+(-U\s+)?[\"']?ray\[", command):
            problems.append(f"a setup command installs another Ray: {command!r}")
        elif re.search(r"\bpip3?\s+install\b", command):
            problems.append(f"a setup command installs on every node start (the image has it): {command!r}")
    for command in raw.get("worker_setup_commands") or []:
        if "ops build" in command and not re.search(r"\|\|\s*echo\b", command):
            problems.append(f"a failed kernel build fails the node's setup, and the node is replaced: {command!r}")
    if "/home/ray/ddetr" in (raw.get("file_mounts") or {}):
        problems.append("file_mounts copies the project over the image's copy")
    return problems


def exposure_problems(provider: str, cfg: dict) -> list[str]:
    """No public port but SSH, the dashboard and job API reached by forwarding, token auth on."""
    problems = []
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        ranges = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        }
        if ranges & PUBLIC and not (rule.get("FromPort") == rule.get("ToPort") == 22):
            problems.append(f"security_group opens ports {rule.get('FromPort')}-{rule.get('ToPort')} to the internet")
    docker = cfg.get("docker", {})
    options = " ".join(
        docker.get(k) and " ".join(docker[k]) or "" for k in ("run_options", "head_run_options", "worker_run_options")
    )
    if re.search(r"(^|\s)(-p|--publish)(\s|=)", options):
        problems.append("a docker run option publishes a port")
    if "RAY_AUTH_MODE=token" not in options:
        problems.append("token auth is off: docker run_options must set RAY_AUTH_MODE=token")
    if "/home/ray/.ray/auth_token" not in (cfg.get("file_mounts") or {}):
        problems.append("the auth token is not shipped to the nodes (file_mounts /home/ray/.ray/auth_token)")
    head_start = " ".join(cfg.get("head_start_ray_commands") or [])
    if "--ray-client-server-port" in head_start or "--dashboard-port" in head_start:
        problems.append("head_start_ray_commands move the dashboard or client ports off the forwarded defaults")
    return problems


def image_problems(cfg: dict, base: str, version: str) -> list[str]:
    """The image built from cluster/Dockerfile (``base`` its FROM tag, ``version`` the project's), pulled
    by the hosts with their own credentials, GPU workers forced onto the CUDA kernel."""
    docker = cfg.get("docker", {})
    images = [docker[k] for k in ("image", "head_image", "worker_image") if docker.get(k)]
    problems = [] if images else ["docker.image is not set"]
    for image in images:
        name, _, tag = image.rpartition(":")
        if not name.endswith("/ray-deformable-detr") or tag != f"{version}-ray{base}":
            problems.append(
                f"docker image {image!r} is not cluster/Dockerfile's <registry>/ray-deformable-detr:{version}-ray{base}"
            )
        elif not any(name.split("/")[0] in c for c in cfg.get("initialization_commands") or []):
            problems.append(f"no initialization command logs the hosts' Docker in to {name.split('/')[0]}")
    if "MSDA_BACKEND=cuda" not in " ".join(docker.get("worker_run_options") or []):
        problems.append("GPU workers must run with MSDA_BACKEND=cuda (worker_run_options)")
    if "MSDA_BACKEND" in " ".join((docker.get("run_options") or []) + (docker.get("head_run_options") or [])):
        problems.append("MSDA_BACKEND=cuda must not reach the CPU head (put it in worker_run_options)")
    return problems


def dockerfile_base(pins: dict[str, str], ray_image) -> str:
    """The tag of cluster/Dockerfile's base image, checked against the project's pins."""
    dockerfile = (REPO_ROOT / "cluster" / "Dockerfile").read_text()
    bases = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert len(bases) == 1, f"cluster/Dockerfile should have one FROM, got {bases}"
    parts = ray_image(bases[0], pins, "cluster/Dockerfile")
    torch_minor = ".".join(pins["torch"].split(".")[:2])
    assert parts["cuda"] == TORCH_CUDA.get(torch_minor), (
        f"{bases[0]}: CUDA {parts['cuda']}, but torch {pins['torch']}'s wheels are cu{TORCH_CUDA.get(torch_minor)}"
    )
    return bases[0].split(":", 1)[1]


def project_version() -> str:
    return re.search(r'^version\s*=\s*"([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)


# -------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ray_offline_validation(name):
    cfg = load(name)
    validate_config(prepare_config(copy.deepcopy(cfg)))
    # The same validation catches a misspelled node-type field, so passing above means something.
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu1_spot"]["max_worker"] = 2
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_provider_and_node_config_keys(name):
    cfg = load(name)
    assert provider_problems(name, cfg) == []
    broken = copy.deepcopy(cfg)
    broken["provider"]["availabilty_zone"] = broken["provider"].pop("availability_zone")
    nc = broken["available_node_types"]["gpu1_spot"]["node_config"]
    if name == "aws":
        nc["InstanceMarketOptions"]["MarketType"] = "spott"
        nc["BlockDeviceMappings"][0]["Ebs"]["VolumeSze"] = 10
        broken["available_node_types"]["head"]["node_config"].pop("ImageId")
        expected = ["provider.availabilty_zone", "MarketType: 'spott'", "Ebs.VolumeSze", "head.node_config.ImageId"]
    else:
        nc["scheduling"] = [{"preemptible": True}]  # the list form of the wheel's defaults
        nc["disks"][0]["initializeParams"]["sourceImag"] = nc["disks"][0]["initializeParams"].pop("sourceImage")
        nc["serviceAccounts"][0]["email"] = "ray@other-project.iam.gserviceaccount.com"
        expected = ["provider.availabilty_zone", "scheduling: must be a mapping", "sourceImag", "other-project"]
    found = "\n".join(provider_problems(name, broken))
    for text in expected:
        assert text in found, f"{text!r} not reported in:\n{found}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_node_types_gpu_counts_and_spot(name):
    cfg = load(name)
    assert node_type_problems(name, cfg) == []
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu8_spot"]["resources"]["GPU"] = 4
    broken["available_node_types"]["gpu1_ondemand"]["min_workers"] = 1
    broken["available_node_types"]["head"]["resources"]["GPU"] = 1
    spot_nc = broken["available_node_types"]["gpu1_spot"]["node_config"]
    if name == "aws":
        spot_nc.pop("InstanceMarketOptions")
    else:
        spot_nc["scheduling"] = {"provisioningModel": "STANDARD", "onHostMaintenance": "TERMINATE"}
    found = "\n".join(node_type_problems(name, broken))
    for text in (
        "gpu8_spot: resources.GPU=4",
        "gpu1_ondemand: needs min_workers: 0",
        "the head must be",
        "gpu1_spot: the custom resource",
    ):
        assert text in found, f"{text!r} not reported in:\n{found}"
    assert "no spot and on-demand pair of 1-GPU" in found


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_setup_commands_written_out(name):
    cfg = load(name)
    assert setup_problems(cfg, prepare_config(copy.deepcopy(cfg))) == []
    # Left out, Ray fills in its provider's defaults: a pip install of a nightly Ray wheel.
    broken = copy.deepcopy(cfg)
    del broken["setup_commands"]
    broken["worker_setup_commands"] = ["python -m ops build", 'pip install -e "/home/ray/ddetr[cuda]"']
    found = "\n".join(setup_problems(broken, prepare_config(copy.deepcopy(broken))))
    for text in ("setup_commands must be written out", "installs another Ray", "installs on every node start"):
        assert text in found, f"{text!r} not reported in:\n{found}"
    assert "a failed kernel build fails the node's setup" in found


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_no_public_dashboard_and_token_auth(name):
    cfg = load(name)
    assert exposure_problems(name, cfg) == []
    broken = copy.deepcopy(cfg)
    broken["provider"]["security_group"] = {
        "IpPermissions": [
            {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
        ]
    }
    broken["docker"]["run_options"] = [o for o in broken["docker"]["run_options"] if "RAY_AUTH_MODE" not in o] + [
        "-p 8265:8265"
    ]
    found = "\n".join(exposure_problems(name, broken))
    for text in ("opens ports 8265-8265", "publishes a port", "token auth is off"):
        assert text in found, f"{text!r} not reported in:\n{found}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_image_is_the_dockerfiles(name, pins, ray_image):
    cfg = load(name)
    base, version = dockerfile_base(pins, ray_image), project_version()
    assert image_problems(cfg, base, version) == []
    registry = cfg["docker"]["image"].rsplit("/", 1)[0]
    for image, text in (
        ("rayproject/ray:2.60.0-py311-cu130", "is not cluster/Dockerfile's"),
        (f"{registry}/ray-deformable-detr:{version}-ray2.60.0-py311-cu121", "is not cluster/Dockerfile's"),
        (f"docker.io/acme/ray-deformable-detr:{version}-ray{base}", "logs the hosts' Docker in to docker.io"),
    ):
        broken = copy.deepcopy(cfg)
        broken["docker"]["image"] = image
        found = "\n".join(image_problems(broken, base, version))
        assert text in found, f"{image}: {text!r} not reported in:\n{found}"


def test_dockerfile_installs_dependencies_before_the_code(pins, ray_image):
    """The base pinned like the project; torch pinned; the pyproject.toml files and their install come
    before `COPY .`, so a code change does not reinstall the dependencies."""
    dockerfile_base(pins, ray_image)
    lines = [line for line in (REPO_ROOT / "cluster" / "Dockerfile").read_text().splitlines() if line.strip()]
    text = "\n".join(lines)
    assert f'"torch=={pins["torch"]}"' in text
    steps = [i for i, line in enumerate(lines) if not line.startswith("#")]
    copy_all = next(i for i in steps if re.match(r"COPY\b.*\s\.\s+\./?$", lines[i]))
    copies = [i for i in steps if re.match(r"COPY\b.*pyproject\.toml", lines[i])]
    install = next(i for i in steps if "-r /tmp/requirements.txt" in lines[i])
    assert len(copies) == 2 and max(copies) < install < copy_all, "pyproject.toml files, their install, then COPY ."


def snippets(path: Path) -> list[tuple[str, list[str]]]:
    """(where, command lines) of each shell snippet: a README code block, or a run of indented commands
    in a config's comments (``#   command``)."""
    lines = path.read_text().splitlines()
    if path.suffix == ".md":
        blocks, current, start = [], None, 0
        for i, line in enumerate(lines, 1):
            if line.startswith("```"):
                if current is None:
                    current, start = [], i
                else:
                    blocks.append((f"{path.name}:{start}", current))
                    current = None
            elif current is not None:
                current.append(line)
        return blocks
    blocks, current = [], []
    for i, line in enumerate(lines + [""], 1):
        if line.startswith("#   "):
            current.append(line[4:])
        elif current:
            blocks.append((f"{path.name}:{i - len(current)}", current))
            current = []
    return blocks


def token_problems(path: Path) -> list[str]:
    """Snippets that talk to a cluster's job API without RAY_AUTH_MODE=token set in the client first."""
    problems = []
    for where, commands in snippets(path):
        token = False
        for command in commands:
            code = command.split("#", 1)[0]
            token = token or "RAY_AUTH_MODE=token" in code
            if re.search(r"(^|\s)ray job \w", code) and not token:
                problems.append(f"{where}: `{code.strip()[:60]}` runs without RAY_AUTH_MODE=token set before it")
    return problems


DOCUMENTED = [REPO_ROOT / "README.md", *CONFIGS.values(), *sorted((REPO_ROOT / "cluster" / "kuberay").glob("*.yaml"))]


def test_every_snippet_sends_the_token(tmp_path):
    """Ray 2.60's client sends the token only with RAY_AUTH_MODE=token in its environment."""
    assert [p for path in DOCUMENTED for p in token_problems(path)] == []
    readme = (REPO_ROOT / "README.md").read_text()
    broken = tmp_path / "README.md"
    broken.write_text(readme.replace("export RAY_AUTH_MODE=token RAY_ADDRESS=", "export RAY_ADDRESS="))
    found = "\n".join(token_problems(broken))
    assert "ray job submit --working-dir" in found and "without RAY_AUTH_MODE=token" in found, found
