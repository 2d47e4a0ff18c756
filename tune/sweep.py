"""Sweep the training job's learning rates, schedule, queries and sampling points with Ray Tune.

    python tune/sweep.py                                   # small sweep on the generated demo data
    python tune/sweep.py --set searcher.kind=optuna --set num_trials=12
    python tune/sweep.py --set 'space.model.num_queries={"choice": [100, 300]}' --set base.train.epochs=8
    python tune/sweep.py --config sweep.json --set storage_path=s3://bucket/sweeps
    ray job submit --working-dir . -- python tune/sweep.py --config sweep.json

Each trial is a full Ray Train run of pipelines/train.py's job; ASHA stops the clearly worse ones.
Running the same command again resumes an interrupted sweep (finished trials kept, interrupted
ones continue from their last checkpoint). ``--print-config`` shows every setting and its default.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # `python tune/sweep.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Ray Tune sweep over the training config. With no arguments: a small demo sweep.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: --set key=value (JSON values); keys: base_preset, base_config, base.<section>.<field>, "
        "space.<section>.<field>, searcher.kind|seed, scheduler.kind|grace_period|reduction_factor, metric, "
        "num_trials, max_concurrent_trials, storage_path, name.",
    )
    p.add_argument("--config", help="sweep config file (JSON or TOML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--print-config", action="store_true", help="print the validated sweep config and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from pipelines.job_config import ConfigError
    from pipelines.raytrain.preflight import PreflightError
    from tune.sweep_config import load_sweep_config

    try:
        cfg, job, space = load_sweep_config(args.config, args.overrides)
        if args.print_config:
            print(cfg.model_dump_json(indent=2))
            return 0
        from tune.results import format_table
        from tune.tuner import run_sweep

        outcome = run_sweep(cfg, job, space, address=args.address)
    except (ConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print("\n" + format_table(outcome.rows, list(space.domains)), flush=True)
    if outcome.best is not None:
        b = outcome.best
        print(
            f"\nbest trial {b.trial_id}: {cfg.metric} {b.best[cfg.metric]:.4f} after {b.best['epochs_done']} epochs\n"
            f"  checkpoint: {b.best.get('checkpoint_path')}",
            flush=True,
        )
    print(f"sweep directory: {outcome.sweep_uri} ({', '.join(os.path.basename(f) for f in outcome.files)})")
    errors = [s for s in outcome.summaries if s.status == "error"]
    if errors:
        print(f"{len(errors)} trial(s) failed: " + "; ".join(f"{s.trial_id}: {s.error}" for s in errors), flush=True)
    return 1 if outcome.best is None else 0


if __name__ == "__main__":
    sys.exit(main())
