"""A failed Ray Train run ends the command with one clear line naming the cause, not a traceback."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import ray.train

import pipelines.evaluate as evaluate
from pipelines.job_config import load_job_config
from pipelines.raytrain.errors import describe_failure


def test_describe_failure_names_the_first_failed_worker():
    err = ray.train.WorkerGroupError(
        "Traceback ...\nValueError: boom", {1: ValueError("boom"), 0: RuntimeError("image 7: bad")}
    )
    assert describe_failure(err) == "worker 0 (and 1 more): RuntimeError: image 7: bad"
    remote = RuntimeError("Traceback (most recent call last):\n  File x, line 1\nBadInputError: a.jpg: corrupt JPEG")
    assert describe_failure(ray.train.ControllerError(remote)) == "bad input: a.jpg: corrupt JPEG"


def test_evaluate_cli_reports_a_failed_fit(monkeypatch, capsys):
    ckpt = SimpleNamespace(source_format="ours", config=SimpleNamespace(variant=lambda: "deformable"))
    monkeypatch.setattr(evaluate, "open_checkpoint_arg", lambda uri, tool: (uri, ckpt))
    monkeypatch.setattr(evaluate, "config_from_args", lambda c, a: load_job_config(preset="tiny"))

    def fail(*args, **kwargs):
        raise ray.train.WorkerGroupError("worker 1 died", {1: MemoryError("out of memory on the node")})

    monkeypatch.setattr(evaluate, "run_evaluation", fail)
    assert evaluate.main(["--checkpoint", "x.pth"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: evaluation failed: worker 1: MemoryError: out of memory on the node"
    with pytest.raises(SystemExit):  # the argument errors are still argparse's
        evaluate.main([])


@pytest.mark.ray
def test_ctrl_c_still_writes_the_runs_status_and_report(ray_local, tmp_path, tiny_overrides, monkeypatch):
    """Ray Train's SIGINT handler aborts the run and may sys.exit(0) inside fit(): the run must not stay
    "running" with nothing written."""
    import pipelines.raytrain.training as training

    class CtrlC:
        def fit(self):
            raise SystemExit(0)

    monkeypatch.setattr(training, "build_trainer", lambda *args, **kwargs: CtrlC())
    job = load_job_config(preset="tiny", overrides=tiny_overrides(tmp_path, "sigint"))
    outcome = training.run_training(job, quiet=True)
    status = json.loads((tmp_path / "sigint" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == describe_failure(outcome.error)
    assert describe_failure(outcome.error) == (
        f"Interrupted: SIGINT; `python pipelines/train.py --resume {tmp_path / 'sigint'}` goes on from the last "
        "checkpoint"
    )
    assert (tmp_path / "sigint" / "data_report.json").is_file()


@pytest.mark.ray
def test_evaluation_on_gpus_the_cluster_lacks_stops_before_any_worker(ray_local, tiny_data):
    from tiny import tiny_config

    from core.checkpoint import Checkpoint
    from pipelines.job_config import eval_job_config
    from pipelines.raytrain.evaluation import run_evaluation
    from pipelines.raytrain.preflight import PreflightError

    ckpt = Checkpoint(config=tiny_config(num_classes=4), model={}, meta={})
    val = ["data.val_ann=instances_val.json", "data.val_images=val"]
    job = eval_job_config(ckpt, data_root=tiny_data["root"], num_workers=1, use_gpu=True, overrides=val)
    with pytest.raises(PreflightError, match=r"does not fit \(GPU: need 1, cluster has 0\)"):
        run_evaluation(job, ckpt)  # it waited forever for a GPU
