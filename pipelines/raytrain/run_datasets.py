"""The Ray Datasets of a run, prepared on the driver once, and how Ray Train splits them over the workers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ray
import ray.train

from pipelines.data.categories import CategoryMap
from pipelines.data.coco import BadInputError
from pipelines.data.datasets import DatasetInfo, EpochClock, build_dataset
from pipelines.engine import steps_per_epoch
from pipelines.job_config import JobConfig
from pipelines.raytrain.cluster import on_driver_node
from pipelines.raytrain.preflight import PreflightError
from pipelines.raytrain.worker_config import DatasetFacts


@dataclasses.dataclass
class PreparedData:
    """The Ray Datasets of a run and the small facts about them that the workers need."""

    datasets: dict[str, ray.data.Dataset]
    facts: DatasetFacts  # categories, label map, sizes: goes to the workers in WorkerConfig
    steps_per_epoch: int  # 0 without a train split; at train.max_workers (the workers count their own)
    start_epoch: int
    infos: dict[str, DatasetInfo] = dataclasses.field(default_factory=dict)  # split -> info, for data_report
    epoch_clock: Any = None  # EpochClock handle: the workers set the train dataset's epoch
    train_rows: int = 0  # rows of the train dataset per epoch (after a max_steps_per_epoch limit)


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


def dataset_facts(categories: CategoryMap, num_classes: int, num_train: int, num_val: int) -> DatasetFacts:
    """What the workers need to know of the dataset, for a head of ``num_classes`` classes."""
    label_map = None
    if categories.mode == "contiguous":
        label_map = list(categories.label_to_category_id())
        label_map += [-1] * (num_classes - len(label_map))
    return DatasetFacts(
        mode=categories.mode,
        num_classes=categories.num_classes,
        category_ids=list(categories.category_ids),
        category_names={int(i): n for i, n in zip(categories.category_ids, categories.names)},
        label_to_category_id=label_map,
        num_train=num_train,
        num_val=num_val,
    )


def prepare_data(job: JobConfig, *, splits: Sequence[str] | None = None, start_epoch: int = 0) -> PreparedData:
    """Parses the annotations on the driver and builds the Ray Datasets of ``splits``.

    Args:
        job: the resolved config.
        splits: default "train", plus "val" when the run evaluates; evaluation alone passes ("val",).
        start_epoch: the first epoch this run trains (a resumed run's).

    Raises:
        PreflightError: unreadable or bad annotations, a class count the model cannot hold, or a
            train split too small for one step per worker.
    """
    if splits is None:
        splits = ("train", "val") if job.train.eval_every else ("train",)
    ctx = ray.data.DataContext.get_current()
    # The run prints its own progress; Ray Data's bars and execution plans would bury it.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    datasets: dict[str, ray.data.Dataset] = {}
    infos: dict[str, DatasetInfo] = {}
    epoch_clock = None
    try:
        for split in splits:
            if split == "train":
                # Draw each epoch's augmentation for the epoch the loop is in, also after a worker-group restart.
                epoch_clock = EpochClock.options(**on_driver_node()).remote(start_epoch)
                datasets[split], infos[split] = build_dataset(
                    job.data, split, start_epoch=start_epoch, epoch_clock=epoch_clock
                )
            else:
                datasets[split], infos[split] = build_dataset(job.data, split)
    except (BadInputError, OSError, ValueError) as e:
        raise PreflightError(f"cannot read the dataset: {e}") from e
    categories = next(iter(infos.values())).categories
    if job.model.num_classes < categories.num_classes:
        fix = (
            f"set --set model.num_classes={categories.num_classes}"
            if "train" in splits
            else "a checkpoint's head is as trained: evaluate it on a split of its own categories"
        )
        raise PreflightError(
            f"model.num_classes={job.model.num_classes} but the dataset needs {categories.num_classes} "
            f"(data.category_ids={job.data.category_ids!r}, {len(categories.category_ids)} categories): "
            f"{fix}, or for the authors' COCO checkpoints keep data.category_ids=raw"
        )
    steps, rows = 0, 0
    if "train" in datasets:
        t, bs = job.train, job.data.batch_size_per_worker
        rows = infos["train"].num_images
        # At max_workers: an elastic run shrunk to fewer workers takes more steps over the same rows.
        steps = steps_per_epoch(rows, t.max_workers, bs, t.grad_accum_steps)
        if steps < 1:
            raise PreflightError(
                f"the train split has {rows} images, fewer than train.num_workers x "
                f"data.batch_size_per_worker = {t.max_workers} x {bs}"
            )
        if t.max_steps_per_epoch is not None and steps > t.max_steps_per_epoch:
            steps = t.max_steps_per_epoch
            # Limit the dataset itself so every epoch's iterator ends on its own.
            rows = steps * t.grad_accum_steps * bs * t.max_workers
            datasets["train"] = datasets["train"].limit(rows)
    sizes = {s: (infos[s].num_images if s in infos else 0) for s in ("train", "val")}
    facts = dataset_facts(categories, job.model.num_classes, sizes["train"], sizes["val"])
    return PreparedData(datasets, facts, steps, start_epoch, infos, epoch_clock, train_rows=rows)
