"""Benchmark: a sweep over lr and schedule against the default config trained for the same epochs.

    python bench/sweep.py                                  # demo data, 4 trials of 4 epochs
    python bench/sweep.py --set num_trials=8 --set base.train.epochs=8

Prints, from one process on one Ray instance: the default run's best AP and the sweep's best trial's,
and the sweep's wall time against the plain run's, also per epoch trained (the cost of Tune itself:
trial start-up, per-trial data preparation, the driver's bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# lr and schedule only (the benchmark); the drop epoch and warmup ranges fit 4 epochs.
BENCH_SPACE = {
    "train": {
        "lr": {"loguniform": [1e-4, 2e-3]},
        "lr_schedule": {"choice": ["step", "cosine", "warmup_cosine"]},
        "lr_drop": {"int": [2, 3]},
        "warmup_epochs": {"uniform": [0.2, 1.0]},
    }
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    import ray

    from pipelines.raytrain.cluster import connect_ray
    from pipelines.raytrain.run_dir import read_metrics
    from pipelines.raytrain.training import run_training
    from tune.sweep_config import load_sweep_config
    from tune.tuner import run_sweep

    # Fresh names: the same names again would resume the finished run and sweep, timing nothing.
    stamp = time.strftime("%Y%m%d-%H%M%S")
    overrides = [f"space={json.dumps(BENCH_SPACE)}", "num_trials=4", f"name=bench-sweep-{stamp}", *args.overrides]
    cfg, job, space = load_sweep_config(overrides=overrides)
    connect_ray(job)

    t0 = time.perf_counter()
    default = job.model_copy(update={"train": job.train.model_copy(update={"name": f"bench-default-{stamp}"})})
    outcome = run_training(default)
    plain_s = time.perf_counter() - t0
    evals = [r for r in read_metrics(os.path.join(outcome.run_dir.path, "metrics.jsonl")) if r["kind"] == "eval"]
    default_ap = max((r[cfg.metric] for r in evals), default=float("nan"))

    t0 = time.perf_counter()
    sweep = run_sweep(cfg, job, space)
    sweep_s = time.perf_counter() - t0
    ray.shutdown()

    epochs = job.train.epochs
    trained = sum(s.epochs_run for s in sweep.summaries)
    best_ap = sweep.best.best[cfg.metric] if sweep.best is not None else float("nan")
    per_epoch_plain = plain_s / epochs
    # Trial-epochs run side by side when the cluster holds several trials: compare one trial's time per epoch.
    per_epoch_sweep = sweep_s * sweep.concurrency / max(trained, 1)
    print(f"\nbenchmark: {len(sweep.summaries)} trials x {epochs} epochs ({trained} epochs trained), base {job.preset}")
    print(
        f"  best {cfg.metric}: default {default_ap:.4f}, sweep's best trial {best_ap:.4f} ({best_ap - default_ap:+.4f})"
    )
    print(f"  wall time: plain run {plain_s:.0f} s, sweep {sweep_s:.0f} s ({sweep_s / plain_s:.2f}x)")
    print(
        f"  per epoch trained: plain {per_epoch_plain:.1f} s, sweep {per_epoch_sweep:.1f} s "
        f"({per_epoch_sweep / per_epoch_plain:.2f}x, {sweep.concurrency} trial(s) at a time)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
