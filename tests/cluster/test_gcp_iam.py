"""The Google Cloud roles: the head's custom role (cluster/gcp-iam/) holds every permission the calls of
Ray's Compute Engine node provider need for cluster/gcp.yaml's workers and no wildcard or admin
permission; cluster/once-gcp.sh binds no broad predefined role on the project and grants
roles/iam.serviceAccountUser on the workers' account only; gcp.yaml runs the head as that account.

Each check runs on the real files and on broken copies.
"""

from __future__ import annotations

import ast
import copy
import re
import shlex
from pathlib import Path

import ray
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLE = REPO_ROOT / "cluster" / "gcp-iam" / "ddetr-ray-head-role.yaml"
SCRIPT = REPO_ROOT / "cluster" / "once-gcp.sh"
GCP_YAML = REPO_ROOT / "cluster" / "gcp.yaml"
# Read as text: importing it needs the Google API client, which only the launcher's laptop has.
RAY_GCP_NODE = Path(ray.__file__).parent / "autoscaler" / "_private" / "gcp" / "node.py"

# The Compute Engine calls in Ray's GCPCompute (gcp/node.py), and the permission each needs. A Ray upgrade
# that adds a call fails test_the_autoscaler_calls_are_known until it is added here (and to the role).
COMPUTE_CALLS = {
    ("instances", "list"): "compute.instances.list",
    ("instances", "get"): "compute.instances.get",
    ("instances", "insert"): "compute.instances.create",
    ("instances", "setLabels"): "compute.instances.setLabels",
    ("instances", "delete"): "compute.instances.delete",
    ("instances", "stop"): "compute.instances.stop",
    ("instances", "start"): "compute.instances.start",
    ("zoneOperations", "get"): "compute.zoneOperations.get",
}
# Calls made only with provider.cache_stopped_nodes.
STOPPED_NODES = {"compute.instances.stop", "compute.instances.start"}
# Project-level roles that give the head far more than its calls: any of them bound on the project fails.
BROAD_ROLES = {
    "roles/owner",
    "roles/editor",
    "roles/compute.admin",
    "roles/compute.instanceAdmin",
    "roles/compute.instanceAdmin.v1",
    "roles/iam.serviceAccountUser",
    "roles/iam.serviceAccountTokenCreator",
    "roles/storage.admin",
    "roles/storage.objectAdmin",
}


def load_role() -> dict:
    return yaml.safe_load(ROLE.read_text())


def head_needs(cfg: dict) -> set[str]:
    """The permissions the head's autoscaler needs to run ``cfg``'s worker types."""
    needs = {p for p in COMPUTE_CALLS.values() if p not in STOPPED_NODES}
    if cfg["provider"].get("cache_stopped_nodes", False):
        needs |= STOPPED_NODES
    head = cfg["head_node_type"]
    for name, node in cfg["available_node_types"].items():
        if name == head:
            continue
        nc = node["node_config"]
        needs.add("compute.instances.setLabels")  # Ray labels every node it makes
        if any("initializeParams" in d for d in nc.get("disks", [])):
            needs |= {"compute.disks.create", "compute.images.useReadOnly"}
        for interface in nc.get("networkInterfaces", []):
            needs.add("compute.subnetworks.use")
            if interface.get("accessConfigs"):
                needs.add("compute.subnetworks.useExternalIp")
        if nc.get("serviceAccounts"):
            needs.add("compute.instances.setServiceAccount")
        if nc.get("scheduling"):
            needs.add("compute.instances.setScheduling")
        if nc.get("metadata"):
            needs.add("compute.instances.setMetadata")
        if nc.get("tags"):
            needs.add("compute.instances.setTags")
    return needs


def role_problems(role: dict, cfg: dict) -> list[str]:
    """A permission the head needs that the role lacks; a wildcard, IAM or project-policy permission."""
    granted = set(role.get("includedPermissions", []))
    problems = [f"the head's role lacks {p}" for p in sorted(head_needs(cfg) - granted)]
    for p in sorted(granted):
        if "*" in p:
            problems.append(f"the head's role holds the wildcard {p}")
        elif not p.startswith("compute.") or re.search(r"IamPolicy|firewalls|compute\.networks\.|projects\.", p):
            problems.append(f"the head's role holds {p}, which no autoscaler call needs")
    extra = granted - head_needs(cfg) - STOPPED_NODES
    if extra:
        problems.append(f"the head's role holds permissions its calls do not need: {sorted(extra)}")
    return problems


def gcloud_commands(script: str) -> list[list[str]]:
    """Each gcloud command of a shell script as its words (continuation lines joined, `once` dropped)."""
    joined = re.sub(r"\\\n\s*", " ", script)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("once "):
            line = line[len("once ") :]
        if line.startswith("gcloud "):
            commands.append(shlex.split(line))
    return commands


def _flag(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def binding_problems(script: str, head: str, worker: str) -> list[str]:
    """Broad roles bound on the project; serviceAccountUser granted other than on ``worker`` to ``head``."""
    problems, acts_as = [], []
    for words in gcloud_commands(script):
        role = _flag(words, "--role")
        if role is None:
            continue
        if words[1:3] == ["projects", "add-iam-policy-binding"] and role in BROAD_ROLES:
            problems.append(f"{role} bound on the whole project")
        if role == "roles/iam.serviceAccountUser":
            on = words[4] if words[1:4] == ["iam", "service-accounts", "add-iam-policy-binding"] else "the project"
            acts_as.append((on, _flag(words, "--member")))
    if acts_as != [(worker, f"serviceAccount:{head}")]:
        problems.append(
            f"roles/iam.serviceAccountUser must be granted once, on {worker} to {head}; got {acts_as or 'none'}"
        )
    return problems


def _vars(script: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+)=(\S+)$", script, flags=re.MULTILINE))


def _expand(text: str, variables: dict[str, str]) -> str:
    for _ in range(3):
        text = re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), text)
    return text


def _accounts(cfg: dict) -> tuple[str, str]:
    """(the head's, the workers') service account e-mail in gcp.yaml."""
    head = cfg["available_node_types"][cfg["head_node_type"]]["node_config"]["serviceAccounts"][0]["email"]
    workers = {
        sa["email"]
        for name, node in cfg["available_node_types"].items()
        if name != cfg["head_node_type"]
        for sa in node["node_config"]["serviceAccounts"]
    }
    assert len(workers) == 1, f"the worker types run as several accounts: {workers}"
    return head, workers.pop()


def test_the_head_role_allows_the_autoscaler_calls_and_nothing_more():
    cfg = yaml.safe_load(GCP_YAML.read_text())
    role = load_role()
    assert role_problems(role, cfg) == []
    broken = copy.deepcopy(role)
    broken["includedPermissions"].remove("compute.instances.setServiceAccount")
    broken["includedPermissions"] += ["compute.*", "resourcemanager.projects.setIamPolicy"]
    found = "\n".join(role_problems(broken, cfg))
    for text in (
        "lacks compute.instances.setServiceAccount",
        "holds the wildcard compute.*",
        "holds resourcemanager.projects.setIamPolicy",
    ):
        assert text in found, f"{text!r} not reported in:\n{found}"
    # A worker given an external IP needs one more permission, which the role does not hold: so the
    # workers' networkInterfaces have none.
    public = copy.deepcopy(cfg)
    public["available_node_types"]["gpu1_spot"]["node_config"]["networkInterfaces"][0]["accessConfigs"] = [
        {"name": "External NAT", "type": "ONE_TO_ONE_NAT"}
    ]
    assert "lacks compute.subnetworks.useExternalIp" in "\n".join(role_problems(role, public))


def test_the_autoscaler_calls_are_known():
    """Every Compute Engine call in Ray's GCPCompute is in COMPUTE_CALLS."""
    source = RAY_GCP_NODE.read_text()
    compute = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "GCPCompute")
    called = set()
    for node in ast.walk(compute):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            inner = node.func.value
            if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Attribute):
                if ast.unparse(inner.func.value) == "self.resource":
                    called.add((inner.func.attr, node.func.attr))
    assert called, "no self.resource.<collection>().<method>() call found in GCPCompute: the parser is stale"
    unknown = called - set(COMPUTE_CALLS)
    assert not unknown, f"Ray's GCP node provider makes calls this test does not know: {sorted(unknown)}"


def test_bindings_are_narrow_and_the_head_runs_as_its_account():
    cfg = yaml.safe_load(GCP_YAML.read_text())
    head, worker = _accounts(cfg)
    script = SCRIPT.read_text()
    expanded = _expand(script, _vars(script))
    assert binding_problems(expanded, head, worker) == []
    assert f"--file $here/gcp-iam/{ROLE.name}" in script.replace('"', ""), "once-gcp.sh does not create the role"
    on_worker = f'iam service-accounts add-iam-policy-binding "{worker}"'
    assert on_worker in expanded, "once-gcp.sh does not grant roles/iam.serviceAccountUser on the workers' account"
    broken = expanded.replace(on_worker, "projects add-iam-policy-binding ddetr-project")
    broken += "\ngcloud projects add-iam-policy-binding p --member serviceAccount:x --role roles/compute.admin\n"
    found = "\n".join(binding_problems(broken, head, worker))
    for text in ("roles/iam.serviceAccountUser bound on the whole project", "roles/compute.admin bound", "got [('"):
        assert text in found, f"{text!r} not reported in:\n{found}"
    assert head.startswith("ddetr-ray-head@") and worker.startswith("ddetr-ray-worker@")
