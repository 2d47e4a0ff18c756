"""The one place a ``TorchTrainer`` is built: training, evaluation and Tune trials differ by the loop they run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipelines.config import JobConfig
from pipelines.data.datasets import ingest_options
from pipelines.raytrain.datasets import DetectionDataConfig, PreparedData
from pipelines.raytrain.worker import SCORE_KEY, train_loop_per_worker
from pipelines.raytrain.worker_config import WorkerConfig
from pipelines.storage import filesystem_for, is_remote

# Ray Train routes print() to its logger even inside contextlib.redirect_stdout, which would undo
# core's silencing of pycocotools on every evaluation.
WORKER_RUNTIME_ENV = {"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}


def build_trainer(
    job: JobConfig,
    data: PreparedData,
    *,
    loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
    sink: Any = None,
    weights: ray.ObjectRef | None = None,
    callbacks: Sequence[Any] = (),
    name: str | None = None,
    storage_path: str | None = None,
) -> TorchTrainer:
    """The TorchTrainer of a run, an evaluation or a Tune trial.

    Args:
        job: the resolved config (``preflight``).
        data: from ``prepare_data``.
        loop: the worker function: ``train_loop_per_worker`` or ``eval_loop_per_worker``.
        sink: ``MetricsSink`` actor for per-step records, progress and drawn images, or None.
        weights: ObjectRef of a state_dict: the fine-tuning start for training, the model under
            evaluation for evaluation; None for a fresh training run.
        callbacks: extra ``RunConfig`` callbacks, e.g. ``ray.tune.integration.ray_train.TuneReportCallback()``.
        name: the Ray Train run name (a folder under the storage path); default ``job.train.name``.
            The same storage path and name resume that run from its latest checkpoint.
        storage_path: where Ray Train keeps checkpoints and its run state; default ``job.train.storage_path``.
    """
    t = job.train
    resources = {"CPU": t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = t.gpus_per_worker
    storage_fs, storage = None, storage_path or t.storage_path
    if is_remote(storage):
        storage_fs, storage = filesystem_for(storage)
    worker = WorkerConfig(
        job=job,
        dataset=data.facts,
        steps_per_epoch=data.steps_per_epoch,
        sink=sink,
        epoch_clock=data.epoch_clock,
        weights=weights,
    )
    return TorchTrainer(
        loop,
        train_loop_config=worker.to_loop_config(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name or t.name,
            storage_path=storage,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=t.keep_checkpoints,
                checkpoint_score_attribute=SCORE_KEY,
                checkpoint_score_order="max",  # SCORE_KEY is AP, or -loss without evaluation
            ),
            callbacks=list(callbacks) or None,
            worker_runtime_env=WORKER_RUNTIME_ENV,
            logging_config=ray.train.LoggingConfig(log_level=t.ray_log_level),
        ),
        datasets=data.datasets,
        # Only "train" is split equally; DetectionDataConfig splits "val" without dropping images.
        dataset_config=DetectionDataConfig(
            datasets_to_split=[k for k in data.datasets if k == "train"], execution_options=ingest_options()
        ),
    )
