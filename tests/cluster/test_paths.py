"""Every repository path that cluster/'s files and the README name exists (a renamed or removed file is a
broken step for whoever follows them), every `python -m` module they run is there, and every
`rendered/...` path names a file `python -m cluster render` writes."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import yaml

from cluster.render import FILES

REPO_ROOT = Path(__file__).resolve().parents[2]
# A path that starts at one of the repository's top folders (or render's output), after a space, quote,
# backtick, parenthesis or `=`, or as /home/ray/ddetr/... (the project inside the image).
PATH = re.compile(
    r"(?:^|(?<=[\s`'\"(=])|(?<=/home/ray/ddetr/))(?:\./)?((?:cluster|core|ops|pipelines|tune|tests|bench|rendered)/[\w./*-]*\w)",
    re.MULTILINE,
)
MODULE = re.compile(r"python3? -m ((?:cluster|core|ops|pipelines|tune)(?:\.\w+)*)(?![.\w])")  # not ops.bench.<name>


def documents() -> list[Path]:
    """cluster/'s text files (not the vendored schemas) and the README."""
    files = [
        p
        for p in sorted((REPO_ROOT / "cluster").rglob("*"))
        if p.is_file() and "schemas" not in p.parts and "__pycache__" not in p.parts
    ]
    return [*files, REPO_ROOT / "README.md"]


def missing_paths(text: str) -> list[str]:
    """The repository paths, modules and rendered files that ``text`` names and that do not exist."""
    rendered = {name for names in FILES.values() for name in names}
    problems = []
    for match in PATH.finditer(text):
        path = match.group(1)
        if path.startswith("rendered/"):
            if path.removeprefix("rendered/") not in rendered and path != "rendered/":
                problems.append(f"{path}: `python -m cluster render` writes no such file")
        elif not glob.glob(str(REPO_ROOT / path)):
            problems.append(f"{path}: no such file or folder")
    for match in MODULE.finditer(text):
        module = REPO_ROOT / match.group(1).replace(".", "/")
        if not (module.with_suffix(".py").is_file() or (module / "__main__.py").is_file()):
            problems.append(f"python -m {match.group(1)}: no such module")
    return problems


def test_every_path_named_exists():
    problems = [f"{doc.relative_to(REPO_ROOT)}: {p}" for doc in documents() for p in missing_paths(doc.read_text())]
    assert problems == []
    planted = "see cluster/aws-iam/ddetr-ray-head.json, `bash rendered/once-azure.sh`, python -m cluster.spot_watcher\n"
    planted += "python /home/ray/ddetr/pipelines/trian.py"
    assert missing_paths(planted) == [
        "rendered/once-azure.sh: `python -m cluster render` writes no such file",
        "pipelines/trian.py: no such file or folder",
        "python -m cluster.spot_watcher: no such module",
    ]


def image_problems(readme: str, images: set[str]) -> list[str]:
    """Images the README builds or pushes that no launcher config or manifest runs."""
    named = re.findall(r"docker (?:build .*?-t|push) (\S+)", readme)
    problems = [f"the README builds or pushes {image}, which no config runs" for image in named if image not in images]
    return problems + [f"the README never builds {image}" for image in sorted(images - set(named))]


def test_the_readme_builds_the_images_the_configs_run():
    images = {
        yaml.safe_load((REPO_ROOT / "cluster" / f"{c}.yaml").read_text())["docker"]["image"] for c in ("aws", "gcp")
    }
    for manifest in (REPO_ROOT / "cluster" / "kuberay").glob("ray*.yaml"):
        images |= set(re.findall(r"image: (\S+)", manifest.read_text()))
    readme = (REPO_ROOT / "README.md").read_text()
    assert image_problems(readme, images) == []
    found = image_problems(readme.replace("ray-deformable-detr:0.1.0-", "ray-deformable-detr:0.2.0-"), images)
    assert found and all("0.2.0" in p or "never builds" in p for p in found)
