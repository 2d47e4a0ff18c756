"""Storage: local paths, ``s3://`` and ``gs://`` URIs through one set of pyarrow filesystem helpers.

A bucket URI may carry filesystem options as a query, ``s3://bucket/prefix?endpoint_override=host:9000&
scheme=http`` (MinIO, moto, fake GCS servers); joining keeps the query at the end. Credentials belong in
the environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...). pyarrow's ``access_key``/
``secret_key``/``session_token`` are taken in a query or ``storage_options`` too (a local test server), but a
config is saved whole in run directories and checkpoints, keys included.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import pyarrow.fs as pafs

T = TypeVar("T")

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://")

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")

# Query options that are secrets: a message shows them as ***.
KEY_OPTIONS = ("access_key", "secret_key", "session_token")


def shown_uri(uri: str) -> str:
    """``uri`` for a message or a log line: its query's keys (KEY_OPTIONS) as ``***``, the rest as written."""
    base, sep, query = uri.partition("?")
    if not query:
        return uri
    return base + sep + shown_query(parse_qsl(query, keep_blank_values=True))


def shown_query(options: Iterable[tuple[str, Any]]) -> str:
    """Query options for a message, keys (KEY_OPTIONS) as ``***``: 'endpoint_override=h:9000&secret_key=***'."""
    return "&".join(f"{k}={'***' if k in KEY_OPTIONS else v}" for k, v in options)


def _flag(text: str) -> bool:
    if text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
    raise ValueError("expected true or false")


def _seconds(text: str) -> timedelta:
    return timedelta(seconds=float(text))


_EXPECTED = {_flag: "true or false", float: "a number", int: "a whole number", _seconds: "a number of seconds"}

# The options a bucket URI's query or ``storage_options`` may give pyarrow's S3FileSystem / GcsFileSystem,
# each with what makes its value from a query's text. pyarrow's own checks would take "false" for True.
_FLAG_S3 = ("anonymous", "background_writes", "allow_delayed_open", "allow_bucket_creation", "allow_bucket_deletion")
_FLAG_S3 += ("check_directory_existence_before_creation", "force_virtual_addressing")
_TEXT_S3 = ("region", "access_key", "secret_key", "session_token", "role_arn", "session_name", "external_id")
_TEXT_S3 += ("proxy_options", "tls_ca_file_path")
_TEXT_GS = ("default_bucket_location", "project_id", "target_service_account")
_FS_OPTIONS: dict[str, dict[str, Callable[[str], Any]]] = {
    "s3": {
        **dict.fromkeys(_FLAG_S3, _flag),
        **dict.fromkeys(("request_timeout", "connect_timeout"), float),
        "load_frequency": int,
        **dict.fromkeys(("scheme", "endpoint_override", *_TEXT_S3), str),
    },
    "gs": {
        "anonymous": _flag,
        "retry_time_limit": _seconds,
        **dict.fromkeys(("scheme", "endpoint_override", *_TEXT_GS), str),
    },
}

_FS_CACHE: dict[tuple, pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()


def is_remote(uri: str | os.PathLike) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``, ``gcs://``)."""
    return str(uri).startswith(REMOTE_SCHEMES)


def has_scheme(uri: str | os.PathLike) -> bool:
    """True for any ``scheme://`` URI (object stores, ``http(s)://``, ``file://``), False for a plain path."""
    return "://" in str(uri)


def is_absolute(uri: str | os.PathLike) -> bool:
    """A URI with a scheme or an absolute local path: what a relative part must not be joined onto."""
    return has_scheme(uri) or os.path.isabs(str(uri))


def local_path(uri: str | os.PathLike) -> str:
    """The absolute local path of a plain path or ``file://`` URI (``~`` expanded).

    Raises:
        ValueError: ``uri`` names an object store or another scheme.
    """
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif has_scheme(uri):
        raise ValueError(f"expected a local path, got {shown_uri(uri)!r}")
    return os.path.abspath(os.path.expanduser(uri))


def absolute(uri: str | os.PathLike) -> str:
    """A local path made absolute (workers may run in another directory); URIs unchanged."""
    return str(uri) if has_scheme(uri) and not str(uri).startswith("file://") else local_path(uri)


def filesystem_for(
    uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it (``bucket/key`` for object stores).

    Options come from ``storage_options`` and, for bucket URIs, from the URI's ``?key=value`` query
    (which wins); text values are read as the option's type (``anonymous=false``, ``connect_timeout=5``).
    Filesystems are built explicitly rather than with ``FileSystem.from_uri``, which makes a network call
    to find an S3 bucket's region, and cached per process and options.

    Raises:
        ValueError: an unsupported scheme (http, ftp, ...), or an option the scheme's filesystem does not
            take or a value it cannot read (the message names the option and the URI).
    """
    uri = str(uri)
    opts = dict(storage_options or {})
    if is_remote(uri):
        base, _, query = uri.partition("?")
        opts.update(parse_qsl(query))
        scheme = "s3" if base.startswith("s3://") else "gs"
        path = base.split("://", 1)[1]
        opts = _typed_options(scheme, opts, uri)
    elif has_scheme(uri) and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {shown_uri(uri)!r}: expected a local path, s3:// or gs://")
    else:
        scheme, path, opts = "local", local_path(uri), {}
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
    return fs, path.rstrip("/") if len(path) > 1 else path


def _typed_options(scheme: str, opts: dict[str, Any], uri: str) -> dict[str, Any]:
    """``opts`` with each text value read as its option's type (``_FS_OPTIONS[scheme]``)."""
    known = _FS_OPTIONS[scheme]
    typed = {}
    for name, value in opts.items():
        if name not in known:
            written = uri.split("://", 1)[0]
            raise ValueError(
                f"{shown_uri(uri)}: {written}:// has no option {name!r}; it has {', '.join(sorted(known))}"
            )
        if isinstance(value, str):
            try:
                value = known[name](value)
            except ValueError as e:
                raise ValueError(f"{shown_uri(uri)}: option {name}={value!r}: expected {_EXPECTED[known[name]]}") from e
        typed[name] = value
    return typed


def join_uri(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or bucket URI, keeping a bucket URI's ``?options`` at the end."""
    path, sep, query = base.partition("?")
    joined = "/".join([path.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return joined + sep + query


def split_uri(uri: str) -> tuple[str, str]:
    """(parent, last part) of a path or URI: the inverse of ``join_uri(parent, name)``."""
    path, sep, query = uri.partition("?")
    parent, _, name = path.rstrip("/").rpartition("/")
    return parent + sep + query, name


def _not_found(e: OSError) -> bool:
    msg = str(e).lower()
    return isinstance(e, FileNotFoundError) or "not found" in msg or "no such file" in msg or "does not exist" in msg


def read_bytes(uri: str, storage_options: Mapping[str, Any] | None = None, *, retries: int = 3) -> bytes:
    """All bytes of one file, one whole version of it (``_one_version``).

    Raises:
        FileNotFoundError: no such file (the message names ``uri``).
        OSError: still failing (or changing) after ``retries`` attempts.
    """
    fs, path = filesystem_for(uri, storage_options)
    return _one_version(uri, fs, path, lambda f: f.read(), retries)


def _one_version(uri: str, fs: pafs.FileSystem, path: str, read: Callable[[Any], T], retries: int = 3) -> T:
    """``read`` of one file's input stream, over one whole version of it. Transient object-store errors
    are retried; a missing file is not.

    pyarrow reads an object as a HEAD (its size and ETag) and ranged GETs: a writer overwriting it in
    between would hand the reader a mix of two versions, or the new one cut at the old one's size. The
    ETag is asked again after the read; a file that changed meanwhile is read again.
    """
    for attempt in range(retries):
        try:
            with fs.open_input_stream(path) as f:
                version = f.metadata().get("ETag")  # object stores only; local reads are one file
                result = read(f)
            if version is None or _etag(fs, path) == version:
                return result
            problem: object = "it changed while being read"
        except OSError as e:
            if _not_found(e):
                raise FileNotFoundError(f"{shown_uri(uri)}: no such file") from e
            problem = e
        if attempt == retries - 1:
            raise OSError(f"cannot read {shown_uri(uri)} after {retries} attempts: {problem}") from (
                problem if isinstance(problem, OSError) else None
            )
        time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def _etag(fs: pafs.FileSystem, path: str) -> bytes | None:
    with fs.open_input_stream(path) as f:  # a HEAD, nothing read
        return f.metadata().get("ETag")


def read_many(
    uris: Sequence[str], storage_options: Mapping[str, Any] | None = None, threads: int = 16
) -> list[bytes | BaseException]:
    """Reads many files concurrently (object stores need concurrency, not cores); errors are returned."""

    def one(u: str) -> bytes | BaseException:
        try:
            return read_bytes(u, storage_options)
        except OSError as e:  # FileNotFoundError included
            return e

    if len(uris) <= 1 or threads <= 1:
        return [one(u) for u in uris]
    with ThreadPoolExecutor(max_workers=min(threads, len(uris))) as pool:
        return list(pool.map(one, uris))


def write_bytes(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Writes one file whole or not at all.

    On local disk: a temporary file in the same folder, then an atomic rename. An object-store PUT is
    atomic already (a reader sees the old object or the new one, never a part).
    """
    fs, path = filesystem_for(uri, storage_options)
    if not is_remote(uri):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        # os.open with 0o666 lets the umask decide, as for any new file (mkstemp would make it 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


def file_type(uri: str, storage_options: Mapping[str, Any] | None = None) -> pafs.FileType:
    """File, Directory or NotFound (an empty bucket prefix reads as NotFound: object stores have no folders)."""
    fs, path = filesystem_for(uri, storage_options)
    return fs.get_file_info(path).type


def list_file_sizes(dir_uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, int] | None:
    """Size of every file under a folder or bucket prefix, keyed by path relative to it (one listing).

    Returns:
        None when a local folder does not exist (a bucket prefix without objects lists as empty).
    """
    fs, base = filesystem_for(dir_uri, storage_options)
    if not is_remote(dir_uri) and fs.get_file_info(base).type == pafs.FileType.NotFound:
        return None
    sizes: dict[str, int] = {}
    for fi in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
        if fi.type == pafs.FileType.File:
            sizes[fi.path[len(base) :].lstrip("/")] = fi.size
    return sizes


def fetch_file(uri: str, dest_dir: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """A local path holding the file ``uri`` names.

    Bucket objects are copied into ``dest_dir``; local paths come back as they are (absolute);
    ``http(s)://`` URLs come back unchanged, for readers that download them (``torch.hub``).
    """
    if is_remote(uri):
        fs, path = filesystem_for(uri, storage_options)
        local = os.path.join(dest_dir, os.path.basename(path))

        def copy(src) -> None:
            with open(local, "wb") as dst:
                # Big reads: an object-store stream may answer each read with its own ranged GET.
                shutil.copyfileobj(src, dst, length=16 * 1024**2)

        _one_version(uri, fs, path, copy)  # one whole version, as read_bytes
        return local
    if uri.startswith(("http://", "https://")):
        return uri
    return local_path(uri)
