"""Renders cluster/'s deployment files from one settings file: each example value the committed files
carry (an account id, a region, a bucket, a registry) is replaced by the user's, and none may be left."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli before 3.11 took it in
    import tomli as tomllib


CLUSTER = Path(__file__).resolve().parent

# (section, key) -> the example value written in the committed files. Each file is rewritten in one pass,
# longest example first where one contains another (a zone its region, the registry its region and
# project), so a value is replaced whole and a value put in is never rewritten again.
EXAMPLES = {
    ("gcp", "registry"): "us-central1-docker.pkg.dev/ddetr-project/ddetr",
    ("aws", "availability_zones"): "us-east-1a,us-east-1b,us-east-1c,us-east-1d",
    ("aws", "account_id"): "123456789012",
    ("aws", "region"): "us-east-1",
    ("aws", "bucket"): "my-bucket",
    ("aws", "ssh_cidr"): "198.51.100.0/24",
    ("gcp", "zone"): "us-central1-a",
    ("gcp", "region"): "us-central1",
    ("gcp", "project"): "ddetr-project",
    ("gcp", "data_bucket"): "ddetr-data",
    ("gcp", "runs_bucket"): "ddetr-runs",
    ("gcp", "ssh_cidr"): "203.0.113.0/24",
}
# Values that are address ranges: the only place SSH is admitted from, so never the whole internet.
CIDRS = {("aws", "ssh_cidr"), ("gcp", "ssh_cidr")}
# The shape of the other values, and how to say it: a value of another shape renders into files that fail
# only at `ray up` or `kubectl apply` (an ARN of "s3://...", an account id with the console's dashes).
_BUCKET = (r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]", "a bucket's bare name (3-63 of a-z 0-9 . - _; no s3:// or gs://)")
FORMATS = {
    ("aws", "account_id"): (r"\d{12}", "12 digits, without the console's dashes"),
    ("aws", "region"): (r"[a-z]{2}(-[a-z]+)+-\d+", "a region such as eu-west-1"),
    ("aws", "availability_zones"): (r"[a-z0-9-]+[a-z](,[a-z0-9-]+[a-z])*", "zones such as eu-west-1a,eu-west-1b"),
    ("aws", "bucket"): _BUCKET,
    ("gcp", "project"): (r"[a-z][a-z0-9-]{4,28}[a-z0-9]", "a project id such as acme-vision"),
    ("gcp", "region"): (r"[a-z]+-[a-z]+\d+", "a region such as europe-west4"),
    ("gcp", "zone"): (r"[a-z]+-[a-z]+\d+-[a-z]", "a zone such as europe-west4-a"),
    ("gcp", "data_bucket"): _BUCKET,
    ("gcp", "runs_bucket"): _BUCKET,
    ("gcp", "registry"): (
        r"[a-z0-9.-]+(:\d+)?(/[a-z0-9._-]+)+",
        "a registry path such as europe-docker.pkg.dev/acme-vision/ml (no https://)",
    ),
}
# Values whose example is a fine choice (the regions and zones): left out, the example stays.
DEFAULTED = {("aws", "availability_zones"), ("aws", "region"), ("gcp", "zone"), ("gcp", "region")}
# The files each section's values go into, relative to cluster/.
FILES = {
    "aws": [
        "aws.yaml",
        "once-aws.sh",
        "aws-iam/ddetr-ray-head.json",
        "aws-iam/ddetr-ray-worker.json",
        "aws-iam/trust-ec2.json",
        "Dockerfile",
    ],
    "gcp": [
        "gcp.yaml",
        "once-gcp.sh",
        "gcp-iam/ddetr-ray-head-role.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob-train.yaml",
        "kuberay/rayjob-sweep.yaml",
        "kuberay/rayjob-infer.yaml",
        "kuberay/serviceaccount.yaml",
        "Dockerfile",
    ],
}


class SettingsError(ValueError):
    """A settings file that cannot be rendered; the message is one line naming the problem."""


def load_settings(path: Path) -> dict[str, dict[str, str]]:
    """The settings file's sections, every value checked: present, a non-empty string, not the example."""
    try:
        settings = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SettingsError(f"{path}: cannot read it as TOML ({e})") from e
    unknown = sorted(set(settings) - set(FILES))
    if unknown:
        raise SettingsError(f"{path}: unknown sections {unknown}, expected some of {sorted(FILES)}")
    if not settings:
        raise SettingsError(f"{path}: no [aws] or [gcp] section: nothing to render")
    unset = []
    for section in settings:
        if not isinstance(settings[section], dict):
            raise SettingsError(f'{path}: [{section}] must be a table of key = "value" lines')
        keys = {k for s, k in EXAMPLES if s == section}
        extra = sorted(set(settings[section]) - keys)
        if extra:
            raise SettingsError(f"{path}: [{section}] has unknown keys {extra}, expected {sorted(keys)}")
        for key in sorted(keys):
            example = EXAMPLES[(section, key)]
            value = (
                settings[section].setdefault(key, example)
                if (section, key) in DEFAULTED
                else settings[section].get(key)
            )
            name = f"{section}.{key}"
            if value is not None and not isinstance(value, str):
                raise SettingsError(
                    f'{path}: {name} must be a quoted string ({name.split(".")[1]} = "..."), got {value!r}'
                )
            if not value or not value.strip():
                unset.append(name)
            elif value == example and (section, key) not in DEFAULTED:
                unset.append(name)
            elif (section, key) in CIDRS:
                settings[section][key] = ssh_cidr(path, name, value, ipv4_only=section == "aws")
            elif not re.fullmatch(FORMATS[(section, key)][0], value):
                raise SettingsError(f"{path}: {name} {value!r} is not {FORMATS[(section, key)][1]}")
    if unset:
        raise SettingsError(
            f"{path}: placeholders left unset (missing, empty or still the example): {', '.join(unset)}"
        )
    check_zones(path, settings)
    return settings


def check_zones(path: Path, settings: dict[str, dict[str, str]]) -> None:
    """Each zone in its section's region: a region set without its zones keeps the example's, elsewhere."""
    zones = {
        "aws": ("availability_zones", settings.get("aws", {}).get("availability_zones", "").split(",")),
        "gcp": ("zone", [settings.get("gcp", {}).get("zone", "")]),
    }
    for section in settings:
        region = settings[section]["region"]
        key, names = zones[section]
        for zone in names:
            if not zone.startswith(region + "-") and not re.fullmatch(re.escape(region) + "[a-z]", zone):
                raise SettingsError(f"{path}: {section}.{key} {zone!r} is not in {section}.region {region!r}: set both")


def ssh_cidr(path: Path, name: str, value: str, *, ipv4_only: bool) -> str:
    """``value`` as an address range in CIDR form (an address alone: its /32 or /128); not the whole
    internet, and IPv4 where the rule takes only IPv4 (the AWS security group's ``--cidr``)."""
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError as e:
        raise SettingsError(f"{path}: {name} {value!r} is not an address range such as 198.51.100.7/32 ({e})") from e
    if network.prefixlen == 0:
        raise SettingsError(
            f"{path}: {name} {value!r} admits SSH from the whole internet; give your own range, e.g. <your IP>/32"
        )
    if ipv4_only and network.version != 4:
        raise SettingsError(
            f"{path}: {name} {value!r} is IPv6; the security group's rule takes an IPv4 range (curl -4s ifconfig.me)"
        )
    return str(network)


def render(settings_path: Path, out: Path) -> list[Path]:
    """Writes the rendered files of every section in ``settings_path`` under ``out`` (which must not
    exist), all of them or none; returns their paths."""
    settings = load_settings(settings_path)
    if out.exists():
        raise SettingsError(f"--out {out}: already exists; give a new folder")
    values = {example: settings[section][key] for (section, key), example in EXAMPLES.items() if section in settings}
    pattern = re.compile("|".join(re.escape(e) for e in sorted(values, key=len, reverse=True)))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".render-", dir=out.parent))
    except OSError as e:
        raise SettingsError(f"--out {out}: cannot make a folder there ({e.strerror})") from e
    names = list(dict.fromkeys(name for section in settings for name in FILES[section]))  # Dockerfile: both
    try:
        written = []
        for name in names:
            text = pattern.sub(lambda m: values[m.group(0)], (CLUSTER / name).read_text())
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            written.append(out / name)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written
