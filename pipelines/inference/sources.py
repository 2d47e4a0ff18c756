"""The images of an inference job: every file under a folder or bucket prefix, or the URIs of a manifest.

A manifest is a ``.txt`` file (one URI or path a line; blank lines and ``#`` comments skipped; relative
paths resolve against the manifest's folder) or a ``.parquet`` file with a ``uri`` (or ``path``) column.
URIs may carry pyarrow filesystem options as a query (``s3://b/p?endpoint_override=host:9000&scheme=http``);
they are split off here, so output rows name images by their plain URI. A manifest's bucket lines all carry
the same query or none: the job reads every image with one set of options.
"""

from __future__ import annotations

import fnmatch
import io
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.storage import absolute, filesystem_for, is_absolute, is_remote, join_uri, shown_query

MANIFEST_SUFFIXES = (".txt", ".parquet")


class InputError(ValueError):
    """An input that names no images, or a manifest that cannot be read; the message names it."""


@dataclass
class ImageList:
    """Sorted, unique image URIs (local paths absolute) and the filesystem options they are read with."""

    uris: list[str]
    storage_options: dict[str, Any] = field(default_factory=dict)
    duplicates: int = 0  # manifest lines naming an image already listed (each image gets one row)


def split_options(uri: str) -> tuple[str, dict[str, Any]]:
    """(plain URI, filesystem options from its ``?query``)."""
    base, _, query = uri.partition("?")
    return base, dict(parse_qsl(query))


def _shown(options: dict[str, Any]) -> str:
    """A query's options for a message, keys hidden: '?endpoint_override=h:9000&secret_key=***'."""
    return "?" + shown_query(options.items()) if options else "(none)"


def plain_uri(scheme_path: str, remote_scheme: str | None) -> str:
    """A pyarrow path (``bucket/key`` or ``/abs/path``) back to a URI of the input's scheme."""
    return f"{remote_scheme}://{scheme_path}" if remote_scheme else scheme_path


def _scheme(uri: str) -> str | None:
    return uri.split("://", 1)[0] if is_remote(uri) else None


def list_images(input_uri: str, glob: str | None = None) -> ImageList:
    """The images of ``input_uri``: a folder, a bucket prefix, or a manifest.

    Args:
        input_uri: local folder, ``s3://``/``gs://`` prefix, or a ``.txt``/``.parquet`` manifest.
        glob: keep only files whose path relative to the folder (manifest: whose URI) matches, e.g.
            ``*.jpg``; ``*`` also matches ``/``. None keeps every file: non-images become error rows.

    Raises:
        InputError: the input does not exist, lists no image, or a manifest is unreadable.
    """
    base, options = split_options(input_uri)
    fs, path = filesystem_for(input_uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise InputError(f"--input {base!r} cannot be listed: {e}") from e
    if info.type == pafs.FileType.File and base.endswith(MANIFEST_SUFFIXES):
        uris, line_options, duplicates = _read_manifest(fs, path, base, glob)
        return ImageList(uris, {**options, **line_options}, duplicates)
    if info.type == pafs.FileType.File:
        raise InputError(
            f"--input {base!r} is a file but not a manifest: expected a folder, a prefix, .txt or .parquet"
        )
    if info.type == pafs.FileType.NotFound and not is_remote(base):
        raise InputError(f"--input {base!r} does not exist")
    scheme = _scheme(base)
    try:
        if scheme is None:
            files = _local_files(path)
        else:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            files = [fi.path for fi in infos if fi.type == pafs.FileType.File]
    except OSError as e:
        raise InputError(f"--input {base!r} cannot be listed: {e}") from e
    uris = []
    for p in files:
        rel = p[len(path) :].lstrip("/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints) are not images anyone meant
        if glob is None or fnmatch.fnmatch(rel, glob):
            uris.append(plain_uri(p, scheme))
    if not uris:
        what = f"no file matching --glob {glob!r}" if glob else "no file"
        raise InputError(f"--input {base!r} holds {what}")
    return ImageList(sorted(uris), options)


def _local_files(folder: str) -> list[str]:
    """Every file under ``folder``, through linked folders, each real folder once: a link back up the tree
    would list it over and over. A link whose target is gone is a file too (its row says unreadable)."""

    def fail(e: OSError) -> None:
        raise e

    seen, files = set(), []
    for root, dirs, names in os.walk(folder, onerror=fail, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()  # a folder reached twice is listed under the first path in name order
        files += [os.path.join(root, name) for name in names]
    return files


def _read_manifest(
    fs: pafs.FileSystem, path: str, base: str, glob: str | None
) -> tuple[list[str], dict[str, Any], int]:
    """(sorted unique image URIs, the filesystem options of the bucket lines' query, lines repeated)."""
    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"manifest {base!r} cannot be read: {e}") from e
    if base.endswith(".parquet"):
        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as e:  # pyarrow raises ArrowInvalid and friends for a damaged file
            raise InputError(f"manifest {base!r} is not a readable Parquet file: {e}") from e
        column = next((c for c in ("uri", "path") if c in table.column_names), None)
        if column is None:
            raise InputError(f"manifest {base!r} needs a 'uri' or 'path' column, has {table.column_names}")
        entries = [(f"row {i}", str(v)) for i, v in enumerate(table.column(column).to_pylist()) if v]
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"manifest {base!r} is not UTF-8 text: {e}") from e
        entries = [(f"line {i}", ln.strip()) for i, ln in enumerate(text.splitlines(), 1)]
        entries = [(where, e) for where, e in entries if e and not e.startswith("#")]
    folder = base.rsplit("/", 1)[0] if "/" in base else "."
    uris, seen, duplicates = [], set(), 0
    options: tuple[str, dict[str, Any]] | None = None  # (the first bucket line, its query's options)
    for where, e in entries:
        uri = absolute(e if is_absolute(e) else join_uri(folder, e))  # a local path, a file:// URI too: absolute
        if is_remote(uri):  # a local file name may hold a '?'
            uri, opts = split_options(uri)
            if options is None:
                options = (where, opts)
            elif opts != options[1]:
                raise InputError(
                    f"manifest {base!r}: {where} has the query {_shown(opts)}, {options[0]} {_shown(options[1])}; "
                    "every bucket line of a manifest needs the same query, or none"
                )
        if glob is not None and not fnmatch.fnmatch(uri, glob):
            continue
        if uri in seen:
            duplicates += 1
            continue
        seen.add(uri)
        uris.append(uri)
    if not uris:
        raise InputError(f"manifest {base!r} lists no image" + (f" matching --glob {glob!r}" if glob else ""))
    return sorted(uris), options[1] if options else {}, duplicates
