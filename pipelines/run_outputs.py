"""A run's outputs: the run directory, metrics as JSON lines, loss and AP curves, drawn validation images.

The workers send their records to a small ``MetricsSink`` actor; the driver drains it, appends to
``metrics.jsonl`` and prints progress. So the run directory is written by one process, the driver,
whichever nodes the workers run on.

Run directory (``<storage_path>/<name>/``, next to Ray Train's ``checkpoint_*`` folders)::

    config.json        the resolved JobConfig
    data_report.json   per split: images used, bad input skipped (data.on_bad_input=skip) by kind, examples
    metrics.jsonl      one JSON object a line: kind "step" | "epoch" | "eval" | "event"
    ap_table.md        the final COCO AP table
    loss.png, ap.png   curves
    val_images/*.png   validation images, true boxes green, predictions red with scores
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
import pyarrow.fs as pafs
import ray

from pipelines.coco import filesystem_for

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
AP_TABLE_FILE = "ap_table.md"
DATA_REPORT_FILE = "data_report.json"


def storage_filesystem(uri: str, storage_options: dict | None = None) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path for a local folder, ``s3://`` or ``gs://`` URI.

    ``?endpoint_override=host:port&scheme=http`` style query options in a bucket URI are honoured (for
    MinIO and fake-GCS servers) on top of ``storage_options``; the filesystem itself comes from
    ``pipelines.coco.filesystem_for``, as the data's does.
    """
    if is_remote(uri):
        base, _, query = uri.partition("?")
        return filesystem_for(base, {**(storage_options or {}), **dict(parse_qsl(query))})
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI {uri!r}: expected a local path, s3:// or gs://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def join_uri(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or bucket URI, keeping a bucket URI's ``?options`` at the end."""
    path, sep, query = base.partition("?")
    joined = "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])
    return joined + sep + query


def split_run_uri(run: str) -> tuple[str, str]:
    """(storage_path, name) of a run directory path or URI: the inverse of ``join_uri(storage, name)``."""
    path, sep, query = run.partition("?")
    storage, _, name = path.rstrip("/").rpartition("/")
    return storage + sep + query, name


def is_remote(uri: str) -> bool:
    return uri.startswith(("s3://", "gs://", "gcs://"))


class RunDir:
    """The run directory, written on the driver.

    For a local ``storage_path`` it is ``<storage_path>/<name>``; for a bucket the files are written
    to a local staging folder and copied to ``<storage_uri>/<name>/`` by ``sync()``.

    Args:
        storage_path: local folder or bucket URI.
        name: the run name.
        staging_root: local parent of the staging folder for bucket runs.
    """

    def __init__(self, storage_path: str, name: str, staging_root: str | None = None) -> None:
        self.storage_path = storage_path
        self.name = name
        if is_remote(storage_path):
            root = staging_root or os.path.join(os.path.expanduser("~"), ".cache", "ray-deformable-detr", "runs")
            self.path = Path(root) / name
            self.uri = join_uri(storage_path, name)
        else:
            self.path = Path(os.path.abspath(os.path.expanduser(storage_path))) / name
            self.uri = str(self.path)
        self._lock = threading.Lock()

    def mkdir(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        if is_remote(self.storage_path):
            self._pull()
        return self

    def file(self, rel: str) -> Path:
        return self.path / rel

    def write_json(self, rel: str, obj: Any) -> Path:
        return self.write_text(rel, json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def write_text(self, rel: str, text: str) -> Path:
        path = self.file(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def append_metrics(self, records: Iterable[dict[str, Any]]) -> None:
        lines = [json.dumps(r, default=_json_default) for r in records]
        if not lines:
            return
        with self._lock, open(self.file(METRICS_FILE), "a") as f:
            f.write("\n".join(lines) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.file(METRICS_FILE))

    def sync(self) -> None:
        """Copies the staging folder to the bucket (no-op for a local run directory)."""
        if not is_remote(self.storage_path):
            return
        fs, path = storage_filesystem(self.uri)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(self.path), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def _pull(self) -> None:
        # Resuming a bucket run: fetch its earlier metrics so the curves cover the whole run.
        fs, path = storage_filesystem(self.uri)
        for rel in (METRICS_FILE, CONFIG_FILE):
            info = fs.get_file_info(f"{path}/{rel}")
            if info.type == pafs.FileType.File and not self.file(rel).exists():
                with fs.open_input_stream(info.path) as src, open(self.file(rel), "wb") as dst:
                    shutil.copyfileobj(src, dst)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a torn last line, from a killed driver, is skipped)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def latest_history(records: Sequence[dict[str, Any]], kind: str, key: str) -> list[dict[str, Any]]:
    """Records of one kind, keeping only the latest attempt where a restart replayed steps or epochs.

    After a worker failure the run goes back to its last checkpoint and logs some ``key`` values
    again; the replayed records supersede the earlier ones from that point on.
    """
    out: list[dict[str, Any]] = []
    for r in records:
        if r.get("kind") != kind or key not in r:
            continue
        while out and out[-1][key] >= r[key]:
            out.pop()
        out.append(r)
    return out


@ray.remote(num_cpus=0)
class MetricsSink:
    """Buffers records sent by the workers until the driver drains them."""

    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._vis: list[dict[str, Any]] = []

    def log(self, records: list[dict[str, Any]]) -> None:
        self._records.extend(records)

    def log_vis(self, vis: list[dict[str, Any]]) -> None:
        self._vis = list(vis)

    def drain(self) -> list[dict[str, Any]]:
        out, self._records = self._records, []
        return out

    def vis(self) -> list[dict[str, Any]]:
        return self._vis


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < 3 or window <= 1:
        return values
    window = min(window, len(values))
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def plot_curves(records: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """loss.png (training loss and its main terms against images seen) and ap.png (AP against epoch).

    Returns:
        The files written; none when matplotlib is missing (logged) or there is nothing to plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no curves drawn (pip install matplotlib)")
        return []
    out_dir = Path(out_dir)
    written = []
    steps = latest_history(records, "step", "global_step")
    if steps:
        x = np.array([r["global_step"] for r in steps], dtype=float)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        window = max(1, len(steps) // 50)
        for key in ("loss",):
            y = np.array([r.get(key, np.nan) for r in steps], dtype=float)
            axes[0].plot(x, y, alpha=0.25, color="C0")
            axes[0].plot(x, _smooth(y, window), color="C0", label=f"{key} (smoothed)")
        axes[0].set_xlabel("optimizer step")
        axes[0].set_ylabel("weighted loss")
        axes[0].set_title("training loss")
        axes[0].legend()
        for i, key in enumerate(("loss_ce", "loss_bbox", "loss_giou")):
            y = np.array([r.get(key, np.nan) for r in steps], dtype=float)
            axes[1].plot(x, _smooth(y, window), color=f"C{i + 1}", label=key)
        axes[1].set_xlabel("optimizer step")
        axes[1].set_title("last decoder layer terms (unweighted, smoothed)")
        axes[1].legend()
        fig.tight_layout()
        path = out_dir / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    evals = latest_history(records, "eval", "epoch")
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        epochs = [r["epoch"] + 1 for r in evals]
        for key in ("AP", "AP50", "AP75"):
            ax.plot(epochs, [100 * r[key] for r in evals], marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("COCO AP (%)")
        ax.set_title("validation AP")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / "ap.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def draw_detections(item: dict[str, Any], path: str | os.PathLike, min_side: int = 400) -> Path:
    """One validation image with true boxes (green) and predictions (red, with class and score).

    Args:
        item: as collected by ``engine.evaluate``: "image" (h, w, 3) uint8, "true_boxes", "true_labels",
            "pred_boxes", "pred_scores", "pred_labels" (boxes xyxy in the image's pixels), "label_names".
        path: PNG to write.
        min_side: small images are scaled up so the boxes and text stay readable.
    """
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.asarray(item["image"], dtype=np.uint8))
    scale = max(1.0, min_side / max(1, min(image.size)))
    if scale > 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    names = {int(k): v for k, v in item.get("label_names", {}).items()}

    def name(label: int) -> str:
        return names.get(int(label), str(int(label)))

    for box, label in zip(np.asarray(item["true_boxes"]).reshape(-1, 4), np.asarray(item["true_labels"]).reshape(-1)):
        draw.rectangle([float(v) * scale for v in box], outline=(0, 200, 0), width=2)
        draw.text((box[0] * scale + 2, box[3] * scale - 12), name(label), fill=(0, 200, 0))
    for box, score, label in zip(
        np.asarray(item["pred_boxes"]).reshape(-1, 4),
        np.asarray(item["pred_scores"]).reshape(-1),
        np.asarray(item["pred_labels"]).reshape(-1),
    ):
        draw.rectangle([float(v) * scale for v in box], outline=(230, 30, 30), width=2)
        draw.text((box[0] * scale + 2, box[1] * scale + 1), f"{name(label)} {score:.2f}", fill=(230, 30, 30))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def write_final_outputs(run_dir: RunDir, vis: Sequence[dict[str, Any]]) -> list[Path]:
    """Curves from metrics.jsonl and the drawn validation images; returns the files written."""
    written = plot_curves(run_dir.read_metrics(), run_dir.path)
    for i, item in enumerate(vis):
        written.append(draw_detections(item, run_dir.file(f"val_images/{i:02d}_image{item['image_id']}.png")))
    return written


def data_report(infos: Mapping[str, Any]) -> dict[str, Any]:
    """The data_report.json of a run: per split, what was read and what was skipped.

    Args:
        infos: split -> `pipelines.data.DatasetInfo`. Its skips found inside decode tasks are those
            of the epochs run so far, so call this again when the run ends.

    Returns:
        {split: {"source", "num_images", "skipped", "counts", "examples", "fixed"}}: `num_images`
        passed the annotation and file checks; `skipped` is the total of `counts` (images and
        annotations by kind); `fixed` counts silent-safe repairs such as boxes clipped to the image.
    """
    out = {}
    for split, info in infos.items():
        try:
            bad = info.bad_input_report()
        except Exception as e:  # the ledger actor is gone: report what was found before reading pixels
            log.warning("%s: bad input found while decoding is unavailable (%s)", split, e)
            bad = info.bad_input
        out[split] = {"source": info.source, "num_images": info.num_images, "skipped": bad.total, **bad.to_dict()}
    return out


def format_data_report(report: Mapping[str, Any], on_bad_input: str) -> str:
    """A data_report.json as a block for the console: per split, counts by kind and a few examples."""
    lines = [f"data (data.on_bad_input={on_bad_input}):"]
    for split, r in report.items():
        lines.append(
            f"  {split}: {r['num_images']} images from {r['source']}; "
            + (f"{r['skipped']} bad inputs skipped" if r["skipped"] else "no bad input skipped")
        )
        for kind, n in sorted(r["counts"].items()):
            lines.append(f"    {kind}: {n}  e.g. {'; '.join(r['examples'].get(kind, []))}")
        for kind, n in sorted(r.get("fixed", {}).items()):
            lines.append(f"    {kind}: {n} (repaired, kept)")
    return "\n".join(lines)


def format_progress(r: dict[str, Any]) -> str:
    """One progress line: epoch, step/total, loss, images/s, ETA."""
    eta = r.get("eta_s")
    eta_txt = "?" if eta is None else time.strftime("%H:%M:%S", time.gmtime(max(0.0, eta)))
    return (
        f"epoch {r['epoch'] + 1}/{r['epochs']}  step {r['step']}/{r['steps_per_epoch']}  "
        f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['images_per_s']:.1f} img/s  ETA {eta_txt}"
    )
