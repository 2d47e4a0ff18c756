"""The AWS roles of cluster/aws-iam/: valid IAM policy documents, least privilege (no wildcard action,
`*` resources only where EC2 has no resource-level permission, PassRole on the workers' role only), every
call Ray's AWS node provider makes from the head allowed, and cluster/aws.yaml and cluster/once-aws.sh using the
roles these files define.

A small evaluator of Allow statements (actions, resources and StringEquals conditions, with IAM's `*` and
`?` wildcards) answers "may the head do this?"; each check runs on the real documents and on broken ones.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import json
import re
from pathlib import Path

import pytest
import ray.autoscaler._private.aws.node_provider as aws_node_provider
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
IAM = REPO_ROOT / "cluster" / "aws-iam"
AWS_YAML = REPO_ROOT / "cluster" / "aws.yaml"

# The boto3 calls in Ray's AWS node provider, and the IAM action each needs. A Ray upgrade that adds a
# call fails test_the_autoscaler_calls_are_known until it is added here and to the head's policy.
BOTO_CALLS = {
    "filter": "ec2:DescribeInstances",  # ec2.instances.filter
    "create_tags": "ec2:CreateTags",
    "create_instances": "ec2:RunInstances",
    "terminate": "ec2:TerminateInstances",
    "terminate_instances": "ec2:TerminateInstances",
    "stop": "ec2:StopInstances",
    "stop_instances": "ec2:StopInstances",
    "wait_until_stopped": "ec2:DescribeInstances",  # a waiter polling DescribeInstances
    "start_instances": "ec2:StartInstances",
    "describe_images": "ec2:DescribeImages",
    "describe_instance_types": "ec2:DescribeInstanceTypes",
}
# Calls made only when the config asks for them: stopped-node caching, the CloudWatch agent.
CONDITIONAL = {"ec2:StopInstances", "ec2:StartInstances", "ec2:DescribeImages"}
# Actions that support no resource-level permission: EC2 reads, and the ECR login that lets a node's Docker
# pull the image. The only ones allowed on Resource "*".
UNSCOPED_READS = {
    "ec2:DescribeInstances",
    "ec2:DescribeInstanceTypes",
    "ec2:DescribeImages",
    "ecr:GetAuthorizationToken",
}
# What a node's `docker pull` of the image from its ECR repository needs.
ECR_PULL = {"ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"}


def load_policy(name: str) -> dict:
    return json.loads((IAM / f"{name}.json").read_text())


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def allows(policy: dict, action: str, resource: str, context: dict[str, str] | None = None) -> bool:
    """Whether one of the policy's Allow statements grants ``action`` on ``resource`` in ``context``."""
    context = context or {}
    for st in policy["Statement"]:
        if st.get("Effect") != "Allow":
            continue
        if not any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _as_list(st.get("Action", []))):
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in _as_list(st.get("Resource", []))):
            continue
        conditions = st.get("Condition", {})
        if set(conditions) - {"StringEquals", "StringLike"}:
            continue
        if all(
            key in context and any(fnmatch.fnmatchcase(context[key], v) for v in _as_list(want))
            for op in conditions.values()
            for key, want in op.items()
        ):
            return True
    return False


def policy_problems(name: str, policy: dict, worker_roles: set[str]) -> list[str]:
    """What makes a document invalid or broader than the project needs."""
    problems = []
    if policy.get("Version") != "2012-10-17":
        problems.append(f"{name}: Version must be 2012-10-17, got {policy.get('Version')!r}")
    for i, st in enumerate(_as_list(policy.get("Statement", []))):
        where = f"{name}.Statement[{st.get('Sid', i)}]"
        if not isinstance(st, dict) or st.get("Effect") not in ("Allow", "Deny"):
            problems.append(f"{where}: Effect must be Allow or Deny")
            continue
        for key in ("NotAction", "NotResource", "Principal"):
            if key in st:
                problems.append(f"{where}: {key} grants more than it names; list actions and resources")
        actions, resources = _as_list(st.get("Action", [])), _as_list(st.get("Resource", []))
        if not actions or not resources:
            problems.append(f"{where}: needs Action and Resource")
        for action in actions:
            if not re.fullmatch(r"[a-z0-9-]+:[A-Za-z]+", action):
                problems.append(f"{where}: action {action!r} is a wildcard or not service:Action")
        for resource in resources:
            if not (resource == "*" or resource.startswith("arn:aws:")):
                problems.append(f"{where}: resource {resource!r} is not an ARN")
        if "*" in resources:
            broad = sorted(set(actions) - UNSCOPED_READS)
            if broad:
                problems.append(f"{where}: {broad} on Resource '*' (only actions without resource-level permission)")
            elif not st.get("Condition", {}).get("StringEquals", {}).get("aws:RequestedRegion"):
                problems.append(f"{where}: Resource '*' must be held to the region (aws:RequestedRegion)")
        if "iam:PassRole" in actions:
            passed = {r.rsplit("/", 1)[-1] for r in resources if ":role/" in r}
            if passed != worker_roles or any(":role/" not in r for r in resources):
                problems.append(
                    f"{where}: iam:PassRole on {resources}, expected the worker roles {sorted(worker_roles)}"
                )
    return problems


def account_of(policy: dict) -> str:
    """The account id in the policy's IAM role ARNs."""
    return next(
        r.split(":")[4] for st in policy["Statement"] for r in _as_list(st["Resource"]) if r.startswith("arn:aws:iam::")
    )


def head_needs(cfg: dict, account: str) -> list[tuple[str, str, dict[str, str]]]:
    """(action, resource, request context) of every call the head makes to run ``cfg``'s cluster."""
    region, cluster = cfg["provider"]["region"], cfg["cluster_name"]
    instance = f"arn:aws:ec2:{region}:{account}:instance/i-0123456789abcdef0"
    ours = {"ec2:ResourceTag/ray-cluster-name": cluster, "aws:RequestedRegion": region}
    needs = [
        ("ec2:DescribeInstances", "*", {"aws:RequestedRegion": region}),
        ("ec2:RunInstances", instance, {"aws:RequestTag/ray-cluster-name": cluster}),
        ("ec2:CreateTags", instance, {"ec2:CreateAction": "RunInstances"}),
        ("ec2:CreateTags", instance, ours),
        ("ec2:TerminateInstances", instance, ours),
    ]
    for kind in ("subnet/subnet-1", "security-group/sg-1", "network-interface/eni-1", "volume/vol-1"):
        needs.append(("ec2:RunInstances", f"arn:aws:ec2:{region}:{account}:{kind}", {}))
    needs.append(("ec2:RunInstances", f"arn:aws:ec2:{region}::image/ami-1", {}))
    if cfg["provider"].get("cache_stopped_nodes", True):
        needs += [("ec2:StopInstances", instance, ours), ("ec2:StartInstances", instance, ours)]
    for node in cfg["available_node_types"].values():
        nc = node["node_config"]
        if nc.get("InstanceMarketOptions", {}).get("MarketType") == "spot":
            needs.append(("ec2:RunInstances", f"arn:aws:ec2:{region}:{account}:spot-instances-request/sir-1", {}))
        image = str(nc.get("ImageId", ""))
        if image.startswith("resolve:ssm:"):
            needs.append(("ssm:GetParameters", f"arn:aws:ssm:{region}::parameter{image[len('resolve:ssm:') :]}", {}))
        profile = nc.get("IamInstanceProfile", {}).get("Name")
        if profile and node is not cfg["available_node_types"][cfg["head_node_type"]]:
            needs.append(
                ("iam:PassRole", f"arn:aws:iam::{account}:role/{profile}", {"iam:PassedToService": "ec2.amazonaws.com"})
            )
    return needs


def head_problems(policy: dict, cfg: dict, account: str) -> list[str]:
    """Calls the head must make that ``policy`` denies, and calls it must not be able to make."""
    problems = [
        f"the head may not {action} on {resource}"
        for action, resource, context in head_needs(cfg, account)
        if not allows(policy, action, resource, context)
    ]
    region = cfg["provider"]["region"]
    other = "eu-west-1" if region != "eu-west-1" else "us-west-2"
    theirs = {"ec2:ResourceTag/ray-cluster-name": "someone-else", "aws:RequestedRegion": region}
    for action, resource, context in (
        ("ec2:TerminateInstances", f"arn:aws:ec2:{region}:{account}:instance/i-1", theirs),
        ("ec2:RunInstances", f"arn:aws:ec2:{region}:{account}:instance/i-1", {}),
        (
            "ec2:RunInstances",
            f"arn:aws:ec2:{other}:{account}:instance/i-1",
            {"aws:RequestTag/ray-cluster-name": "ddetr"},
        ),
        ("ec2:DescribeInstances", "*", {"aws:RequestedRegion": other}),
        ("iam:PassRole", f"arn:aws:iam::{account}:role/admin", {"iam:PassedToService": "ec2.amazonaws.com"}),
    ):
        if allows(policy, action, resource, context):
            problems.append(f"the head may {action} on {resource} ({context or 'untagged'})")
    return problems


def _bucket_arns(policy: dict) -> set[str]:
    return {r for st in policy["Statement"] for r in _as_list(st["Resource"]) if r.startswith("arn:aws:s3:::")}


def image_repository(cfg: dict) -> tuple[str, str]:
    """(region, repository ARN) of aws.yaml's docker.image, an ECR image."""
    match = re.fullmatch(r"(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com/([\w./-]+):[\w.-]+", cfg["docker"]["image"])
    assert match, f"aws.yaml's docker.image {cfg['docker']['image']!r} is not an ECR image"
    account, region, name = match.groups()
    return region, f"arn:aws:ecr:{region}:{account}:repository/{name}"


def pull_problems(role: str, policy: dict, cfg: dict) -> list[str]:
    """The node's Docker may log in to ECR and pull aws.yaml's image."""
    region, repository = image_repository(cfg)
    needs = [("ecr:GetAuthorizationToken", "*", {"aws:RequestedRegion": region})]
    needs += [(action, repository, {}) for action in sorted(ECR_PULL)]
    return [
        f"the {role} may not {action} on {resource}: its Docker cannot pull the image"
        for action, resource, context in needs
        if not allows(policy, action, resource, context)
    ]


def worker_problems(policy: dict, bucket: str, repository: str) -> list[str]:
    problems = [
        f"the worker may not {action} on {resource}"
        for action, resource in (
            ("s3:ListBucket", f"arn:aws:s3:::{bucket}"),
            ("s3:GetObject", f"arn:aws:s3:::{bucket}/runs/x/checkpoint.pt"),
            ("s3:PutObject", f"arn:aws:s3:::{bucket}/runs/x/checkpoint.pt"),
        )
        if not allows(policy, action, resource)
    ]
    for st in policy["Statement"]:
        for action in _as_list(st["Action"]):
            if not action.startswith("s3:") and action not in ECR_PULL | {"ecr:GetAuthorizationToken"}:
                problems.append(f"the worker may {action}: its role is the bucket and the image, nothing else")
        for resource in _as_list(st["Resource"]):
            if resource not in (f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*", repository) and not (
                resource == "*" and _as_list(st["Action"]) == ["ecr:GetAuthorizationToken"]
            ):
                problems.append(f"the worker's role reaches {resource}, beyond the bucket {bucket} and the image")
    return problems


# -------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def aws_cfg() -> dict:
    return yaml.safe_load(AWS_YAML.read_text())


def _profiles(cfg: dict) -> dict[str, str]:
    """Node type -> the instance profile it launches with."""
    return {
        k: v["node_config"].get("IamInstanceProfile", {}).get("Name") for k, v in cfg["available_node_types"].items()
    }


def _worker_roles(cfg: dict) -> set[str]:
    return {p for k, p in _profiles(cfg).items() if k != cfg["head_node_type"] and p}


def test_policy_documents_are_valid_and_least_privilege(aws_cfg):
    workers = _worker_roles(aws_cfg)
    for path in sorted(IAM.glob("*.json")):
        doc = json.loads(path.read_text())
        if path.stem == "trust-ec2":
            assert doc["Statement"] == [
                {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
            ]
            continue
        assert policy_problems(path.stem, doc, workers) == []
    head = load_policy("ddetr-ray-head")
    for change, text in (
        (lambda p: p["Statement"].append({"Effect": "Allow", "Action": "*", "Resource": "*"}), "'*' is a wildcard"),
        (lambda p: p["Statement"].append({"Effect": "Allow", "Action": "ec2:*", "Resource": "*"}), "'ec2:*'"),
        (
            lambda p: p["Statement"].append({"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}),
            "on Resource '*'",
        ),
        (
            lambda p: p["Statement"].append(
                {"Effect": "Allow", "Action": "iam:PassRole", "Resource": "arn:aws:iam::1:role/*"}
            ),
            "iam:PassRole on",
        ),
        (lambda p: p["Statement"][0]["Condition"].clear(), "held to the region"),
        (lambda p: p.update(Version="2008-10-17"), "Version must be"),
    ):
        broken = copy.deepcopy(head)
        change(broken)
        found = "\n".join(policy_problems("head", broken, workers))
        assert text in found, f"{text!r} not reported in:\n{found}"


def test_the_head_may_run_the_cluster_and_nothing_more(aws_cfg):
    head = load_policy("ddetr-ray-head")
    account = account_of(head)
    assert head_problems(head, aws_cfg, account) == []
    broken = copy.deepcopy(head)
    broken["Statement"] = [st for st in broken["Statement"] if st.get("Sid") != "ResolveTheDeepLearningAmiId"]
    sids = {st.get("Sid"): st for st in broken["Statement"]}
    sids["RetagAndTerminateOnlyTheClustersInstances"].pop("Condition")
    sids["GiveWorkersTheirRoleOnly"]["Resource"] = f"arn:aws:iam::{account}:role/ddetr-ray-head"
    found = "\n".join(head_problems(broken, aws_cfg, account))
    for text in ("may not ssm:GetParameters", "may ec2:TerminateInstances", "may not iam:PassRole"):
        assert text in found, f"{text!r} not reported in:\n{found}"
    # Caching stopped nodes would need StopInstances/StartInstances, which the head does not have.
    cached = copy.deepcopy(aws_cfg)
    cached["provider"]["cache_stopped_nodes"] = True
    assert "may not ec2:StopInstances" in "\n".join(head_problems(head, cached, account))


def test_the_worker_reads_and_writes_the_bucket_only(aws_cfg):
    worker = load_policy("ddetr-ray-worker")
    bucket = next(iter(_bucket_arns(worker))).split(":::")[1].split("/")[0]
    assert bucket == next(iter(_bucket_arns(load_policy("ddetr-ray-head")))).split(":::")[1].split("/")[0]
    _, repository = image_repository(aws_cfg)
    assert worker_problems(worker, bucket, repository) == []
    broken = copy.deepcopy(worker)
    broken["Statement"].append({"Effect": "Allow", "Action": "ec2:DescribeInstances", "Resource": "arn:aws:s3:::*"})
    broken["Statement"][1]["Action"] = ["s3:GetObject"]
    found = "\n".join(worker_problems(broken, bucket, repository))
    for text in ("may not s3:PutObject", "may ec2:DescribeInstances", "reaches arn:aws:s3:::*"):
        assert text in found, f"{text!r} not reported in:\n{found}"


def test_every_node_may_pull_the_image(aws_cfg):
    """aws.yaml's nodes run the image from the account's ECR: both roles log in and pull that repository."""
    for role in ("ddetr-ray-head", "ddetr-ray-worker"):
        assert pull_problems(role, load_policy(role), aws_cfg) == []
    broken = copy.deepcopy(load_policy("ddetr-ray-worker"))
    for st in broken["Statement"]:
        if st.get("Sid") == "PullTheImage":
            st["Resource"] = st["Resource"].replace("ray-deformable-detr", "other")
    found = "\n".join(pull_problems("worker", broken, aws_cfg))
    assert "may not ecr:BatchGetImage" in found, found


def test_the_autoscaler_calls_are_known(aws_cfg):
    """Every boto3 call in Ray's AWS node provider has its action in BOTO_CALLS, and the head's policy
    allows each that this config makes."""
    source = Path(aws_node_provider.__file__).read_text()
    called = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            chain = ast.unparse(node.func.value)
            if re.search(r"(^|\.)(ec2|ec2_fail_fast|node|instances|client)$", chain) and not node.func.attr.startswith(
                "_"
            ):
                called.add(node.func.attr)
    unknown = called - set(BOTO_CALLS) - {"get", "add", "items", "update", "append", "keys", "values", "pop"}
    assert not unknown, f"Ray's AWS node provider makes calls this test does not know: {sorted(unknown)}"
    needed = {action for action, _, _ in head_needs(aws_cfg, "123456789012")}
    for action in set(BOTO_CALLS.values()) - CONDITIONAL - {"ec2:DescribeInstanceTypes"}:
        assert action in needed, f"{action} is called by the autoscaler but not checked against the head's policy"


def test_aws_yaml_and_readme_use_the_roles_defined_here(aws_cfg):
    profiles = _profiles(aws_cfg)
    missing = {k for k, p in profiles.items() if not p}
    assert not missing, f"node types without an IamInstanceProfile (the head would get Ray's default role): {missing}"
    for node_type, profile in profiles.items():
        assert (IAM / f"{profile}.json").is_file(), f"{node_type}: no cluster/aws-iam/{profile}.json for its profile"
    assert profiles[aws_cfg["head_node_type"]] not in _worker_roles(aws_cfg), "the head and the workers share a role"
    script = (REPO_ROOT / "cluster" / "once-aws.sh").read_text()
    loop = re.search(r"for role in ([\w\- ]+); do(.*?)done", script, re.DOTALL)
    assert loop, "cluster/once-aws.sh: the loop that creates the roles is missing"
    assert set(loop.group(1).split()) == set(profiles.values()), (loop.group(1), set(profiles.values()))
    for step in ("create-role", "put-role-policy", "file://$here/aws-iam/$role.json", "create-instance-profile"):
        assert step in loop.group(2), f"once-aws.sh's role loop lacks {step}"


# What AWS answers each create step of cluster/once-aws.sh with when its result exists (a second run).
_SECOND_RUN_ANSWERS = {
    "create-role": "An error occurred (EntityAlreadyExists) when calling the CreateRole operation: Role with name "
    "ddetr-ray-head already exists.",
    "create-instance-profile": "An error occurred (EntityAlreadyExists) when calling the CreateInstanceProfile "
    "operation: Instance Profile ddetr-ray-head already exists.",
    "add-role-to-instance-profile": "An error occurred (LimitExceeded) when calling the AddRoleToInstanceProfile "
    "operation: Cannot exceed quota for InstanceSessionsPerInstanceProfile: 1",
    "create-service-linked-role": "An error occurred (InvalidInput) when calling the CreateServiceLinkedRole "
    "operation: Service role name AWSServiceRoleForEC2Spot has been taken in this account, please try a different "
    "suffix.",
    "create-security-group": "An error occurred (InvalidGroup.Duplicate) when calling the CreateSecurityGroup "
    "operation: The security group 'ddetr-ray' already exists for VPC 'vpc-1'",
    "authorize-security-group-ingress": "An error occurred (InvalidPermission.Duplicate) when calling the "
    "AuthorizeSecurityGroupIngress operation: the specified rule already exists",
    "create-repository": "An error occurred (RepositoryAlreadyExistsException) when calling the CreateRepository "
    "operation: The repository with name 'ray-deformable-detr' already exists in the registry",
}


def test_once_aws_runs_again_on_an_account_that_has_it_all(tmp_path):
    """The script says it is safe to run again: every create step answered as AWS answers a second time."""
    import subprocess

    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(_SECOND_RUN_ANSWERS))
    fake = tmp_path / "bin" / "aws"
    fake.parent.mkdir()
    fake.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        f"answers = json.load(open({str(answers)!r}))\n"
        "step = sys.argv[2]\n"
        "if step.startswith('describe-'):\n"
        "    print('vpc-1' if step == 'describe-vpcs' else 'sg-1')\n"
        "elif step in answers:\n"
        "    sys.exit(print(answers[step], file=sys.stderr) or 254)\n"
    )
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin"}
    run = subprocess.run(["bash", str(REPO_ROOT / "cluster" / "once-aws.sh")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("exists already: aws") == 11, run.stdout
