"""An evaluation on the driver: a checkpoint's COCO AP on a split, computed by Ray Train workers."""

from __future__ import annotations

import shutil
import tempfile
import time

import ray

from core.checkpoint import Checkpoint
from core.evaluation import AP_KEYS, format_ap_table
from pipelines.data.report import data_report, format_data_report
from pipelines.job_config import JobConfig
from pipelines.raytrain.cluster import cluster_autoscales, connect_ray, on_driver_node
from pipelines.raytrain.metrics import MetricsPump, MetricsSink
from pipelines.raytrain.preflight import (
    PreflightError,
    check_data,
    check_resources,
    check_writable,
    storage_root,
)
from pipelines.raytrain.run_datasets import prepare_data
from pipelines.raytrain.run_dir import AP_TABLE_FILE, DATA_REPORT_FILE, RunDir
from pipelines.raytrain.run_plots import draw_detections
from pipelines.raytrain.training import build_trainer
from pipelines.raytrain.worker_config import DatasetFacts
from pipelines.raytrain.worker_eval import eval_loop_per_worker
from pipelines.storage import absolute, split_uri


def trained_label_map(facts: DatasetFacts, ckpt: Checkpoint) -> DatasetFacts:
    """``facts`` of the val split with the label map that ``ckpt`` was trained with, where it has one
    (ours, data.category_ids=contiguous): a head's labels name the categories of its training set, and
    a val file that lists other categories (only those it uses, say) would shift every label's id."""
    saved = (ckpt.meta.get("dataset") or {}).get("label_to_category_id")
    if saved is None or facts.mode != "contiguous":
        return facts
    return facts.model_copy(update={"label_to_category_id": [int(c) for c in saved]})


def check_categories(facts: DatasetFacts, ckpt: Checkpoint) -> None:
    """Refuses a val split that shares no category id with the checkpoint's training set (every AP would
    be 0); prints which of the split's categories the checkpoint never saw. Authors' checkpoints (COCO's
    ids, no record of them) pass."""
    trained = (ckpt.meta.get("dataset") or {}).get("category_ids")
    if not trained:
        return
    unseen = sorted(set(facts.category_ids) - {int(c) for c in trained})
    if len(unseen) == len(facts.category_ids):
        raise PreflightError(
            f"the val split's categories {unseen[:10]} are none of the checkpoint's {sorted(trained)[:10]}: "
            "it would score AP 0; give the annotations of the categories it was trained on"
        )
    if unseen:
        names = ", ".join(f"{c} {facts.category_names.get(c, '?')}" for c in unseen[:10])
        print(
            f"warning: the checkpoint was not trained on {len(unseen)} of the split's categories ({names})", flush=True
        )


def resolve_out(out: str, timeout_s: float = 120.0) -> str:
    """Where ``--out`` goes, checked before any work: a bucket prefix as it is; a local folder made
    absolute (under ``ray job submit``, outside Ray's copy of the working directory, as a run's).

    Raises:
        PreflightError: the folder cannot be made or written, or the bucket does not answer or take a write.
    """
    uri = storage_root(out)
    check_writable(uri, f"--out {out!r}", timeout_s)
    return uri


def run_evaluation(
    job: JobConfig, ckpt: Checkpoint, *, out_dir: str | None = None, address: str | None = None
) -> dict[str, float]:
    """Evaluates ``ckpt`` on ``job.data``'s val split with ``job.train.num_workers`` Ray workers.

    Prints the data report (bad input skipped with data.on_bad_input=skip) at the end and writes
    it to ``out_dir``/data_report.json with the AP table.

    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl", "num_eval_images", "eval_time_s"}.

    Raises:
        PreflightError: the val split cannot be read, or the checkpoint's head is too small for it.
        ray.train.TrainingFailedError: a worker or Ray Train's controller failed.
    """
    job = job.model_copy(update={"data": job.data.model_copy(update={"root": absolute(job.data.root)})})
    check_data(job, splits=("val",))
    started_local = connect_ray(job, address)
    # As for a run: a worker group the cluster cannot place (--use-gpu on a machine without one) would wait forever.
    check_resources(job, ray.cluster_resources(), strict=started_local or not cluster_autoscales())
    data = prepare_data(job, splits=("val",))
    data.facts = trained_label_map(data.facts, ckpt)
    check_categories(data.facts, ckpt)
    sink = MetricsSink.options(**on_driver_node()).remote()
    # Ray Train's run state only: the outputs go to out_dir.
    storage = tempfile.mkdtemp(prefix="ddetr-eval-")
    report = None
    try:
        # Through the object store: workers on any node get the weights without shared storage.
        trainer = build_trainer(
            job,
            data,
            loop=eval_loop_per_worker,
            sink=sink,
            weights=ray.put(ckpt.model),
            name=f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage,
        )
        print(f"evaluating {data.facts.num_val} images on {job.train.num_workers} workers ...", flush=True)
        with MetricsPump(sink, None) as pump:  # progress lines while the workers infer
            result = trainer.fit()  # Train V2 raises TrainingFailedError itself
        if result.error is not None:
            raise result.error
        if pump.last_eval is None:
            raise RuntimeError("the evaluation workers finished without reporting an AP")
        stats = {k: v for k, v in pump.last_eval.items() if k not in ("kind", "time")}
        report = data_report(data.infos)  # with the images skipped while decoding
        if out_dir is not None:
            run = RunDir(*split_uri(out_dir)).mkdir()
            shutil.rmtree(run.file("val_images"), ignore_errors=True)  # an earlier evaluation's drawings
            run.write_text(AP_TABLE_FILE, format_ap_table(stats) + "\n")
            run.write_json("metrics.json", {k: stats[k] for k in (*AP_KEYS, "num_eval_images") if k in stats})
            run.write_json(DATA_REPORT_FILE, report)
            for i, item in enumerate(ray.get(sink.vis.remote())):
                draw_detections(item, run.file(f"val_images/{i:02d}_image{item['image_id']}.png"))
            run.sync()
    finally:
        # Printed after a failure too: skipped input may explain it.
        print(format_data_report(report or data_report(data.infos), job.data.on_bad_input), flush=True)
        ray.kill(sink)
        shutil.rmtree(storage, ignore_errors=True)
    return stats
