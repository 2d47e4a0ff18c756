"""Storage: local paths and s3:// (moto's mock and a real SeaweedFS server on loopback) through the one storage module."""

from __future__ import annotations

import os
from urllib.parse import urlencode

import pyarrow.fs as pafs
import pytest
from s3_servers import CREDENTIALS

from pipelines.storage import (
    absolute,
    fetch_file,
    filesystem_for,
    is_absolute,
    is_remote,
    join_uri,
    list_file_sizes,
    read_bytes,
    split_uri,
    write_bytes,
)


def test_uri_predicates_and_joining():
    assert is_remote("s3://b/k") and is_remote("gs://b/k") and not is_remote("/data/coco")
    assert not is_remote("https://x/y.pth") and is_absolute("https://x/y.pth") and is_absolute("/a")
    assert not is_absolute("data/coco")
    assert absolute("data/coco") == os.path.abspath("data/coco") and absolute("s3://b/k") == "s3://b/k"
    q = "?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri(f"s3://b/runs/{q}", "demo", "config.json") == f"s3://b/runs/demo/config.json{q}"
    assert split_uri(f"s3://b/runs/demo{q}") == (f"s3://b/runs{q}", "demo")
    fs, path = filesystem_for(f"s3://b/runs/demo{q}")
    assert isinstance(fs, pafs.S3FileSystem) and path == "b/runs/demo"
    with pytest.raises(ValueError, match="unsupported URI scheme in 'ftp://h/x'"):
        filesystem_for("ftp://h/x")


def test_local_write_is_whole_or_nothing(tmp_path):
    target = tmp_path / "sub" / "manifest.json"
    write_bytes(str(target), b"first")
    write_bytes(str(target), b"second")
    assert read_bytes(str(target)) == b"second"
    assert os.listdir(target.parent) == ["manifest.json"]  # no temporary file left behind

    with pytest.raises(TypeError):  # the write fails midway (not bytes): the old file stays whole
        write_bytes(str(target), "not bytes")
    assert read_bytes(str(target)) == b"second" and os.listdir(target.parent) == ["manifest.json"]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_bytes(str(tmp_path / "nope.json"))
    assert list_file_sizes(str(tmp_path / "no_such_folder")) is None
    assert fetch_file(str(tmp_path / "a.pt"), str(tmp_path)) == str(tmp_path / "a.pt")
    assert fetch_file("https://example.org/w.pth", str(tmp_path)) == "https://example.org/w.pth"


def test_s3_round_trip_with_options_in_the_uri(s3_options, tmp_path):
    pafs.S3FileSystem(**s3_options, allow_bucket_creation=True).create_dir("storage-test")
    base = "s3://storage-test/runs?" + urlencode(s3_options)
    uri = join_uri(base, "demo", "weights.pt")
    write_bytes(uri, b"\x00\x01weights")
    assert read_bytes(uri) == b"\x00\x01weights"
    assert list_file_sizes(join_uri(base, "demo")) == {"weights.pt": 9}
    local = fetch_file(uri, str(tmp_path))
    assert local == str(tmp_path / "weights.pt") and open(local, "rb").read() == b"\x00\x01weights"
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_bytes(join_uri(base, "missing.pt"))


def test_uri_options_are_read_as_their_types(seaweedfs_server, monkeypatch):
    """``anonymous=false`` in a URI signs the requests: pyarrow alone takes the text "false" for True, and
    the server refuses an unsigned read. A number is a number; an option the filesystem does not have, or a
    value it cannot read, is an error that names both."""
    for name, value in CREDENTIALS.items():  # signed requests take their keys from the environment
        monkeypatch.setenv(name, value)
    seaweedfs_server.create_bucket("typed-options")
    base = "s3://typed-options/k" + seaweedfs_server.endpoint_query
    write_bytes(base, b"signed")
    assert read_bytes(f"{base}&anonymous=false") == b"signed"
    assert read_bytes(f"{base}&connect_timeout=5&load_frequency=60") == b"signed"
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        read_bytes(f"{base}&anonymous=true", retries=1)
    with pytest.raises(
        ValueError, match=r"^s3://b/k\?endpoint=h:9: s3:// has no option 'endpoint'; it has access_key, "
    ):
        filesystem_for("s3://b/k?endpoint=h:9")
    with pytest.raises(ValueError, match=r"option anonymous='maybe': expected true or false"):
        filesystem_for("gs://b/k?anonymous=maybe")
    with pytest.raises(ValueError, match=r"option connect_timeout='soon': expected a number"):
        filesystem_for("s3://b/k", {"connect_timeout": "soon"})


def test_uri_query_wins_over_storage_options():
    """``?region=`` in the URI overrides storage_options' region; options the URI doesn't set still apply."""
    fs, path = filesystem_for("s3://b/k?region=us-east-1", {"region": "eu-west-1"})
    assert isinstance(fs, pafs.S3FileSystem) and fs.region == "us-east-1" and path == "b/k"
    fs, _ = filesystem_for("s3://b/k", {"region": "eu-west-1"})
    assert fs.region == "eu-west-1"


def test_folder_listing_includes_subfolders(tmp_path):
    """Files in subfolders are listed by their path under the folder (COCO file names may hold a folder)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(b"abc")
    (tmp_path / "b.jpg").write_bytes(b"de")
    assert list_file_sizes(str(tmp_path)) == {"sub/a.jpg": 3, "b.jpg": 2}
