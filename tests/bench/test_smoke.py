"""Every benchmark the README quotes runs at tiny sizes, one round, here or in ``./dev gpu --dry-run`` (its
own test), so no figure's command can rot.

Each runs as its own process from an empty folder (what it writes stays there), its figures unchecked:
this catches a script that no longer starts, parses, builds or finishes, not a slow one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]

# (command as the README writes it, the smoke's arguments)
SMOKES = [
    pytest.param("bench/model.py", ["--smoke", "--device", "cpu", "--variants", "plain", "with_box_refine_two_stage"]),
    pytest.param("bench/cpu_kernel.py", ["--smoke"]),
    pytest.param("bench/export.py", ["--smoke"], marks=pytest.mark.slow),
    pytest.param(
        "bench/data.py",
        ["--num-images", "4", "--size", "64x96", "--workers", "1", "--batch-size", "2", "--epochs", "2"],
        marks=pytest.mark.ray,
    ),
    pytest.param("bench/infer.py", ["--smoke", "--cores", "2"], marks=pytest.mark.ray),
    # GPU-only, with no CPU path and no smaller sizes: on a GPU the whole check and benchmark (minutes).
    pytest.param(
        "ops.bench.gpu",
        [],
        marks=[
            pytest.mark.gpu,
            pytest.mark.slow,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only, no CPU path: no CUDA here"),
        ],
    ),
]
# Quoted by the README but not run here: where they run, or why not.
NOT_RUN = {
    "bench/gpu_check.py": "tests/bench/test_gpu_check.py runs its --dry-run",
    # The dry run runs these two with the arguments a smoke here would use.
    "bench/train_step.py": "./dev gpu --dry-run runs it at tiny sizes (tests/bench/test_gpu_check.py)",
    "ops.bench.cpu": "./dev gpu --dry-run runs it at 64x96 (tests/bench/test_gpu_check.py)",
    "bench/sweep.py": "a plain run and a one-trial sweep on a local Ray (90 s); tests/tune/ runs the sweep it times",
    "ops.bench.sass": "NVRTC compiles every kernel instantiation (90 s); ops/tests/test_sass.py runs that compile",
}


def quoted_benchmarks() -> set[str]:
    """The scripts and modules the README names, ``./dev gpu`` read as the script it runs."""
    readme = (REPO_ROOT / "README.md").read_text().replace("./dev gpu", "bench/gpu_check.py")
    return set(re.findall(r"(?<![\w/])bench/\w+\.py|\bops\.bench\.\w+", readme))


def test_every_quoted_benchmark_has_a_smoke_run():
    smoked = {p.values[0] for p in SMOKES}
    assert not smoked & set(NOT_RUN)
    assert quoted_benchmarks() == smoked | set(NOT_RUN)


@pytest.mark.parametrize("command, args", SMOKES)
def test_benchmark_runs_at_tiny_sizes(command, args, tmp_path):
    target = ["-m", command] if command.startswith("ops.") else [str(REPO_ROOT / command)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, *target, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{command} {' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
