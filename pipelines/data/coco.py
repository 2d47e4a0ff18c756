"""COCO instances JSON to validated Arrow rows: parsing, checks, and the summary of bad input skipped.

Legend: K annotations of one image. A row's boxes are COCO pixel `xywh`, flat (K*4,) float32, clipped
to the image; `category_id` keeps COCO's raw ids (the label mapping is applied at decode time, so
prepared Parquet shards don't depend on it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from pipelines.storage import join_uri, list_file_sizes, read_bytes, read_many

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


def load_json(uri: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """Parse a JSON file; malformed or missing files raise errors that name the file."""
    try:
        data = read_bytes(uri, storage_options)
    except FileNotFoundError as e:
        raise BadInputError(f"annotation file not found: {uri}") from e
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"malformed JSON in {uri}: {e}") from e


# --------------------------------------------------------------------------- bad input


@dataclass
class BadInputSummary:
    """Input problems by kind, with the first few offenders (``examples``, keyed by kind).

    ``counts``: skipped input (an error unless data.on_bad_input=skip). ``fixed``: silent-safe repairs
    (boxes clipped to the image). ``flagged``: kept as it is but worth a look (an EXIF orientation tag:
    pixels are used as stored, as COCO's sizes and boxes are).
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    fixed: dict[str, int] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, ident: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._example(kind, ident)

    def flag(self, kind: str, ident: str) -> None:
        self.flagged[kind] = self.flagged.get(kind, 0) + 1
        self._example(kind, ident)

    def _example(self, kind: str, ident: str) -> None:
        ex = self.examples.setdefault(kind, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(ident)

    def merge(self, other: BadInputSummary) -> BadInputSummary:
        out = BadInputSummary.from_dict(self.to_dict())
        for mine, theirs in ((out.counts, other.counts), (out.fixed, other.fixed), (out.flagged, other.flagged)):
            for k, n in theirs.items():
                mine[k] = mine.get(k, 0) + n
        for k, ex in other.examples.items():
            mine_ex = out.examples.setdefault(k, [])
            mine_ex.extend(ex[: MAX_EXAMPLES - len(mine_ex)])
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "examples": {k: list(v) for k, v in self.examples.items()},
            "fixed": dict(self.fixed),
            "flagged": dict(self.flagged),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BadInputSummary:
        return cls(
            dict(d.get("counts", {})),
            {k: list(v) for k, v in d.get("examples", {}).items()},
            dict(d.get("fixed", {})),
            dict(d.get("flagged", {})),
        )

    def __str__(self) -> str:
        if not self.counts and not self.fixed:
            return "no bad input"
        parts = [f"{n} {k} (e.g. {', '.join(self.examples.get(k, []))})" for k, n in sorted(self.counts.items())]
        parts += [f"{n} {k}" for k, n in sorted(self.fixed.items())]
        return "; ".join(parts)


# --------------------------------------------------------------------------- parsing


_INT64 = range(-(2**63), 2**63)  # ids, sizes and labels are stored as int64


def _int(v: Any) -> int | None:
    """``v`` as an int64 when it is one (a whole float counts; bools and ids past int64 do not)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return v if isinstance(v, int) and v in _INT64 else None


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
            raise BadInputError(f"{source}: category #{i} needs an integer id in 0..2^63-1 and a name, got {c!r}")
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
    if sizes is None:
        raise BadInputError(f"image folder not found: {images_uri}")
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
    base = images_uri.partition("?")[0].rstrip("/")  # for messages; reads keep the URI's options
    datas = read_many([join_uri(images_uri, n) for n in names], storage_options, threads)
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
