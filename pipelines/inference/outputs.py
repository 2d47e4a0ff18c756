"""The output folder of batch inference: whole Parquet parts, the job's settings, a manifest, COCO JSON, drawings.

Layout (a local folder or a bucket prefix)::

    part-<16 hex>.parquet   a row per image (steps.RESULT_SCHEMA); the name is a hash of its images' URIs
    _job.json               the settings the rows were made with; a rerun with others is refused
    _manifest.json          the parts, row and detection counts, failures by kind (rewritten at the end)
    _detections_coco.json   with --coco-json: COCO results (image_id, category_id, bbox xywh, score)
    _drawn/*.png            with --draw N: the first N images with their boxes

Every name but the parts' starts with ``_``, which pyarrow datasets, pandas and Ray Data's ``read_parquet``
skip: the folder reads as a Parquet dataset whatever options made it.

Every file is written whole or not at all: locally to a hidden temporary file renamed into place, on an
object store in one upload, which becomes visible only once complete. Readers of ``part-*.parquet`` (and
pyarrow datasets, which skip names starting with ``.`` or ``_``) never see half a file. Each image is in
at most one part: a rerun reads the URIs of the parts present and gives the others to new parts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.inference.sources import split_options
from pipelines.inference.steps import RESULT_SCHEMA
from pipelines.storage import filesystem_for, is_remote, join_uri, write_bytes

PART_PREFIX, PART_SUFFIX = "part-", ".parquet"
JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
COCO_FILE = "_detections_coco.json"
DRAWN_DIR = "_drawn"


class OutputError(ValueError):
    """An output folder that this job may not write to as asked; the message says why."""


def part_name(uris: Iterable[str]) -> str:
    """The deterministic file name of the part holding these images."""
    digest = hashlib.sha1("\n".join(sorted(uris)).encode()).hexdigest()[:16]
    return f"{PART_PREFIX}{digest}{PART_SUFFIX}"


class OutputDir:
    """Reads and writes the files of one output folder or bucket prefix.

    Args:
        uri: local folder or ``s3://``/``gs://`` prefix, optionally with ``?filesystem options``.
    """

    def __init__(self, uri: str) -> None:
        self.base, self.options = split_options(uri)
        self.uri = uri
        self.fs, self.path = filesystem_for(uri)
        self.remote = is_remote(self.base)

    def uri_of(self, rel: str) -> str:
        return f"{self.base.rstrip('/')}/{rel}"

    def prepare(self) -> None:
        """Creates a local folder and removes temporary files that a killed run of ours left in it."""
        if self.remote:
            return
        os.makedirs(self.path, exist_ok=True)
        for folder in (self.path, os.path.join(self.path, DRAWN_DIR)):
            for name in os.listdir(folder) if os.path.isdir(folder) else ():
                if name.startswith(".") and name.endswith(".tmp"):  # storage.write_bytes' temporary files
                    os.unlink(os.path.join(folder, name))

    # ------------------------------------------------------------------ reading

    def _files(self) -> dict[str, int]:
        """Name -> size of every file in the folder (none of its subfolders), by name."""
        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        found = self.fs.get_file_info(selector)
        return dict(sorted((fi.path.rsplit("/", 1)[-1], fi.size) for fi in found if fi.type == pafs.FileType.File))

    def part_sizes(self) -> dict[str, int]:
        """Name -> size of each part file."""
        return {n: size for n, size in self._files().items() if n.startswith(PART_PREFIX) and n.endswith(PART_SUFFIX)}

    def part_files(self) -> list[str]:
        return list(self.part_sizes())

    def read(self, rel: str) -> bytes | None:
        """A file's bytes, None when it does not exist."""
        try:
            with self.fs.open_input_stream(f"{self.path}/{rel}") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:  # S3 reports a missing key as a generic OSError
            if "not found" in str(e).lower() or "no such" in str(e).lower():
                return None
            raise

    def read_part(self, name: str, columns: list[str] | None = None) -> pa.Table:
        data = self.read(name)
        if data is None:
            raise OutputError(f"{self.uri_of(name)} disappeared while the job read the output")
        return pq.read_table(io.BytesIO(data), columns=columns)

    def done_uris(self) -> dict[str, str]:
        """URI -> part file of every image that already has a row.

        Raises:
            OutputError: an image has rows in two parts (a folder written by two jobs at once).
        """
        done: dict[str, str] = {}
        names = self.part_files()
        # Object stores answer many reads at once; thousands of parts would take minutes one by one.
        with ThreadPoolExecutor(max_workers=16 if self.remote else 1) as pool:
            columns = list(pool.map(lambda n: self.read_part(n, ["uri"]).column("uri").to_pylist(), names))
        for name, uris in zip(names, columns):
            for uri in uris:
                if uri in done:
                    raise OutputError(
                        f"{uri} has rows in both {self.uri_of(done[uri])} and {self.uri_of(name)}: "
                        "was this output written by two jobs at once? Remove one of the two parts."
                    )
                done[uri] = name
        return done

    def read_results(self) -> pa.Table:
        """Every row of every part, sorted by URI."""
        tables = [self.read_part(n) for n in self.part_files()]
        if not tables:
            return RESULT_SCHEMA.empty_table()
        table = pa.concat_tables([t.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA) for t in tables])
        return table.sort_by("uri")

    # ------------------------------------------------------------------ writing

    def write(self, rel: str, data: bytes, *, unless_equal: bool = False) -> bool:
        """Writes ``rel`` whole; with ``unless_equal``, leaves an identical file untouched.

        Returns:
            True when the file was written.
        """
        if unless_equal and self.read(rel) == data:
            return False
        write_bytes(join_uri(self.uri, rel), data)
        return True

    def write_part(self, table: pa.Table) -> str:
        """Writes the rows of one part (sorted by URI, RESULT_SCHEMA); returns its file name."""
        table = table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA).sort_by("uri")
        name = part_name(table.column("uri").to_pylist())
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write(name, buf.getvalue())
        return name

    def check_job(self, settings: Mapping[str, Any]) -> None:
        """Records the job's settings on the first run; refuses a rerun whose settings differ.

        Raises:
            OutputError: naming each setting that differs from the one the existing rows were made with.
        """
        old = self.read(JOB_FILE)
        if old is None:
            if self.part_files():
                raise OutputError(f"{self.base} holds part files but no {JOB_FILE}: not an output of this job")
            self.write(JOB_FILE, _json_bytes(settings))
            return
        saved = json.loads(old)
        differ = [f"{k}: output {saved.get(k)!r}, now {v!r}" for k, v in settings.items() if saved.get(k) != v]
        if differ and not self.part_files():  # a first run stopped before any row: nothing to disagree with
            self.write(JOB_FILE, _json_bytes(settings))
        elif differ:
            raise OutputError(
                f"{self.base} holds rows made with other settings ({'; '.join(differ)}); "
                "use a new --output, or the same settings to resume"
            )

    def write_json(self, rel: str, obj: Any) -> bool:
        return self.write(rel, _json_bytes(obj), unless_equal=True)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
