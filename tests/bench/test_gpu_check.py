"""``./dev gpu --dry-run``: the GPU check's steps on the CPU, so that the script cannot rot while no GPU is
lent; its time budget, its report after a SIGTERM, and the processes a step leaves behind."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "bench" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return env


def _report(out: Path) -> list[dict]:
    return json.loads((out / "report.json").read_text())["steps"]


@pytest.mark.slow
@pytest.mark.ray
def test_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    steps = _report(out)
    assert [s["name"] for s in steps] == [s.name for s in gpu_check.specs(True, out)]
    assert all(s["result"] == "PASS" for s in steps), steps
    assert (out / "report.md").read_text() in proc.stdout
    assert json.loads((out / "report.json").read_text())["environment"]["torch"] == torch.__version__
    by_name = {s["name"]: s for s in steps}
    assert "of 9 GPU steps parse" in by_name["GPU step arguments"]["summary"]
    assert set(by_name["bf16 loss curve"]["details"]["result"]) == {"fp32", "bf16"}
    assert by_name["train step fp32"]["details"]["result"]["images_per_s"] > 0
    assert all(Path(s["details"]["log"]).is_file() for s in steps)


def test_a_renamed_option_or_config_field_fails_the_argument_check(tmp_path):
    specs = gpu_check.specs(False, tmp_path)
    assert gpu_check.check_arguments(specs)[0]
    model = next(s for s in specs if s.name == "inference batch 1")
    model.argv[model.argv.index("--cuda-graph")] = "--cuda-graphs"
    step = next(s for s in specs if s.name == "train step bf16")
    step.argv[step.argv.index("model.backbone_weights=null")] = "model.backbone_weight=null"
    ok, summary, problems = gpu_check.check_arguments(specs)
    assert not ok
    assert set(problems) == {"inference batch 1", "train step bf16"}
    assert "--cuda-graphs" in problems["inference batch 1"]
    assert "model.backbone_weight" in problems["train step bf16"] and "\n" not in summary


def test_the_budget_leaves_the_later_steps_not_run(tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--budget-s", str(gpu_check.MIN_STEP_S + 1)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    steps = _report(out)
    assert len(steps) == len(gpu_check.specs(True, out))
    assert steps[0]["ran"]  # the argument check: seconds, or stopped at the budget under load
    assert not any(s["ran"] for s in steps[2:])
    assert all("budget was spent" in s["summary"] for s in steps if not s["ran"])
    assert "| NOT RUN |" in (out / "report.md").read_text()


def test_only_reruns_the_named_steps_and_keeps_the_other_rows(tmp_path):
    out = tmp_path / "report"

    def check(*only: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--only", *only]
        return subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)

    assert check("model parity").returncode == 0
    first = _report(out)
    assert [s["name"] for s in first] == ["model parity"]
    assert check("ops info").returncode == 0
    assert [s["name"] for s in _report(out)] == ["ops info", "model parity"]  # the check's own order
    assert _report(out)[1] == first[0]
    proc = check("ops info", "model parity ")
    assert proc.returncode == 2 and "--only: no step named 'model parity '" in proc.stderr
    assert [s["name"] for s in _report(out)] == ["ops info", "model parity"]


def test_sigterm_stops_the_running_step_and_keeps_the_finished_ones(tmp_path):
    out = tmp_path / "report"
    names = ["ops info", "ray train demo", "infer on its checkpoint"]
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--only", *names],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        # The report is written after each step: there while the Ray run, the second step, is going.
        while not ((out / "report.json").exists() and (out / "ray_train_demo.log").exists()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        assert [s["name"] for s in _report(out)] == ["ops info"]
        time.sleep(2)  # into the run, Ray starting
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 1, output
    steps = {s["name"]: s for s in _report(out)}
    assert steps["ops info"]["result"] == "PASS"
    assert steps["ray train demo"]["result"] == "FAIL"
    assert steps["ray train demo"]["summary"].startswith("stopped by signal 15: ")
    assert steps["infer on its checkpoint"]["result"] == "NOT RUN"
    assert steps["infer on its checkpoint"]["summary"] == "stopped by signal 15"


def _alive(marker: str) -> list[int]:
    """Processes whose command line holds ``marker``."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


@pytest.mark.parametrize("step_ends", ["past its time", "by itself"])
def test_a_step_leaves_no_process_behind(step_ends, tmp_path):
    marker = f"{time.time_ns() % 10**6 + 3000}"  # a sleep only this test starts
    code = f"import subprocess, time; subprocess.Popen(['sleep', '{marker}']); print('started', flush=True)"
    if step_ends == "past its time":
        code += "; time.sleep(600)"
    step = gpu_check.run_step(gpu_check.Spec("sleeper", ["-c", code], 600), _env(), tmp_path, timeout_s=3)
    if step_ends == "past its time":
        assert not step.ok and step.summary == "timed out after 3 s: started"
    else:
        assert step.ok and step.summary == "started"
    deadline = time.monotonic() + 10
    while _alive(f"sleep {marker}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(f"sleep {marker}")
