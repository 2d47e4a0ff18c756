"""./dev, the README's entry point: help that names its commands, and no suite started by a bare `./dev`."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def dev(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO_ROOT / "dev"), *args], capture_output=True, text=True, timeout=60)


def test_help_names_every_command_and_a_bare_call_runs_nothing():
    for flag in ("--help", "-h", "help"):
        run = dev(flag)
        assert run.returncode == 0 and run.stderr == ""
        assert [line.split()[1] for line in run.stdout.splitlines()[1:]] == ["setup", "test", "demo", "gpu"]
    for args in ((), ("tset",)):
        run = dev(*args)
        assert run.returncode == 2 and run.stdout == "" and "./dev test [ARGS]" in run.stderr
