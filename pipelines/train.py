"""Train Deformable DETR on Ray Train (entry script: arguments, config, ``run_training``, exit status).

    python pipelines/train.py                                   # the demo: generated data, 2 CPU workers
    python pipelines/train.py --preset r50 --set data.root=/data/coco --set train.num_workers=8
    python pipelines/train.py --config my_run.json --set train.lr=1e-4
    python pipelines/train.py --resume runs/demo-20260101-120000 # continue a stopped run
    ray job submit --working-dir . -- python pipelines/train.py --preset tiny

It joins the cluster named by RAY_ADDRESS (set by ``ray job submit``) or ``--address``, and otherwise
starts Ray on this machine. Re-running with the same ``train.storage_path`` and ``train.name``
continues that run from its latest checkpoint (Ray Train's own resume).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python pipelines/train.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse

from pipelines.console import console_logging
from pipelines.job_config import PRESETS, ConfigError, JobConfig, load_job_config, resume_job_config
from pipelines.raytrain.cluster import quiet_ray_warnings
from pipelines.raytrain.errors import describe_failure
from pipelines.raytrain.preflight import PreflightError
from pipelines.raytrain.training import run_training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train Deformable DETR on Ray. With no arguments: the demo on generated data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets: {', '.join(PRESETS)}. Overrides: --set section.field=value (sections: model, "
        "matcher, loss, data, train; values are JSON, e.g. --set train.lr=1e-4 --set data.train_short_sides=[480,512]).",
    )
    p.add_argument("--config", help="JSON or TOML file with any of the sections")
    p.add_argument("--preset", choices=sorted(PRESETS), help="starting point (default: the file's, else demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in this directory (its config.json)")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """The validated JobConfig of the command line (ConfigError on any bad field)."""
    if args.resume is None:
        return load_job_config(args.config, args.overrides, args.preset)
    if args.config or args.preset:
        raise ConfigError("--resume takes the run's own config; add --set overrides only")
    return resume_job_config(args.resume, args.overrides)


def main(argv: list[str] | None = None) -> int:
    console_logging()
    quiet_ray_warnings()
    args = parse_args(argv)
    try:
        job = config_from_args(args)
        if args.print_config:
            print(job.model_dump_json(indent=2))
            return 0
        outcome = run_training(job, address=args.address)
    except (ConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if outcome.error is not None:
        print(f"error: training failed: {describe_failure(outcome.error)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
