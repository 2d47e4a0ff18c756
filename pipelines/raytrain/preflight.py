"""Checks on the driver before any Ray Train worker starts: names, paths, data, storage, checkpoints, resources.

Every failure is a ``PreflightError`` whose message names the config field and the value at fault,
so a bad path or an unreachable bucket costs seconds, not a cluster start-up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow.fs as pafs

from core.checkpoint import Checkpoint, read_checkpoint
from pipelines.job_config import ConfigError, JobConfig
from pipelines.raytrain.cluster import in_ray_job
from pipelines.raytrain.run_dir import SNAPSHOT_FILE
from pipelines.storage import absolute, file_type, filesystem_for, has_scheme, is_remote, join_uri, local_path

log = logging.getLogger(__name__)

T = TypeVar("T")


class PreflightError(RuntimeError):
    """The run cannot start; the message says which setting to fix."""


def with_timeout(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Runs ``fn`` in a daemon thread; a PreflightError naming ``what`` if it takes longer than timeout_s.

    Object-store clients retry unreachable endpoints for minutes; a preflight check must not.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name=f"preflight: {what}")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise PreflightError(f"{what}: no answer within {timeout_s:.0f} s (unreachable endpoint or bucket?)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def open_checkpoint_arg(uri: str, tool: str, timeout_s: float = 120.0) -> tuple[str, Checkpoint]:
    """Reads, on the driver, the checkpoint a tool's ``--checkpoint`` names: a run directory stands for its
    best (else latest) checkpoint (``resolve_checkpoint``), printed as ``<tool>: --checkpoint is a run
    directory; using ...``; a file or a run's checkpoint folder (a path, http(s), s3://, gs://) for itself.

    Returns:
        The checkpoint's URI, and its config, weights and metadata (the optimizer state left out).

    Raises:
        ConfigError: one line naming --checkpoint without its query (it may hold keys): a run directory
            without a checkpoint, no answer from its endpoint within ``timeout_s``, not a checkpoint.
    """
    from pipelines.raytrain.state import fetch_checkpoint_file, resolve_checkpoint

    shown = f"--checkpoint {uri.partition('?')[0]!r}"
    try:
        resolved = with_timeout(lambda: resolve_checkpoint(uri), timeout_s, shown)
    except PreflightError as e:  # no answer in time
        raise ConfigError(str(e)) from e
    except (OSError, ValueError) as e:  # OSError: an unreachable endpoint, missing credentials
        raise ConfigError(f"{shown}: {e}") from e
    if resolved != uri:
        print(f"{tool}: --checkpoint is a run directory; using {resolved.partition('?')[0]}", flush=True)
        shown = f"--checkpoint {resolved.partition('?')[0]!r}"
    tmp = tempfile.mkdtemp(prefix="ddetr-ckpt-arg-")
    try:  # no timeout: the endpoint answered, and a large checkpoint may take minutes to download
        ckpt = read_checkpoint(fetch_checkpoint_file(resolved, tmp))
    except (OSError, ValueError) as e:  # FileNotFoundError included
        raise ConfigError(f"{shown} cannot be loaded: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return resolved, Checkpoint(config=ckpt.config, model=ckpt.model, meta=ckpt.meta, source_format=ckpt.source_format)


def default_run_name(job: JobConfig) -> str:
    return f"{job.preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


# Where a submitted job's relative train.storage_path goes: its working directory is Ray's copy of the
# submitter's folder, deleted with the Ray session, checkpoints and all.
SUBMITTED_RUNS_HOME = "~/ray-deformable-detr"


def storage_root(storage_path: str) -> str:
    """Where the runs (or sweeps) of ``storage_path`` go: a bucket URI as it is; a relative local path
    from the current directory, except in a job sent with ``ray job submit``: there under
    SUBMITTED_RUNS_HOME, which outlives the job (Ray deletes its copy of the working directory)."""
    if is_remote(storage_path):
        return storage_path
    storage = os.path.expanduser(storage_path.removeprefix("file://"))
    if in_ray_job() and not os.path.isabs(storage):
        storage = os.path.join(SUBMITTED_RUNS_HOME, storage)
    return local_path(storage)


def resolve(job: JobConfig) -> JobConfig:
    """The config with a run name and absolute local paths (workers may run in another directory); the
    storage path as ``storage_root`` places it."""
    data = job.data.model_copy()
    data.root = absolute(data.root)
    train = job.train.model_copy()
    if train.name is None:
        train.name = default_run_name(job)
    train.storage_path = storage_root(train.storage_path)
    if train.finetune_from:
        train.finetune_from = absolute(train.finetune_from)
    model = job.model.model_copy()
    if model.backbone_weights:
        model.backbone_weights = absolute(model.backbone_weights)
    return job.model_copy(update={"data": data, "train": train, "model": model})


def ensure_demo_data(job: JobConfig) -> bool:
    """Generates the synthetic dataset of ``job.demo_data`` at ``data.root`` when that folder is absent or empty.

    A ``data.root`` that holds anything else, or a bucket, is someone's data: nothing is generated or
    touched there, and ``check_data`` then says which preset reads that layout.

    Returns:
        True when it generated the data.
    """
    spec, data = job.demo_data, job.data
    if spec is None or has_scheme(data.root):
        return False
    wanted = [data.ann_uri("train"), data.ann_uri("val")]
    if all(os.path.isfile(p) for p in wanted):
        return False
    if os.path.isdir(data.root) and os.listdir(data.root):
        return False
    from pipelines.data.synthetic import generate_coco

    t0 = time.time()
    print(
        f"generating the demo dataset at {data.root} ({spec.num_train} train / {spec.num_val} val images) ...",
        flush=True,
    )
    # Generate aside and rename into place, so an interrupted or concurrent generation never leaves
    # a half-written dataset that looks complete.
    tmp = f"{data.root.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    sides = (spec.min_side, spec.max_side)
    generate_coco(
        tmp,
        spec.num_train,
        spec.num_val,
        image_size=(sides, sides),
        num_classes=spec.num_classes,
        max_objects=spec.max_objects,
        seed=spec.seed,
    )
    os.makedirs(os.path.dirname(data.root) or ".", exist_ok=True)
    if os.path.isdir(data.root) and not os.listdir(data.root):
        os.rmdir(data.root)
    try:
        os.rename(tmp, data.root)
    except OSError:  # another process generated it first, or put something there meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not all(os.path.isfile(p) for p in wanted):
            raise PreflightError(f"data.root={data.root!r} changed while the demo dataset was generated") from None
    print(f"  done in {time.time() - t0:.1f} s", flush=True)
    return True


def check_data(job: JobConfig, splits: tuple[str, ...] | None = None) -> None:
    """The annotation files and image folders the run reads exist (default: train, and val when evaluating)."""
    data = job.data
    if splits is None:
        splits = ("train", "val") if job.train.eval_every else ("train",)
    checks: list[tuple[str, str, pafs.FileType]] = []
    if data.parquet_dir is not None:
        for split in splits:
            checks.append(
                (
                    f"data.parquet_dir ({split} manifest)",
                    join_uri(data.parquet_uri(), f"{split}_manifest.json"),
                    pafs.FileType.File,
                )
            )
        if "val" in splits:  # pycocotools' ground truth: the annotation file, not the shards
            checks.append(("data.val_ann", data.ann_uri("val"), pafs.FileType.File))
    else:
        for split in splits:
            checks.append((f"data.{split}_ann", data.ann_uri(split), pafs.FileType.File))
            checks.append((f"data.{split}_images", data.images_uri(split), pafs.FileType.Directory))
    for field, uri, want in checks:
        try:
            got = with_timeout(
                lambda uri=uri: file_type(uri, data.storage_options), job.train.preflight_timeout_s, f"{field}={uri!r}"
            )
        except PreflightError:
            raise
        except Exception as e:  # credentials, DNS, permissions: name the setting, keep the cause
            raise PreflightError(f"{field}={uri!r} cannot be read: {type(e).__name__}: {e}") from e
        if is_remote(uri) and want == pafs.FileType.Directory and got == pafs.FileType.NotFound:
            # Object stores have no folders; an empty prefix reads as not found. The image listing
            # in the dataset builder reports missing files one by one.
            continue
        if got != want:
            kind = "file" if want == pafs.FileType.File else "folder"
            raise PreflightError(f"{field}: {kind} not found: {uri}{_layout_hint(job)}")


def _layout_hint(job: JobConfig) -> str:
    if job.demo_data is None:
        return " (set data.root, or run the demo preset to generate a dataset)"
    # A generated-data preset pointed at someone's data: its layout (train/, instances_train.json) is
    # not COCO's (train2017/, annotations/instances_train2017.json).
    return (
        f". The {job.preset or 'demo'} preset reads the generated layout (train/, val/, instances_train.json, "
        "instances_val.json), generated only into an absent or empty data.root; for COCO-layout data use "
        "--preset cpu_coco (CPU) or --preset r50 (GPUs), or set data.train_ann/data.train_images/... to your layout"
    )


def check_storage(job: JobConfig) -> None:
    """The run's storage can be written: a local folder is created; a bucket must answer."""
    check_writable(
        job.train.storage_path, f"train.storage_path={job.train.storage_path!r}", job.train.preflight_timeout_s
    )


def check_writable(uri: str, what: str, timeout_s: float) -> None:
    """A local folder ``uri`` is created and writable; a bucket prefix answers and takes a write.

    Raises:
        PreflightError: naming ``what`` (the field or flag that gave ``uri``).
    """
    if not is_remote(uri):
        try:
            os.makedirs(uri, exist_ok=True)
        except OSError as e:
            raise PreflightError(f"{what} cannot be created: {e}") from e
        if not os.access(uri, os.W_OK):
            raise PreflightError(f"{what} is not writable")
        return

    def probe() -> None:
        fs, path = filesystem_for(uri)
        bucket = path.split("/", 1)[0]
        info = fs.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            raise PreflightError(f"{what}: bucket {bucket!r} does not exist")
        # Reading is not enough: checkpoints need write access (credentials, bucket policy).
        marker = f"{path.rstrip('/')}/.preflight-{os.getpid()}-{int(time.time())}"
        with fs.open_output_stream(marker) as f:
            f.write(b"ok")
        fs.delete_file(marker)

    try:
        with_timeout(probe, timeout_s, what)
    except PreflightError:
        raise
    except Exception as e:
        raise PreflightError(f"{what} is unreachable: {type(e).__name__}: {e}") from e


def load_finetune_weights(job: JobConfig) -> dict | None:
    """The weights of train.finetune_from, read and checked against the config on the driver.

    Any checkpoint core/ loads will do, ours or the authors'; the architecture must match the config
    (a different class count re-initializes the class heads only).

    Returns:
        The state_dict to start from, or None without finetune_from.
    """
    src = job.train.finetune_from
    if src is None:
        return None
    from core.checkpoint import load_checkpoint
    from pipelines.raytrain.state import fetch_checkpoint_file

    tmp = tempfile.mkdtemp(prefix="ddetr-finetune-")
    try:
        path = with_timeout(
            lambda: fetch_checkpoint_file(src, tmp),
            max(job.train.preflight_timeout_s, 120.0),
            f"train.finetune_from={src!r}",
        )
        # Builds the model and loads the weights: the same check the workers will pass.
        loaded = load_checkpoint(path, job.detr_config())
    except PreflightError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise PreflightError(f"train.finetune_from={src!r} cannot be used: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return loaded.checkpoint.model


def fetch_backbone_weights(job: JobConfig) -> None:
    """Makes sure ``model.backbone_weights`` can be read, on the driver, before any worker starts.

    A URL is downloaded into torch.hub's cache (where the workers on this node find it); a local file
    must exist. Call it for a fresh start only: a resumed or fine-tuned run never reads these weights.

    Raises:
        PreflightError: naming model.backbone_weights and how to point it at a local file.
    """
    src = job.model.backbone_weights
    if not src:
        return
    what = f"model.backbone_weights={src!r}"
    if src.startswith(("http://", "https://")):
        import torch

        def fetch() -> None:
            torch.hub.load_state_dict_from_url(src, map_location="cpu", progress=False, weights_only=True)

        try:
            with_timeout(fetch, max(job.train.preflight_timeout_s, 300.0), what)
        except Exception as e:
            name = os.path.basename(src.split("?", 1)[0])
            raise PreflightError(
                f"{what} cannot be downloaded ({type(e).__name__}: {e}). Without network here, fetch {src} "
                f"elsewhere and set --set model.backbone_weights=/path/to/{name} (or =null to train the "
                "backbone from scratch)"
            ) from e
        return
    if has_scheme(src):
        raise PreflightError(f"{what}: expected a local file or an http(s) URL")
    if not os.path.isfile(src):
        raise PreflightError(f"{what}: file not found (or =null to train the backbone from scratch)")


def check_resources(job: JobConfig, cluster_resources: dict[str, float], strict: bool) -> None:
    """The cluster can hold the (smallest) worker group and Ray Data's decode tasks now; ``strict`` (a
    local Ray we started, or a cluster with no autoscaler) makes a shortfall fatal.

    The worker group's placement group holds its CPUs for the whole run, and every decode task needs a
    CPU of its own (the driver of a submitted job takes none): with nothing left over, training waits
    forever for its first batch. A cluster that autoscales may grow, so there a shortfall is a warning.
    """
    t = job.train
    # An elastic run starts with min_workers; a fixed one needs them all.
    workers = t.min_workers
    decode = 1  # one free CPU lets Ray Data's decode tasks run, one at a time
    need = {
        "CPU": workers * t.cpus_per_worker + decode,
        **{k: workers * v for k, v in t.worker_resources.items()},
    }
    if t.use_gpu:
        need["GPU"] = workers * t.gpus_per_worker
    short = {k: (v, cluster_resources.get(k, 0.0)) for k, v in need.items() if cluster_resources.get(k, 0.0) < v}
    if not short:
        return
    detail = ", ".join(
        f"{k}: need {n:g}"
        + (f" ({workers} workers x {t.cpus_per_worker:g} + {decode} for decoding)" if k == "CPU" else "")
        + f", cluster has {h:g}"
        for k, (n, h) in short.items()
    )
    msg = f"the run does not fit ({detail}); lower train.num_workers / train.cpus_per_worker" + (
        " or set train.use_gpu=false" if "GPU" in short else ""
    )
    if set(short) & set(t.worker_resources):
        msg += " or change train.worker_resources"
    if strict:
        raise PreflightError(msg)
    log.warning("%s (waiting for the cluster to scale up)", msg)


def latest_checkpoint_epoch(job: JobConfig) -> int | None:
    """The epoch of the run's latest registered checkpoint (read from Ray Train's snapshot), or None.

    For a mid-epoch checkpoint that is the last epoch finished before it (-1 inside the first epoch), so
    ``epoch + 1`` is always the epoch a resumed run trains first.
    """
    uri = join_uri(job.train.storage_path, job.train.name, SNAPSHOT_FILE)
    try:
        fs, path = filesystem_for(uri)

        def read() -> bytes:
            with fs.open_input_stream(path) as f:
                return f.read()

        snapshot = json.loads(with_timeout(read, job.train.preflight_timeout_s, "checkpoint snapshot"))
        return int(snapshot["latest_checkpoint_result"]["metrics"]["epoch"])
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return None
    except OSError as e:
        if "not found" in str(e).lower() or "no such file" in str(e).lower():
            return None
        raise


def preflight(job: JobConfig) -> JobConfig:
    """Resolves names and paths, generates the demo data if asked, and checks the data and the storage.

    Returns:
        The resolved config (run name set, local paths absolute), the one to save and run.

    Raises:
        PreflightError: with a message naming the setting at fault.
    """
    job = resolve(job)
    ensure_demo_data(job)
    check_data(job)
    check_storage(job)
    return job
