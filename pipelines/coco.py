"""COCO instances JSON to validated Arrow rows, and file access on local disk, S3 and GCS via pyarrow.fs.

Legend: K annotations of one image. A row's boxes are COCO pixel `xywh`, flat (K*4,) float32, clipped
to the image; `category_id` keeps COCO's raw ids (the label mapping is applied at decode time, so
prepared Parquet shards don't depend on it).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

META_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_boxes", pa.int32()),
        ("boxes", pa.list_(pa.float32())),  # (K*4,) xywh pixels
        ("category_id", pa.list_(pa.int64())),  # (K,) raw COCO ids
        ("iscrowd", pa.list_(pa.int8())),
        ("area", pa.list_(pa.float32())),
        ("ann_id", pa.list_(pa.int64())),
    ]
)
# A row as read from the image folder or a Parquet shard: the image file's bytes plus its annotations.
ROW_SCHEMA = pa.schema([pa.field("image", pa.binary()), *META_SCHEMA])

MAX_EXAMPLES = 5


class BadInputError(ValueError):
    """Input that breaks the COCO contract; the message names the file, image or annotation id."""


# --------------------------------------------------------------------------- files


_FS_CACHE: dict[tuple, pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()


def filesystem_for(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `uri` and the path inside it (`bucket/key` for object stores).

    Filesystems are built explicitly rather than with `FileSystem.from_uri`, which makes a network
    call to find an S3 bucket's region. They are cached per process and options.
    """
    opts = dict(storage_options or {})
    if uri.startswith("s3://"):
        scheme, path = "s3", uri[len("s3://") :]
    elif uri.startswith("gs://") or uri.startswith("gcs://"):
        scheme, path = "gs", uri.split("://", 1)[1]
    elif uri.startswith("file://"):
        scheme, path = "local", uri[len("file://") :]
    elif "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: expected a local path, s3:// or gs://")
    else:
        scheme, path = "local", uri
    key = (scheme, tuple(sorted(opts.items())))
    with _FS_LOCK:
        fs = _FS_CACHE.get(key)
        if fs is None:
            if scheme == "s3":
                fs = pafs.S3FileSystem(**opts)
            elif scheme == "gs":
                fs = pafs.GcsFileSystem(**opts)
            else:
                fs = pafs.LocalFileSystem()
            _FS_CACHE[key] = fs
    if scheme == "local":
        path = os.path.abspath(path)
    return fs, path.rstrip("/") if len(path) > 1 else path


def read_file(uri: str, storage_options: Mapping[str, Any] | None = None, *, retries: int = 3) -> bytes:
    """All bytes of one file. Transient object-store errors are retried; a missing file is not."""
    fs, path = filesystem_for(uri, storage_options)
    for attempt in range(retries):
        try:
            with fs.open_input_stream(path) as f:  # a stream: one GET, no HEAD first
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            msg = str(e).lower()
            if "not found" in msg or "no such file" in msg or "does not exist" in msg:
                raise FileNotFoundError(f"{uri}: {e}") from e
            if attempt == retries - 1:
                raise OSError(f"cannot read {uri} after {retries} attempts: {e}") from e
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def write_file(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    fs, path = filesystem_for(uri, storage_options)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def load_json(uri: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """Parse a JSON file; malformed or missing files raise errors that name the file."""
    try:
        data = read_file(uri, storage_options)
    except FileNotFoundError as e:
        raise BadInputError(f"annotation file not found: {uri}") from e
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"malformed JSON in {uri}: {e}") from e


def list_file_sizes(dir_uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Size of every file under a folder or bucket prefix, keyed by path relative to it (one listing)."""
    fs, base = filesystem_for(dir_uri, storage_options)
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.NotFound and "://" not in dir_uri:
        raise BadInputError(f"image folder not found: {dir_uri}")
    sizes: dict[str, int] = {}
    for fi in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
        if fi.type == pafs.FileType.File:
            sizes[fi.path[len(base) :].lstrip("/")] = fi.size
    return sizes


def read_files(
    uris: Sequence[str], storage_options: Mapping[str, Any] | None = None, threads: int = 16
) -> list[bytes | BaseException]:
    """Read many files concurrently (object stores need concurrency, not cores); errors are returned."""

    def one(u: str) -> bytes | BaseException:
        try:
            return read_file(u, storage_options)
        except OSError as e:  # FileNotFoundError included
            return e

    if len(uris) <= 1 or threads <= 1:
        return [one(u) for u in uris]
    with ThreadPoolExecutor(max_workers=min(threads, len(uris))) as pool:
        return list(pool.map(one, uris))


# --------------------------------------------------------------------------- bad input


@dataclass
class BadInputSummary:
    """Counts of skipped input by kind, with the first few offenders; `fixed` counts silent-safe repairs."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    fixed: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, ident: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(ident)

    def merge(self, other: BadInputSummary) -> BadInputSummary:
        out = BadInputSummary(dict(self.counts), {k: list(v) for k, v in self.examples.items()}, dict(self.fixed))
        for k, n in other.counts.items():
            out.counts[k] = out.counts.get(k, 0) + n
            ex = out.examples.setdefault(k, [])
            ex.extend(other.examples.get(k, [])[: MAX_EXAMPLES - len(ex)])
        for k, n in other.fixed.items():
            out.fixed[k] = out.fixed.get(k, 0) + n
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "examples": {k: list(v) for k, v in self.examples.items()},
            "fixed": dict(self.fixed),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BadInputSummary:
        return cls(
            dict(d.get("counts", {})), {k: list(v) for k, v in d.get("examples", {}).items()}, dict(d.get("fixed", {}))
        )

    def __str__(self) -> str:
        if not self.counts and not self.fixed:
            return "no bad input"
        parts = [f"{n} {k} (e.g. {', '.join(self.examples.get(k, []))})" for k, n in sorted(self.counts.items())]
        parts += [f"{n} {k}" for k, n in sorted(self.fixed.items())]
        return "; ".join(parts)


# --------------------------------------------------------------------------- categories


@dataclass(frozen=True)
class CategoryMap:
    """COCO category ids <-> head labels. raw: label = id, num_classes = max id + 1 (91 for COCO);
    contiguous: label = rank of the id, num_classes = number of categories."""

    category_ids: tuple[int, ...]  # sorted
    names: tuple[str, ...]
    mode: Literal["raw", "contiguous"] = "raw"

    @classmethod
    def from_categories(
        cls, categories: Sequence[Mapping[str, Any]], mode: Literal["raw", "contiguous"]
    ) -> CategoryMap:
        pairs = sorted((int(c["id"]), str(c["name"])) for c in categories)
        return cls(tuple(i for i, _ in pairs), tuple(n for _, n in pairs), mode)

    @property
    def num_classes(self) -> int:
        if not self.category_ids:
            return 0
        return self.category_ids[-1] + 1 if self.mode == "raw" else len(self.category_ids)

    def label_to_category_id(self) -> list[int]:
        """Index = label, value = COCO id (identity in raw mode, -1 where no category)."""
        if self.mode == "contiguous":
            return list(self.category_ids)
        table = [-1] * self.num_classes
        for i in self.category_ids:
            table[i] = i
        return table

    def labels(self, category_ids: np.ndarray) -> np.ndarray:
        """(K,) COCO ids -> (K,) int64 labels."""
        ids = np.asarray(category_ids, dtype=np.int64)
        if self.mode == "raw":
            return ids.copy()
        lut = np.full(self.category_ids[-1] + 1 if self.category_ids else 1, -1, dtype=np.int64)
        lut[list(self.category_ids)] = np.arange(len(self.category_ids))
        out = lut[np.clip(ids, 0, len(lut) - 1)]
        if ids.size and ((ids >= len(lut)) | (out < 0)).any():
            raise ValueError(
                f"category ids {sorted(set(ids[(ids >= len(lut)) | (out < 0)].tolist()))} "
                f"are not in {list(self.category_ids)}"
            )
        return out

    def category_ids_of(self, labels: np.ndarray) -> np.ndarray:
        """(K,) labels -> (K,) COCO ids, for pycocotools."""
        return np.asarray(self.label_to_category_id(), dtype=np.int64)[np.asarray(labels, dtype=np.int64)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "category_ids": list(self.category_ids),
            "names": list(self.names),
            "num_classes": self.num_classes,
            "label_to_category_id": self.label_to_category_id(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CategoryMap:
        return cls(tuple(d["category_ids"]), tuple(d["names"]), d["mode"])


# --------------------------------------------------------------------------- parsing


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


@dataclass
class CocoIndex:
    """An annotation file parsed and checked: one META_SCHEMA row per usable image."""

    table: pa.Table
    categories: list[dict[str, Any]]
    summary: BadInputSummary
    source: str


def parse_instances(js: Any, *, source: str = "<json>", box_edge_tolerance: float = 1.0) -> CocoIndex:
    """Check a COCO instances dict and build one row per image; every problem is recorded, not raised.

    Structural problems that leave nothing to skip (no image list, bad categories) raise at once.
    Otherwise bad images drop with their annotations, bad annotations drop alone, and each is
    counted in `summary` by kind with its id; `check_bad_input` then raises or lets it pass.
    """
    if not isinstance(js, dict):
        raise BadInputError(
            f"{source}: expected a JSON object with images/annotations/categories, got {type(js).__name__}"
        )
    for key in ("images", "categories"):
        if not isinstance(js.get(key), list):
            raise BadInputError(f"{source}: '{key}' must be a list, got {type(js.get(key)).__name__}")
    anns = js.get("annotations", [])
    if not isinstance(anns, list):
        raise BadInputError(f"{source}: 'annotations' must be a list, got {type(anns).__name__}")

    summary = BadInputSummary()
    categories: list[dict[str, Any]] = []
    for i, c in enumerate(js["categories"]):
        cid = _int(c.get("id")) if isinstance(c, dict) else None
        if cid is None or cid < 0 or not isinstance(c.get("name"), str):
            raise BadInputError(f"{source}: category #{i} needs an integer id >= 0 and a name, got {c!r}")
        categories.append({"id": cid, "name": c["name"], "supercategory": c.get("supercategory", "")})
    cat_ids = {c["id"] for c in categories}
    if len(cat_ids) != len(categories):
        raise BadInputError(f"{source}: duplicate category ids in {sorted(c['id'] for c in categories)}")

    images: list[tuple[int, str, int, int]] = []
    index_of: dict[int, int] = {}
    skipped_images: set[int] = set()  # their annotations go with them, under the image's count
    for i, im in enumerate(js["images"]):
        iid = _int(im.get("id")) if isinstance(im, dict) else None
        name = im.get("file_name") if isinstance(im, dict) else None
        h = _int(im.get("height")) if isinstance(im, dict) else None
        w = _int(im.get("width")) if isinstance(im, dict) else None
        if iid is None or not isinstance(name, str) or not name or h is None or w is None or h <= 0 or w <= 0:
            summary.add("bad_image_record", f"image #{i} {im!r:.80}")
            if iid is not None:
                skipped_images.add(iid)
            continue
        if iid in index_of:
            summary.add("duplicate_image_id", f"image {iid} ({name})")
            continue
        index_of[iid] = len(images)
        images.append((iid, name, h, w))

    rows: list[tuple[int, int, int, float, float, float, float, int, float]] = []
    seen_ann: set[int] = set()
    clipped = 0
    tol = box_edge_tolerance
    for i, a in enumerate(anns):
        aid = _int(a.get("id")) if isinstance(a, dict) else None
        if aid is None:
            summary.add("bad_annotation_record", f"annotation #{i} {a!r:.80}")
            continue
        iid, cid = _int(a.get("image_id")), _int(a.get("category_id"))
        bbox = a.get("bbox")
        xywh = [_num(v) for v in bbox] if isinstance(bbox, list) and len(bbox) == 4 else None
        crowd = a.get("iscrowd", 0)
        area = _num(a.get("area", 0.0))
        if iid is None or cid is None or xywh is None or None in xywh or crowd not in (0, 1) or area is None:
            summary.add("bad_annotation_record", f"annotation {aid}")
            continue
        if aid in seen_ann:
            summary.add("duplicate_annotation_id", f"annotation {aid}")
            continue
        seen_ann.add(aid)
        if iid in skipped_images and iid not in index_of:
            continue
        if iid not in index_of:
            summary.add("annotation_for_unlisted_image", f"annotation {aid} (image {iid})")
            continue
        if cid not in cat_ids:
            summary.add("unknown_category", f"annotation {aid} (category {cid})")
            continue
        img = index_of[iid]
        _, name, h, w = images[img]
        x, y, bw, bh = xywh
        if bw <= 0 or bh <= 0:
            summary.add("box_zero_size", f"annotation {aid} (bbox {bbox}) in {name}")
            continue
        if x < -tol or y < -tol or x + bw > w + tol or y + bh > h + tol:
            summary.add("box_outside_image", f"annotation {aid} (bbox {bbox}, image {w}x{h}) in {name}")
            continue
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
        if x1 <= x0 or y1 <= y0:
            summary.add("box_zero_size", f"annotation {aid} (bbox {bbox}) in {name}")
            continue
        if (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
            clipped += 1
        rows.append((img, aid, cid, x0, y0, x1 - x0, y1 - y0, int(crowd), area or (x1 - x0) * (y1 - y0)))
    if clipped:
        summary.fixed["box_clipped_to_image"] = clipped

    return CocoIndex(_meta_table(images, rows), categories, summary, source)


def _meta_table(images: list[tuple[int, str, int, int]], rows: list[tuple]) -> pa.Table:
    n = len(images)
    if rows:
        a = np.array([r[:3] for r in rows], dtype=np.int64)  # (A, 3) image index, ann id, category id
        f = np.array([r[3:] for r in rows], dtype=np.float64)  # (A, 6) x, y, w, h, iscrowd, area
        order = np.argsort(a[:, 0], kind="stable")
        a, f = a[order], f[order]
        counts = np.bincount(a[:, 0], minlength=n)
    else:
        a, f, counts = np.zeros((0, 3), np.int64), np.zeros((0, 6)), np.zeros(n, np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)

    def lists(values: np.ndarray, per: int = 1) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets * per, pa.int32()), pa.array(values))

    return pa.Table.from_arrays(
        [
            pa.array([im[0] for im in images], pa.int64()),
            pa.array([im[1] for im in images], pa.string()),
            pa.array([im[2] for im in images], pa.int32()),
            pa.array([im[3] for im in images], pa.int32()),
            pa.array(counts.astype(np.int32)),
            lists(f[:, :4].astype(np.float32).reshape(-1), 4),
            lists(a[:, 2]),
            lists(f[:, 4].astype(np.int8)),
            lists(f[:, 5].astype(np.float32)),
            lists(a[:, 1]),
        ],
        schema=META_SCHEMA,
    )


def check_image_files(index: CocoIndex, images_uri: str, storage_options: Mapping[str, Any] | None = None) -> CocoIndex:
    """Drop (and count) images whose file is missing or empty, from one listing of the folder."""
    sizes = list_file_sizes(images_uri, storage_options)
    names = index.table.column("file_name").to_pylist()
    if names and not sizes:
        # Every file missing is a wrong path in the config, not bad input to skip.
        raise BadInputError(f"no image files under {images_uri} (the annotations list {len(names)} images)")
    ids = index.table.column("image_id").to_pylist()
    keep = np.ones(len(names), dtype=bool)
    for i, (name, iid) in enumerate(zip(names, ids)):
        size = sizes.get(name)
        if size is None:
            index.summary.add("missing_file", f"{name} (image {iid})")
            keep[i] = False
        elif size == 0:
            index.summary.add("empty_file", f"{name} (image {iid})")
            keep[i] = False
    if keep.all():
        return index
    return CocoIndex(index.table.filter(pa.array(keep)), index.categories, index.summary, index.source)


def check_bad_input(summary: BadInputSummary, on_bad_input: Literal["error", "skip"], source: str) -> None:
    """Raise for any recorded bad input unless the config says to skip it."""
    if summary.total and on_bad_input == "error":
        raise BadInputError(
            f"bad input in {source}: {summary}. Fix the data, or set data.on_bad_input=skip "
            "to skip these and report them in the run summary"
        )


def load_coco(
    ann_uri: str,
    images_uri: str | None,
    *,
    storage_options: Mapping[str, Any] | None = None,
    on_bad_input: Literal["error", "skip"] = "error",
    box_edge_tolerance: float = 1.0,
) -> CocoIndex:
    """Parse and check an instances JSON and (when `images_uri` is given) the files it names.

    Raises:
        BadInputError: malformed JSON or structure always; bad images/annotations unless skipping.
    """
    index = parse_instances(load_json(ann_uri, storage_options), source=ann_uri, box_edge_tolerance=box_edge_tolerance)
    if images_uri is not None:
        index = check_image_files(index, images_uri, storage_options)
    check_bad_input(index.summary, on_bad_input, ann_uri)
    return index


def attach_image_bytes(
    meta: pa.Table,
    images_uri: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    threads: int = 16,
    on_bad_input: Literal["error", "skip"] = "error",
) -> tuple[pa.Table, list[tuple[str, str]]]:
    """META_SCHEMA rows -> ROW_SCHEMA rows, reading the image files concurrently.

    A file that vanished or is empty since the listing is bad input: raised, or skipped and
    returned as (kind, "file (image id)") pairs.
    """
    names = meta.column("file_name").to_pylist()
    ids = meta.column("image_id").to_pylist()
    base = images_uri.rstrip("/")
    datas = read_files([f"{base}/{n}" for n in names], storage_options, threads)
    bad: list[tuple[str, str]] = []
    keep = np.ones(len(names), dtype=bool)
    for i, (d, name, iid) in enumerate(zip(datas, names, ids)):
        if isinstance(d, FileNotFoundError):
            bad.append(("missing_file", f"{name} (image {iid})"))
        elif isinstance(d, BaseException):
            raise OSError(f"cannot read image {base}/{name} (image {iid}): {d}") from d
        elif len(d) == 0:
            bad.append(("empty_file", f"{name} (image {iid})"))
        else:
            continue
        keep[i] = False
    if bad:
        summary = BadInputSummary()
        for kind, ident in bad:
            summary.add(kind, ident)
        check_bad_input(summary, on_bad_input, images_uri)
    images = pa.array([d for d, k in zip(datas, keep) if k], pa.binary())
    table = meta.filter(pa.array(keep)) if not keep.all() else meta
    return table.add_column(0, ROW_SCHEMA.field("image"), images), bad
