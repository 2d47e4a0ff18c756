"""Batch inference on Ray Data: list the images, skip those with a row, decode in CPU tasks, detect on an actor pool.

The driver receives the (small) result rows as they stream out and writes each part as soon as all of
its images have a row, so a killed job loses at most the parts in flight, and its rerun starts where
the output stops. See ``outputs`` for the folder's layout and guarantees.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import ray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.checkpoint import Checkpoint
from core.predictor import InputSize, checkpoint_class_info, checkpoint_input_size, export_input_size
from pipelines.inference.outputs import COCO_FILE, MANIFEST_FILE, OutputDir, OutputError, part_name
from pipelines.inference.sources import ImageList, list_images
from pipelines.inference.steps import DecodeImages, PredictImages
from pipelines.raytrain.cluster import connect_ray, ray_data_lines_to_its_log
from pipelines.storage import absolute

log = logging.getLogger(__name__)

DECODE_MEMORY_BASE = 512 * 1024**2  # a worker process with numpy, torch and pyarrow loaded
DECODE_MEMORY_PER_IMAGE = 48 * 1024**2


class InferenceConfig(BaseModel):
    """Everything a batch-inference job needs; the command line's options, validated once."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(
        None,
        description="checkpoint file, checkpoint folder, or run directory (its best checkpoint, else its latest): "
        "local, http(s), s3://, gs:// (engine torch)",
    )
    engine: Literal["torch", "onnxruntime"] = Field("torch", description="what runs the model in the actors")
    model: str | None = Field(
        None, description="ONNX file of pipelines/export.py (engine onnxruntime), local or remote"
    )
    input: str = Field(description="image folder, bucket prefix, or a .txt/.parquet manifest of image URIs")
    output: str = Field(description="output folder or bucket prefix")
    score_threshold: float = Field(0.05, ge=0.0, lt=1.0)
    top_k: int = Field(100, ge=1, description="most detections kept per image")
    image_size: int | None = Field(None, ge=1, description="short side; None: the checkpoint's (800 for the paper)")
    max_size: int | None = Field(
        None, ge=1, description="long side cap; None: the checkpoint's, scaled with image_size"
    )
    batch_size: int = Field(8, ge=1, description="images per model call")
    actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0.0, ge=0.0)
    cpus_per_actor: float = Field(1.0, gt=0.0)
    torch_threads: int | None = Field(None, ge=1, description="CPU actors' intra-op threads; None: the node's share")
    bf16: bool = False
    pad_mixed_sizes: bool = Field(False, description="batch images of different sizes together, padded (faster)")
    glob: str | None = None
    exif_transpose: bool = Field(
        True, description="turn photos by their EXIF orientation (boxes in the frame viewers show); False: as stored"
    )
    coco_json: bool = False
    coco_ann: str | None = Field(None, description="COCO instances JSON mapping file names to image ids")
    draw: int = Field(0, ge=0, description="draw the boxes on the first N images")
    draw_threshold: float = Field(0.5, ge=0.0, le=1.0)
    images_per_part: int = Field(1000, ge=1, description="images per output Parquet file (the unit of resumption)")
    decode_batch: int = Field(16, ge=1, description="images per decode task")
    decode_cpus: float = Field(1.0, gt=0.0, description="CPUs reserved by one decode task")
    read_threads: int = Field(16, ge=1)
    progress_every_s: float = Field(10.0, gt=0.0)
    address: str | None = None

    @model_validator(mode="after")
    def _check(self) -> InferenceConfig:
        if self.gpus_per_actor > 1 and self.gpus_per_actor != int(self.gpus_per_actor):
            raise ValueError(f"gpus_per_actor above 1 must be whole, got {self.gpus_per_actor}")
        if self.coco_ann and not self.coco_json:
            raise ValueError("coco_ann is only used with coco_json")
        if self.engine == "torch" and (self.checkpoint is None or self.model is not None):
            raise ValueError("--engine torch runs a --checkpoint (--model is the ONNX file of --engine onnxruntime)")
        if self.engine == "onnxruntime":
            if self.model is None or self.checkpoint is not None:
                raise ValueError("--engine onnxruntime runs an exported ONNX file: give --model, not --checkpoint")
            if self.bf16 or self.gpus_per_actor:
                raise ValueError(
                    "--engine onnxruntime runs the export's dtype on the CPU: no --bf16, --gpus-per-actor 0"
                )
        return self

    @property
    def model_source(self) -> str:
        """The checkpoint or ONNX file, without a presigned URL's query."""
        return (self.checkpoint if self.engine == "torch" else self.model).partition("?")[0]

    def settings(self) -> dict[str, Any]:
        """What the rows depend on; a rerun into the same output must agree (see OutputDir.check_job)."""
        engine = {} if self.engine == "torch" else {"engine": self.engine}  # outputs made before engines agree
        return {
            **engine,
            "checkpoint": self.model_source,
            "score_threshold": self.score_threshold,
            "top_k": self.top_k,
            "image_size": self.image_size,
            "max_size": self.max_size,
            "bf16": self.bf16,
            "pad_mixed_sizes": self.pad_mixed_sizes,
            "exif_transpose": self.exif_transpose,
        }


def load_onnx_for_inference(uri: str) -> tuple[bytes, InputSize]:
    """The ONNX file's bytes, read on the driver and checked to be an export a Predictor runs, and the
    input size it carries."""
    from core.checkpoint import download
    from core.export import ExportError, OnnxDetector
    from pipelines.storage import fetch_file

    tmp = tempfile.mkdtemp(prefix="ddetr-infer-onnx-")
    try:
        local = fetch_file(uri, tmp)
        if local.startswith(("http://", "https://")):  # fetch_file leaves a URL to its reader
            local = download(local)
        with open(local, "rb") as f:
            data = f.read()
        input_size = export_input_size(OnnxDetector(data).meta)
    except (OSError, ExportError) as e:  # urllib's HTTPError and URLError are OSErrors
        raise ValueError(f"--model {uri.partition('?')[0]!r} cannot be loaded: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data, input_size


def job_input_size(cfg: InferenceConfig, checkpoint_size: InputSize) -> InputSize:
    """The resize of the job: the checkpoint's, with --image-size and --max-size. An explicit short side
    scales the long-side cap with it, keeping the checkpoint's ratio (1333/800), unless --max-size is given."""
    max_size = cfg.max_size
    if cfg.image_size is not None and max_size is None:
        max_size = round(checkpoint_size.max_size * cfg.image_size / checkpoint_size.short_side)
    return checkpoint_size.overridden(cfg.image_size, max_size)


class Progress:
    """Counts rows as they arrive; prints a line every ``every_s`` seconds and builds the summary."""

    def __init__(self, total: int, done_before: int, every_s: float) -> None:
        self.total, self.done_before, self.every_s = total, done_before, every_s
        self.start = self.last = time.monotonic()
        self.first: float | None = None  # when the first rows arrived, and how many
        self.first_rows = 0
        self.images = self.detections = self.parts = 0
        self.errors: Counter[str] = Counter()

    def add(self, table: pa.Table) -> None:
        if self.first is None:
            self.first, self.first_rows = time.monotonic(), table.num_rows
        self.images += table.num_rows
        self.detections += sum(len(s) for s in table.column("scores").to_pylist())
        self.errors.update(k for k in table.column("error_kind").to_pylist() if k is not None)
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(f"infer: {self.line()}", flush=True)

    def line(self) -> str:
        rate = self.images / max(time.monotonic() - self.start, 1e-9)
        done = self.done_before + self.images
        return (
            f"{done}/{self.total} images ({self.images} this run, {rate:.2f} images/s), "
            f"{self.detections} detections, {sum(self.errors.values())} failed, {self.parts} parts written"
        )

    def summary(self, output: str) -> dict[str, Any]:
        now = time.monotonic()
        wall = now - self.start
        # After the first rows: the rate once the pipeline is full (actors built, decoding ahead), which
        # is what a long job runs at; the start-up before it is a fixed cost.
        steady = (self.images - self.first_rows) / (now - self.first) if self.first and now > self.first else 0.0
        return {
            "output": output,
            "images_total": self.total,
            "images_done_before": self.done_before,
            "images_this_run": self.images,
            "images_done": self.done_before + self.images,
            "detections_this_run": self.detections,
            "failed_this_run": dict(sorted(self.errors.items())),
            "parts_written": self.parts,
            "wall_s": round(wall, 3),
            "images_per_s": round(self.images / wall, 3) if self.images else 0.0,
            "first_rows_s": round(self.first - self.start, 3) if self.first else None,
            "steady_images_per_s": round(steady, 3),
        }


def run_inference(cfg: InferenceConfig, images: ImageList | None = None) -> dict[str, Any]:
    """Runs the job; returns the summary. Joins or starts Ray (``connect_ray``) only when there is work.

    Args:
        cfg: the validated options.
        images: the listed input (listed from ``cfg.input`` when None).

    Raises:
        InputError, OutputError, ValueError: bad input, output or checkpoint, named in the message,
            before anything is written.
    """
    images = images or list_images(cfg.input, cfg.glob)
    if cfg.engine == "torch":
        from pipelines.raytrain.preflight import open_checkpoint_arg

        # A run directory is replaced by its checkpoint: the output records the checkpoint its rows came from.
        checkpoint, model = open_checkpoint_arg(cfg.checkpoint, "infer")
        cfg = cfg.model_copy(update={"checkpoint": checkpoint})
        input_size = checkpoint_input_size(model)
        checkpoint_class_info(model)  # metadata errors surface here, on the driver, not in every actor
        what = f"checkpoint {model.source_format}"
    else:
        model, input_size = load_onnx_for_inference(cfg.model)
        what = "onnxruntime"
    by_name = None
    if cfg.coco_ann:  # read before the job: a bad file is refused before any work
        from pipelines.inference.extras import image_ids_from_annotations

        by_name = image_ids_from_annotations(cfg.coco_ann)
    out = OutputDir(cfg.output)
    # An output folder inside the input folder: its parts and records are the job's, not its images.
    inside = absolute(out.base).rstrip("/") + "/"
    images = dataclasses.replace(images, uris=[u for u in images.uris if not u.startswith(inside)])
    try:
        out.prepare()
        out.check_job(cfg.settings())
        done = out.done_uris()
    except OSError as e:  # an unreachable endpoint, missing credentials, a folder not ours to write
        raise OutputError(f"--output {out.base!r} cannot be read or written: {e}") from e
    todo = [u for u in images.uris if u not in done]
    progress = Progress(len(images.uris), len(images.uris) - len(todo), cfg.progress_every_s)
    print(
        f"infer: {len(images.uris)} images in {cfg.input.partition('?')[0]}, {len(images.uris) - len(todo)} "
        f"with a row already, {len(todo)} to do; {cfg.actors} actor(s), {what}",
        flush=True,
    )
    if images.duplicates:
        print(f"infer: {images.duplicates} manifest lines repeat an image listed before; each image gets one row")
    if todo:
        started = connect_ray(address=cfg.address)
        try:
            _run_pipeline(cfg, model, input_size, images, todo, out, progress)
        finally:
            if started:
                ray.shutdown()
    write_manifest(out)
    if cfg.coco_json:
        from pipelines.inference.extras import write_coco_results

        write_coco_results(out, cfg.coco_ann, by_name)
    if cfg.draw:
        from pipelines.inference.extras import draw_images

        draw_images(out, cfg.draw, cfg.draw_threshold, images.storage_options)
    return progress.summary(out.base)


def _run_pipeline(
    cfg: InferenceConfig,
    model: Checkpoint | bytes,
    input_size: InputSize,
    images: ImageList,
    todo: list[str],
    out: OutputDir,
    progress: Progress,
) -> None:
    parts = {}
    expected: dict[str, int] = {}
    for start in range(0, len(todo), cfg.images_per_part):
        chunk = todo[start : start + cfg.images_per_part]
        name = part_name(chunk)
        expected[name] = len(chunk)
        parts.update(dict.fromkeys(chunk, name))
    input_size = job_input_size(cfg, input_size)
    import torch

    predictor_kwargs = {
        "score_threshold": cfg.score_threshold,
        "top_k": cfg.top_k,
        "batch_size": cfg.batch_size,
        "amp_dtype": torch.bfloat16 if cfg.bf16 else None,
        "pad_mixed_sizes": cfg.pad_mixed_sizes,
        "short_side": input_size.short_side,
        "max_size": input_size.max_size,
    }
    threads = cfg.torch_threads
    if threads is None:
        # A CPU actor takes its share of the cluster's cores for torch (decode tasks are brief next to the
        # model); a GPU actor needs only its reserved CPUs.
        share = int(ray.cluster_resources().get("CPU", 1) // cfg.actors) if not cfg.gpus_per_actor else 0
        threads = max(1, int(cfg.cpus_per_actor), share)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own progress lines
    ray_data_lines_to_its_log()
    # One input block per part: Arrow columns rather than a Python dict per image keep a driver listing
    # millions of images small, and parts come out roughly in order, so few are in flight at a kill.
    table = pa.table({"uri": todo, "part": [parts[u] for u in todo]})
    blocks = [table.slice(i, cfg.images_per_part) for i in range(0, len(todo), cfg.images_per_part)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        DecodeImages(input_size, images.storage_options, cfg.read_threads, cfg.exif_transpose),
        batch_size=cfg.decode_batch,
        batch_format="pyarrow",
        num_cpus=cfg.decode_cpus,
        # A decode task holds its images at full size before resizing (a 12-megapixel photo is 36 MB).
        # Reserving that memory also keeps Ray Data from fusing decoding into the model actors (it fuses
        # a task step into the next actor step when their resources agree), which would serialize
        # decoding and the model instead of overlapping them.
        memory=DECODE_MEMORY_BASE + cfg.decode_batch * DECODE_MEMORY_PER_IMAGE,
    )
    ds = ds.map_batches(
        PredictImages,
        fn_constructor_kwargs={
            "model": ray.put(model),  # put once: every actor reads the same copy
            "predictor_kwargs": predictor_kwargs,
            "torch_threads": None if cfg.gpus_per_actor else threads,
        },
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )
    pending: dict[str, list[pa.Table]] = defaultdict(list)
    counts: Counter[str] = Counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        progress.add(batch)
        for name in set(batch.column("part").to_pylist()):
            rows = batch.filter(pc.equal(batch.column("part"), name))
            pending[name].append(rows)
            counts[name] += rows.num_rows
            if counts[name] == expected[name]:
                table = pa.concat_tables(pending.pop(name))
                if part_name(table.column("uri").to_pylist()) != name:  # a bug; never written under a wrong name
                    raise RuntimeError(f"part {name} received rows of other images")
                out.write_part(table)
                progress.parts += 1
    missing = {n: expected[n] - counts[n] for n in expected if counts[n] != expected[n]}
    if missing:
        raise RuntimeError(f"the pipeline returned too few rows for parts {missing}; rerun to finish them")


def write_manifest(out: OutputDir) -> dict[str, Any]:
    """The manifest of every part present (rows, detections, failures by kind); rewritten only if it changed."""
    old = out.read(MANIFEST_FILE)
    # A job never rewrites a part, so the previous manifest's entries of parts of the same size stand; new
    # parts are read, and so is one written again under its name (deleted by hand to redo its images).
    known = {p["file"]: p for p in json.loads(old)["parts"]} if old else {}
    parts, errors = [], Counter()
    for name, size in out.part_sizes().items():
        entry = known.get(name)
        if entry is None or entry.get("bytes") != size:
            t = out.read_part(name, ["uri", "scores", "error_kind"])
            kinds = Counter(k for k in t.column("error_kind").to_pylist() if k is not None)
            detections = sum(len(s) for s in t.column("scores").to_pylist())
            failed = dict(sorted(kinds.items()))
            entry = {"file": name, "bytes": size, "rows": t.num_rows, "detections": detections, "failed": failed}
        errors.update(entry["failed"])
        parts.append(entry)
    manifest = {
        "format": "ray-deformable-detr/inference-v1",
        "images": sum(p["rows"] for p in parts),
        "detections": sum(p["detections"] for p in parts),
        "failed": dict(sorted(errors.items())),
        "parts": parts,
    }
    out.write_json(MANIFEST_FILE, manifest)
    return manifest


__all__ = ["COCO_FILE", "InferenceConfig", "run_inference", "write_manifest"]
