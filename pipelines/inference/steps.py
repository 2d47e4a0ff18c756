"""The two Ray Data steps of batch inference: read+decode+resize (CPU tasks) and the model (an actor pool).

Every image becomes exactly one row, good or bad: a file that cannot be read or decoded gets an
``error`` and an ``error_kind`` and travels on with no pixels, so one bad file never takes down its
batch, and the output accounts for every input.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from core.predictor import Detections, InputSize, Predictor, PreparedImage, prepare_image
from pipelines.data.decode import ImageDecodeError, apply_exif_orientation, decode_image, exif_orientation
from pipelines.storage import read_many

log = logging.getLogger(__name__)

# Error kinds, as the summary counts them.
EMPTY, MISSING, UNREADABLE, TRUNCATED, CORRUPT, UNSUPPORTED, TOO_LARGE, MODEL = (
    "empty",
    "missing",
    "unreadable",
    "truncated",
    "corrupt",
    "unsupported",
    "too_large",
    "model",
)

DECODED_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("part", pa.string()),
        ("pixels", pa.large_binary()),  # (h, w, 3) uint8 resized for the model; null on error
        ("resized_height", pa.int32()),
        ("resized_width", pa.int32()),
        ("height", pa.int32()),  # the original image's size (after its EXIF orientation); null on error
        ("width", pa.int32()),
        ("exif_orientation", pa.int32()),  # the EXIF orientation applied to the stored pixels, 1 for none
        ("error", pa.string()),
        ("error_kind", pa.string()),
    ]
)

# One row per image of the output Parquet files.
RESULT_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # (k, 4) xyxy pixels of the original image
        ("scores", pa.list_(pa.float32())),  # (k,) descending
        ("labels", pa.list_(pa.int64())),  # (k,) category ids
        ("names", pa.list_(pa.string())),  # (k,)
        # 1: width, height and boxes are in the stored pixels' frame; 2-8: in the frame viewers show,
        # that EXIF orientation applied (PIL's exif_transpose); null on error.
        ("exif_orientation", pa.int32()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
    ]
)


# Signatures of formats Pillow decodes: a file that starts like one but does not decode is corrupt, not unsupported.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def classify_error(err: BaseException, data: bytes | None = None, uri: str | None = None) -> str:
    """The kind of a read or decode failure, for the summary; ``data`` are the file's bytes, if read."""
    if isinstance(err, FileNotFoundError):
        # A symlink whose target is gone is listed but cannot be read; a missing path was never there.
        return UNREADABLE if uri is not None and os.path.islink(uri) else MISSING
    if isinstance(err, ImageDecodeError):
        cause, msg = err.__cause__, str(err)
        if "empty file" in msg:
            return EMPTY
        if isinstance(cause, Image.DecompressionBombError):
            return TOO_LARGE
        if isinstance(cause, UnidentifiedImageError):
            return CORRUPT if data is not None and bytes(data[:4]).startswith(_IMAGE_MAGIC) else UNSUPPORTED
        if "truncated" in msg.lower() or "Premature end" in msg:
            return TRUNCATED
        return CORRUPT
    if isinstance(err, MemoryError):
        return TOO_LARGE
    if isinstance(err, OSError):
        return UNREADABLE
    return CORRUPT


class DecodeImages:
    """Reads, decodes and resizes a batch of images (a Ray Data ``map_batches`` function, CPU tasks).

    Args:
        input_size: the model's resize (the predictor's ``input_size``).
        storage_options: filesystem options of the input URIs.
        read_threads: concurrent reads inside one task (object stores need many in flight).
        exif_transpose: turn each image by its EXIF orientation first, into the frame viewers show.
    """

    def __init__(
        self,
        input_size: InputSize,
        storage_options: dict[str, Any],
        read_threads: int = 16,
        exif_transpose: bool = True,
    ) -> None:
        self.input_size = input_size
        self.storage_options = storage_options
        self.read_threads = read_threads
        self.exif_transpose = exif_transpose

    def __call__(self, batch: pa.Table) -> pa.Table:
        uris = batch.column("uri").to_pylist()
        datas = read_many(uris, self.storage_options, self.read_threads)
        cols: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names}
        for uri, part, data in zip(uris, batch.column("part").to_pylist(), datas):
            pixels = rh = rw = h = w = orientation = error = kind = None
            try:
                if isinstance(data, BaseException):
                    raise data
                image = decode_image(data, name=uri)
                orientation = exif_orientation(data) if self.exif_transpose else 1
                prepared = prepare_image(apply_exif_orientation(image, orientation), self.input_size)
                rh, rw = prepared.pixels.shape[:2]
                h, w, pixels = prepared.height, prepared.width, prepared.pixels.tobytes()
            except Exception as e:  # noqa: BLE001 - whatever one file does, it fails its own row only
                read = None if isinstance(data, BaseException) else data
                error, kind, orientation = _one_line(e, uri), classify_error(e, read, uri), None
            row = (uri, part, pixels, rh, rw, h, w, orientation, error, kind)
            for name, value in zip(DECODED_SCHEMA.names, row):
                cols[name].append(value)
        return pa.table(cols, schema=DECODED_SCHEMA)


def _one_line(err: BaseException, uri: str) -> str:
    msg = " ".join(str(err).split()) or type(err).__name__
    return msg if uri in msg else f"{uri}: {msg}"


class PredictImages:
    """The model step: one Predictor per actor, built once from the model in the object store.

    Args:
        model: a core Checkpoint, or an exported ONNX file's bytes (run by onnxruntime), or an ObjectRef
            of either.
        predictor_kwargs: Predictor arguments (score_threshold, top_k, batch_size, amp_dtype, ...).
        torch_threads: intra-op threads on the CPU (torch's or onnxruntime's); None keeps the default.
    """

    def __init__(self, model: Any, predictor_kwargs: dict[str, Any], torch_threads: int | None = None) -> None:
        import ray
        import torch

        if isinstance(model, ray.ObjectRef):
            model = ray.get(model)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        gpu_ids = ray.get_gpu_ids()
        device = "cuda" if gpu_ids and torch.cuda.is_available() else "cpu"
        if isinstance(model, bytes):
            kwargs = {k: v for k, v in predictor_kwargs.items() if k != "amp_dtype"}
            self.predictor = Predictor.from_onnx(model, threads=torch_threads, **kwargs)
        else:
            self.predictor = Predictor.from_checkpoint(model, device=device, **predictor_kwargs)
        log.info("inference actor pid %d on %s, %d torch threads", os.getpid(), device, torch.get_num_threads())

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        good = [i for i, r in enumerate(rows) if r["error"] is None]
        prepared = [
            PreparedImage(
                np.frombuffer(rows[i]["pixels"], np.uint8).reshape(
                    rows[i]["resized_height"], rows[i]["resized_width"], 3
                ),
                rows[i]["height"],
                rows[i]["width"],
            )
            for i in good
        ]
        dets: dict[int, Detections] = {}
        try:
            dets = dict(zip(good, self.predictor.predict_prepared(prepared)))
        except Exception:  # noqa: BLE001 - retried one by one below, so only the failing image is lost
            for i, p in zip(good, prepared):
                try:
                    dets[i] = self.predictor.predict_prepared([p])[0]
                except Exception as e:  # noqa: BLE001
                    rows[i]["error"], rows[i]["error_kind"] = _one_line(e, rows[i]["uri"]), MODEL
        return results_table(rows, dets)


def results_table(rows: list[dict[str, Any]], dets: dict[int, Detections]) -> pa.Table:
    """Output rows (RESULT_SCHEMA plus ``part``) of decoded rows and the detections of the good ones."""
    cols: dict[str, list] = {name: [] for name in (*RESULT_SCHEMA.names, "part")}
    for i, r in enumerate(rows):
        d = dets.get(i)
        cols["uri"].append(r["uri"])
        cols["part"].append(r["part"])
        cols["width"].append(r["width"])
        cols["height"].append(r["height"])
        cols["exif_orientation"].append(r["exif_orientation"])
        cols["boxes"].append([] if d is None else d.boxes.tolist())
        cols["scores"].append([] if d is None else d.scores.tolist())
        cols["labels"].append([] if d is None else d.labels.tolist())
        cols["names"].append([] if d is None else list(d.names))
        cols["error"].append(None if d is not None else r["error"])
        cols["error_kind"].append(None if d is not None else r["error_kind"])
    schema = RESULT_SCHEMA.append(pa.field("part", pa.string()))
    return pa.table(cols, schema=schema)
