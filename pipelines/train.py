"""Train Deformable DETR on Ray Train: config, pre-flight checks, datasets, TorchTrainer, progress, outputs.

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
import dataclasses
import json
import logging
import math
import threading
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from core.coco_eval import AP_KEYS, format_ap_table
from pipelines.config import (
    PRESETS,
    ConfigError,
    JobConfig,
    load_job_config,
    parse_override,
    read_config_file,
    validate_job_config,
)
from pipelines.engine import steps_per_epoch
from pipelines.preflight import (
    PreflightError,
    check_resources,
    latest_checkpoint_epoch,
    load_finetune_weights,
    preflight,
)
from pipelines.run_outputs import (
    AP_TABLE_FILE,
    CONFIG_FILE,
    DATA_REPORT_FILE,
    MetricsSink,
    RunDir,
    data_report,
    format_data_report,
    format_progress,
    is_remote,
    join_uri,
    split_run_uri,
    storage_filesystem,
    write_final_outputs,
)
from pipelines.train_worker import SCORE_KEY, train_loop_per_worker

log = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ray Train routes print() to its logger even inside contextlib.redirect_stdout, which would undo
# core's silencing of pycocotools on every evaluation.
WORKER_RUNTIME_ENV = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
# What `ray job submit --working-dir .` and a joined cluster need not receive.
WORKING_DIR_EXCLUDES = [".venv/", ".git/", "runs/", "data/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/"]


# --------------------------------------------------------------------------------------------- Ray


def in_ray_job() -> bool:
    """True inside a driver started by ``ray job submit`` (the job supervisor sets this variable)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def connect_ray(job: JobConfig, address: str | None = None) -> bool:
    """Joins a cluster (``address``, e.g. "auto" or "host:6379", or RAY_ADDRESS, which ``ray job submit``
    sets) or starts a local one.

    Returns:
        True when this call started a local Ray instance.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A submitted job already ships the working dir; a plain driver ships the repository itself.
        runtime_env = None if in_ray_job() else {"working_dir": REPO_ROOT, "excludes": WORKING_DIR_EXCLUDES}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return False
    t = job.train
    # Logical CPUs: the workers' plus some for Ray Data's decode tasks, which would otherwise find
    # none free on a small machine and stall the input pipeline.
    data_cpus = max(2, job.data.num_decode_workers or 2)
    num_cpus = max(os.cpu_count() or 1, math.ceil(t.max_workers * t.cpus_per_worker) + data_cpus)
    pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    # address="local": a new instance even when another `ray start` cluster runs on this machine.
    ray.init(
        address="local", num_cpus=num_cpus, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, log_to_driver=True
    )
    return True


# ------------------------------------------------------------------------------------------ datasets


@dataclasses.dataclass
class PreparedData:
    """The Ray Datasets of a run and the small facts about them that the workers need."""

    datasets: dict[str, ray.data.Dataset]
    dataset_info: dict[str, Any]  # categories, label map, sizes: goes through train_loop_config
    steps_per_epoch: int  # at train.max_workers; the workers count their own from the live world size
    train_rows: int  # rows of the train dataset per epoch (after a max_steps_per_epoch limit)
    start_epoch: int
    infos: dict[str, Any] = dataclasses.field(default_factory=dict)  # split -> DatasetInfo, for data_report
    epoch_clock: Any = None  # EpochClock handle: the workers set the train dataset's epoch


class DetectionDataConfig(ray.train.DataConfig):
    """Splits "train" equally (DDP needs every worker to take the same number of steps) and "val"
    unequally, so that evaluation drops no image."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        split_equal = {k: v for k, v in datasets.items() if k != "val"}
        output = super().configure(split_equal, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            ds = datasets["val"]
            if ds.name is None:
                ds.set_name("val")
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options("val")
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i]["val"] = split
        return output


def dataset_info(categories, num_classes: int, num_train: int, num_val: int) -> dict[str, Any]:
    """What the workers need to know of the dataset (small; sent in train_loop_config).

    The label map turns head labels into category ids for pycocotools; raw ids need none. A head with
    more classes than the data (e.g. 91 on a 20-class set) maps the extra ones to -1, never scored.
    """
    label_map = None
    if categories.mode == "contiguous":
        label_map = list(categories.label_to_category_id())
        label_map += [-1] * (num_classes - len(label_map))
    return {
        "mode": categories.mode,
        "num_classes": categories.num_classes,
        "category_ids": list(categories.category_ids),
        "category_names": {int(i): n for i, n in zip(categories.category_ids, categories.names)},
        "label_to_category_id": label_map,
        "num_train": num_train,
        "num_val": num_val,
    }


def prepare_data(job: JobConfig, start_epoch: int = 0) -> PreparedData:
    """Parses the annotations on the driver and builds the train (and val) Ray Datasets.

    Raises:
        PreflightError: unreadable or bad annotations, a class count the model cannot hold, or a
            train split too small for one step per worker.
    """
    from pipelines.coco import BadInputError
    from pipelines.data import EpochClock, build_dataset

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        # Draw each epoch's augmentation for the epoch the loop is in, also after a worker-group restart.
        epoch_clock = EpochClock.remote(start_epoch)
        train_ds, train_info = build_dataset(job.data, "train", start_epoch=start_epoch, epoch_clock=epoch_clock)
        datasets, infos = {"train": train_ds}, {"train": train_info}
        num_val = 0
        if job.train.eval_every:
            datasets["val"], infos["val"] = build_dataset(job.data, "val")
            num_val = infos["val"].num_images
    except (BadInputError, OSError, ValueError) as e:
        raise PreflightError(f"cannot read the dataset: {e}") from e
    categories = train_info.categories
    if job.model.num_classes < categories.num_classes:
        raise PreflightError(
            f"model.num_classes={job.model.num_classes} but the dataset needs {categories.num_classes} "
            f"(data.category_ids={job.data.category_ids!r}, {len(categories.category_ids)} categories): "
            f"set --set model.num_classes={categories.num_classes}"
        )
    t, bs = job.train, job.data.batch_size_per_worker
    rows = train_info.num_images
    steps = steps_per_epoch(rows, t.max_workers, bs, t.grad_accum_steps)
    if steps < 1:
        raise PreflightError(
            f"the train split has {train_info.num_images} images, fewer than train.num_workers x "
            f"data.batch_size_per_worker = {t.max_workers} x {bs}"
        )
    if t.max_steps_per_epoch is not None and steps > t.max_steps_per_epoch:
        steps = t.max_steps_per_epoch
        # Limit the dataset itself so every epoch's iterator ends on its own (an elastic run on fewer
        # workers than max then takes more steps over the same rows).
        rows = steps * t.grad_accum_steps * bs * t.max_workers
        datasets["train"] = datasets["train"].limit(rows)
    info = dataset_info(categories, job.model.num_classes, train_info.num_images, num_val)
    return PreparedData(datasets, info, steps, rows, start_epoch, infos, epoch_clock)


# ------------------------------------------------------------------------------------------- trainer


def build_trainer(
    job: JobConfig,
    data: PreparedData,
    *,
    sink=None,
    callbacks: list | None = None,
    name: str | None = None,
    finetune_weights: ray.ObjectRef | None = None,
) -> TorchTrainer:
    """The TorchTrainer of a run; tune/ builds its per-trial trainers with this too.

    Args:
        job: the resolved config (preflight()).
        data: from prepare_data.
        sink: MetricsSink actor for per-step records and progress, or None.
        callbacks: Ray Train UserCallbacks (Tune's TuneReportCallback).
        name: run name; default job.train.name.
        finetune_weights: ObjectRef of a state_dict to start from (load_finetune_weights), or None.
    """
    from pipelines.data import ingest_options

    t = job.train
    resources = {"CPU": t.cpus_per_worker, **t.worker_resources}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    storage_fs = None
    storage_path = t.storage_path
    if is_remote(storage_path):
        storage_fs, storage_path = storage_filesystem(storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            "dataset_info": data.dataset_info,
            "train_rows": data.train_rows,
            "sink": sink,
            "epoch_clock": data.epoch_clock,
            "finetune_weights": finetune_weights,
        },
        scaling_config=ray.train.ScalingConfig(
            # A (min, max) tuple makes the run elastic: restarts take the workers the cluster holds.
            num_workers=(t.min_workers, t.max_workers) if t.elastic else t.max_workers,
            use_gpu=t.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=t.elastic_resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=name or t.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            # Spot reclamations restart the group without using up max_failures, kept for real errors.
            failure_config=ray.train.FailureConfig(
                max_failures=t.max_failures, max_preemption_failures=t.max_preemption_failures
            ),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                checkpoint_score_attribute=SCORE_KEY,
                checkpoint_score_order="max",  # SCORE_KEY is AP, or -loss without evaluation
            ),
            callbacks=callbacks or None,
            worker_runtime_env=WORKER_RUNTIME_ENV,
            logging_config=ray.train.LoggingConfig(log_level=t.ray_log_level),
        ),
        datasets=data.datasets,
        dataset_config=DetectionDataConfig(datasets_to_split=["train"], execution_options=ingest_options()),
    )


# ------------------------------------------------------------------------------------------- driver


class _Pump:
    """Drains the MetricsSink every second on a thread: metrics.jsonl and the progress lines."""

    def __init__(self, sink, run_dir: RunDir, out=sys.stdout) -> None:
        self.sink, self.run_dir, self.out = sink, run_dir, out
        self.stop = threading.Event()
        self.last_eval: dict[str, Any] | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True, name="metrics-pump")

    def __enter__(self) -> _Pump:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.drain()

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.drain()
            except Exception as e:  # never let logging kill the run
                log.warning("metrics pump: %s", e)

    def drain(self) -> None:
        records = ray.get(self.sink.drain.remote())
        self.run_dir.append_metrics([r for r in records if r.get("kind") != "progress"])
        if any(r.get("kind") == "epoch" for r in records):
            self.run_dir.sync()  # a bucket run's metrics reach the bucket every epoch, not only at the end
        for r in records:
            line = self.format(r)
            if line:
                print(line, file=self.out, flush=True)

    def format(self, r: dict[str, Any]) -> str | None:
        kind = r.get("kind")
        if kind == "progress":
            return format_progress(r)
        if kind == "epoch":
            return (
                f"epoch {r['epoch'] + 1} done: loss {r['loss']:.4f}  {r['images_per_s']:.1f} img/s  "
                f"{r['epoch_time_s']:.0f} s  peak mem {r['max_mem_mb']:.0f} MiB"
            )
        if kind == "eval":
            self.last_eval = r
            return (
                f"eval after epoch {r['epoch'] + 1} ({r['num_eval_images']} images, {r['eval_time_s']:.0f} s):\n"
                + format_ap_table(r)
            )
        if kind == "event":
            if r["event"] == "resume":
                return f"resuming from the checkpoint of epoch {r['epoch']} (global step {r['global_step']})"
            return f"training on {r['world_size']} workers ({r['device']})"
        return None


def _workers_text(t) -> str:
    return f"{t.min_workers}-{t.max_workers}" if t.elastic else str(t.max_workers)


def write_data_report(data: PreparedData, run_dir: RunDir) -> dict[str, Any]:
    """Writes data_report.json (what was skipped so far) into the run directory; returns the report."""
    report = data_report(data.infos)
    run_dir.write_json(DATA_REPORT_FILE, report)
    return report


def describe_failure(error: BaseException) -> str:
    """The cause of a failed ``fit()``: the first failed worker's error, without Ray's wrapping and traceback."""
    failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError
    if failures:
        rank, cause = min(failures.items(), key=lambda kv: kv[0])
        where = f"worker {rank}" + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
    else:
        cause, where = getattr(error, "controller_failure", None) or error, None
    text = str(cause).strip()
    if "Traceback (most recent call last)" in text:  # a remote error (a Ray Data task's): "Type: message" last
        text = text.splitlines()[-1].strip()
    elif not text.startswith(type(cause).__name__):
        text = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
    return f"{where}: {text}" if where else text


@dataclasses.dataclass
class TrainOutcome:
    run_dir: RunDir
    result: ray.train.Result | None
    final_ap: dict[str, float] | None
    error: BaseException | None
    data_report: dict[str, Any] = dataclasses.field(default_factory=dict)


def run_training(job: JobConfig, *, address: str | None = None) -> TrainOutcome:
    """Pre-flight, datasets, fit, outputs. ``job`` is validated; nothing starts when a check fails.

    Raises:
        PreflightError: a check failed (before any worker started).
    """
    job = preflight(job)
    finetune_weights = load_finetune_weights(job)
    started_local = connect_ray(job, address)
    check_resources(job, ray.cluster_resources(), strict=started_local)
    last_epoch = latest_checkpoint_epoch(job)
    start_epoch = 0 if last_epoch is None else last_epoch + 1
    data = prepare_data(job, start_epoch=start_epoch)

    run_dir = RunDir(job.train.storage_path, job.train.name).mkdir()
    run_dir.write_json(CONFIG_FILE, job.model_dump(mode="json"))
    print(f"run {job.train.name}: {run_dir.uri}", flush=True)
    print(
        f"  {job.detr_config().variant()} {job.model.backbone}, {data.dataset_info['num_train']} train / "
        f"{data.dataset_info['num_val']} val images, {_workers_text(job.train)} workers x "
        f"{job.data.batch_size_per_worker} images (total batch {job.total_batch_size}), "
        f"{data.steps_per_epoch} steps/epoch, {job.train.epochs} epochs",
        flush=True,
    )
    # What the annotation and file checks skipped, before any pixel is read.
    print(format_data_report(write_data_report(data, run_dir), job.data.on_bad_input), flush=True)

    sink = MetricsSink.remote()
    # Through the object store: every worker gets the weights, on whatever node it runs.
    weights_ref = ray.put(finetune_weights) if finetune_weights is not None else None
    trainer = build_trainer(job, data, sink=sink, finetune_weights=weights_ref)
    result, error = None, None
    with _Pump(sink, run_dir) as pump:
        try:
            result = trainer.fit()
            error = result.error
        except Exception as e:  # TrainingFailedError and friends: still write what we have
            error = e
    final_ap = {k: pump.last_eval[k] for k in AP_KEYS} if pump.last_eval else None
    if final_ap is None:
        evals = [r for r in run_dir.read_metrics() if r.get("kind") == "eval"]
        final_ap = {k: evals[-1][k] for k in AP_KEYS} if evals else None
    if final_ap is not None:
        run_dir.write_text(AP_TABLE_FILE, format_ap_table(final_ap) + "\n")
    try:
        vis = ray.get(sink.vis.remote())
        written = write_final_outputs(run_dir, vis)
    except Exception as e:  # pictures are a nicety, never the reason a run fails
        log.warning("could not draw the run's pictures: %s", e)
        written = []
    report = write_data_report(data, run_dir)  # again, now with the images skipped while decoding
    run_dir.sync()
    ray.kill(sink)
    if final_ap is not None:
        print("\nfinal COCO AP (val):\n" + format_ap_table(final_ap), flush=True)
    print("\n" + format_data_report(report, job.data.on_bad_input), flush=True)
    if written:
        print(f"curves and images: {', '.join(os.path.relpath(p, run_dir.path) for p in written)}", flush=True)
    print(f"run directory: {run_dir.uri}", flush=True)
    return TrainOutcome(run_dir, result, final_ap, error, report)


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
    run = args.resume.rstrip("/")
    if is_remote(run):
        fs, path = storage_filesystem(join_uri(run, CONFIG_FILE))
        try:
            with fs.open_input_stream(path) as f:
                data = json.loads(f.read())
        except OSError as e:
            raise ConfigError(f"--resume {run}: cannot read {CONFIG_FILE}: {e}") from e
    else:
        if not os.path.isfile(os.path.join(run, CONFIG_FILE)):
            raise ConfigError(f"--resume {run}: no {CONFIG_FILE} there (is it a run directory?)")
        data = read_config_file(os.path.join(run, CONFIG_FILE))
    storage, name = split_run_uri(run)
    # config.json is a complete resolved config: no preset under it, only the overrides on top.
    data.setdefault("train", {}).update(storage_path=storage or ".", name=name)
    for item in args.overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return validate_job_config(data)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
