"""What the driver hands each Ray Train worker: a typed, validated ``WorkerConfig`` (small: no weights, no data)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipelines.job_config import JobConfig


class DatasetFacts(BaseModel):
    """The little the workers must know of the dataset; saved in each checkpoint's ``meta["dataset"]``.

    ``label_to_category_id`` turns head labels into category ids for pycocotools (None: raw ids, no
    mapping). A head with more classes than the data (91 on a 20-class set) maps the extra ones to -1,
    never scored.
    """

    model_config = ConfigDict(extra="forbid")

    mode: str = Field(description='"raw" or "contiguous" (data.category_ids)')
    num_classes: int = Field(ge=0, description="classes the data needs")
    category_ids: list[int]
    category_names: dict[int, str]
    label_to_category_id: list[int] | None = None
    num_train: int = Field(0, ge=0)
    num_val: int = Field(0, ge=0)


class WorkerConfig(BaseModel):
    """The one value in ``train_loop_config``, for the training and the evaluation loop alike.

    Attributes:
        job: the resolved run config.
        dataset: facts about the data (categories, label map, split sizes).
        steps_per_epoch: optimizer steps per epoch on each worker at train.max_workers (0 for evaluation).
        train_rows: rows of the train dataset per epoch; the workers count their steps per epoch from
            it and the live world size (an elastic run may run on fewer than max_workers).
        sink: the ``MetricsSink`` actor handle, or None (no per-step records).
        epoch_clock: the ``EpochClock`` actor the loop sets before each epoch, or None.
        weights: ObjectRef of a state_dict (fine-tuning start, or the model under evaluation), or None.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    job: JobConfig
    dataset: DatasetFacts
    steps_per_epoch: int = Field(0, ge=0)
    train_rows: int = Field(0, ge=0)
    sink: Any = None
    epoch_clock: Any = None
    weights: Any = None

    def to_loop_config(self) -> dict[str, Any]:
        """``train_loop_config`` for the TorchTrainer (the job as JSON: what a checkpoint stores too)."""
        return {"worker": self.model_dump(mode="python", exclude={"job"}) | {"job": self.job.model_dump(mode="json")}}

    @classmethod
    def from_loop_config(cls, config: dict[str, Any]) -> WorkerConfig:
        """Validates what ``to_loop_config`` produced (inside the worker)."""
        return cls.model_validate(config["worker"])
