"""`python -m cluster render`: a settings file rendered into every deployment file, each output still
valid (Ray's launcher validation, KubeRay's strict schemas, parseable IAM JSON) with no example value
left; a placeholder left unset is refused in one line that names it; a failed render writes nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.render import EXAMPLES, FILES, SettingsError, render

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = REPO_ROOT / "cluster" / "kuberay" / "schemas"
SAMPLE = """
[aws]
account_id = "210987654321"
region = "eu-west-1"
availability_zones = "eu-west-1a,eu-west-1b"
bucket = "acme-detr"
ssh_cidr = "192.0.2.17/32"

[gcp]
project = "acme-vision"
data_bucket = "acme-coco"
runs_bucket = "acme-runs"
registry = "europe-docker.pkg.dev/acme-vision/ml"
ssh_cidr = "192.0.2.0/28"
"""


def test_render_substitutes_every_placeholder_and_stays_valid(tmp_path):
    settings = tmp_path / "settings.toml"
    settings.write_text(SAMPLE)
    out = tmp_path / "rendered"
    written = render(settings, out)
    assert sorted(written) == sorted({out / name for names in FILES.values() for name in names})
    kept = {EXAMPLES[("gcp", "zone")], EXAMPLES[("gcp", "region")]}  # left out of SAMPLE: the defaults
    for path in written:
        text = path.read_text()
        for example in set(EXAMPLES.values()) - kept:
            assert example not in text, f"{path.name}: the example {example!r} is still there"
    for name in ("aws.yaml", "gcp.yaml"):
        validate_config(prepare_config(yaml.safe_load((out / name).read_text())))
    aws = yaml.safe_load((out / "aws.yaml").read_text())
    # SSH only from the ranges set: in the security group (AWS) and the firewall rule (GCP) made once.
    assert "--port 22 --cidr 192.0.2.17/32" in (out / "once-aws.sh").read_text()
    assert "--allow tcp:22 --source-ranges 192.0.2.0/28" in (out / "once-gcp.sh").read_text()
    assert aws["provider"]["region"] == "eu-west-1" and aws["provider"]["availability_zone"] == "eu-west-1a,eu-west-1b"
    head = json.loads((out / "aws-iam" / "ddetr-ray-head.json").read_text())
    resources = [
        r
        for st in head["Statement"]
        for r in (st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]])
    ]
    assert "arn:aws:iam::210987654321:role/ddetr-ray-worker" in resources and "arn:aws:s3:::acme-detr/*" in resources
    for path in sorted((out / "kuberay").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc["kind"] == "ServiceAccount":
            assert doc["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(
                "@acme-vision.iam.gserviceaccount.com"
            )
            continue
        with open(SCHEMAS / f"kuberay-v1.7.0-{doc['kind'].lower()}_v1.schema.json") as f:
            errors = list(jsonschema.Draft7Validator(json.load(f)).iter_errors(doc))
        assert not errors, f"{path.name}: {errors[0].message}"
        assert "europe-docker.pkg.dev/acme-vision/ml/ray-deformable-detr:" in path.read_text()


def test_an_unset_placeholder_is_refused_by_name(tmp_path):
    # The committed settings file carries the examples: rendering it as it is must refuse.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster",
            "render",
            str(REPO_ROOT / "cluster" / "settings.toml"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "aws.account_id" in proc.stderr and "gcp.registry" in proc.stderr
    assert not (tmp_path / "o").exists()
    settings = tmp_path / "settings.toml"
    for cidr, text in (("0.0.0.0/0", "whole internet"), ("::/0", "whole internet"), ("my laptop", "not an address")):
        settings.write_text(SAMPLE.replace('"192.0.2.17/32"', f'"{cidr}"'))
        with pytest.raises(SettingsError, match=rf"aws\.ssh_cidr '{re.escape(cidr)}' .*{text}"):
            render(settings, tmp_path / "o")
    settings.write_text(SAMPLE.replace('bucket = "acme-detr"', 'bucket = ""'))
    with pytest.raises(SettingsError, match=r"unset .*: aws\.bucket$"):
        render(settings, tmp_path / "o")
    assert not (tmp_path / "o").exists()


AWS_ONLY = SAMPLE.split("[gcp]")[0]


@pytest.mark.parametrize(
    "text, message",
    [
        (SAMPLE.replace('"210987654321"', '"2109-8765-4321"'), "aws.account_id '2109-8765-4321' is not 12 digits"),
        (
            SAMPLE.replace('"210987654321"', "210987654321"),
            'aws.account_id must be a quoted string (account_id = "...")',
        ),
        (SAMPLE.replace('"acme-detr"', '"s3://acme-detr"'), "aws.bucket 's3://acme-detr' is not a bucket's bare name"),
        (SAMPLE.replace('"acme-coco"', '"gs://acme-coco"'), "gcp.data_bucket 'gs://acme-coco' is not a bucket's"),
        (SAMPLE.replace('"europe-docker', '"https://europe-docker'), "gcp.registry 'https://europe-docker.pkg.dev"),
        (SAMPLE.replace('availability_zones = "eu-west-1a,eu-west-1b"', ""), "aws.availability_zones 'us-east-1a' is"),
        (SAMPLE + 'region = "europe-west4"\n', "gcp.zone 'us-central1-a' is not in gcp.region 'europe-west4'"),
        (SAMPLE.replace('"192.0.2.17/32"', '"2a01:4f8::1"'), "aws.ssh_cidr '2a01:4f8::1' is IPv6; the security group"),
        ("gcp = 1\n" + AWS_ONLY, '[gcp] must be a table of key = "value" lines'),
    ],
)
def test_a_value_of_the_wrong_shape_is_named_before_any_file(tmp_path, text, message):
    settings = tmp_path / "settings.toml"
    settings.write_text(text)
    with pytest.raises(SettingsError, match=re.escape(message)):
        render(settings, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_an_address_alone_is_its_range_and_a_bad_out_is_one_line(tmp_path):
    settings = tmp_path / "settings.toml"
    settings.write_text(SAMPLE.replace('"192.0.2.17/32"', '"192.0.2.17"'))
    render(settings, tmp_path / "o")
    assert "--port 22 --cidr 192.0.2.17/32" in (tmp_path / "o" / "once-aws.sh").read_text()
    (tmp_path / "afile").write_text("")
    with pytest.raises(SettingsError, match=r"--out .*afile/out: cannot make a folder there"):
        render(settings, tmp_path / "afile" / "out")


def test_a_value_put_in_is_not_rewritten(tmp_path):
    """One pass over each file: a registry in another region keeps its region, though the region's example
    is replaced everywhere else."""
    settings = tmp_path / "settings.toml"
    registry = "us-central1-docker.pkg.dev/acme-vision/ml"
    settings.write_text(
        SAMPLE.split("[gcp]")[0] + f'[gcp]\nproject = "acme-vision"\nregion = "europe-west4"\n'
        f'zone = "europe-west4-a"\ndata_bucket = "acme-d"\nruns_bucket = "acme-r"\nregistry = "{registry}"\n'
        'ssh_cidr = "192.0.2.0/28"\n'
    )
    out = tmp_path / "rendered"
    render(settings, out)
    gcp = yaml.safe_load((out / "gcp.yaml").read_text())
    assert gcp["docker"]["image"].startswith(registry + "/ray-deformable-detr:")
    assert gcp["provider"]["region"] == "europe-west4"
