"""What a mock S3 hides, on a real server (SeaweedFS) through the project's own bucket code: listings
past one page, multipart uploads, reads racing an overwrite."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlencode

import pyarrow.fs as pafs

from pipelines.inference.sources import list_images
from pipelines.storage import fetch_file, filesystem_for, join_uri, list_file_sizes, read_bytes, write_bytes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUCKET = "hidden-by-mocks"
PAGE = 1000  # S3's ListObjectsV2 answers at most this many keys; the rest take continuation requests
PART = 10 * 2**20  # pyarrow's S3 upload part: every write is a multipart upload, of one part up to here


def _base(server) -> str:
    server.create_bucket(BUCKET)
    return f"s3://{BUCKET}?" + urlencode(server.options)


def _etag(uri: str) -> str:
    fs, path = filesystem_for(uri)
    with fs.open_input_stream(path) as f:
        return f.metadata()["ETag"].decode().strip('"')


def test_listings_go_past_the_first_page(seaweedfs_server):
    base = join_uri(_base(seaweedfs_server), "many")
    names = [f"img{i:05d}.jpg" for i in range(PAGE + 3)]
    # One PUT per object (no multipart start and end): 1003 uploads in a couple of seconds.
    fs = pafs.S3FileSystem(**seaweedfs_server.options, allow_delayed_open=True)

    def put(name: str) -> None:
        with fs.open_output_stream(f"{BUCKET}/many/{name}") as f:
            f.write(b"x" * (1 + len(name) % 7))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, names))
    sizes = list_file_sizes(base)  # the data reader's one listing of an image folder
    assert sorted(sizes) == names and sizes[names[-1]] == 1 + len(names[-1]) % 7
    listed = list_images(base)  # the inference job's listing of its input prefix
    assert listed.uris == [f"s3://{BUCKET}/many/{n}" for n in names]


def test_an_upload_of_several_parts_reads_back_whole(seaweedfs_server, tmp_path):
    uri = join_uri(_base(seaweedfs_server), "runs", "big", "checkpoint.pt")
    data = os.urandom(PART + 1)
    write_bytes(uri, data)
    assert _etag(uri).endswith("-2")  # the server assembled two parts
    assert read_bytes(uri) == data
    with open(fetch_file(uri, str(tmp_path)), "rb") as f:
        assert f.read() == data


def _version(i: int) -> bytes:
    """Version i of the object: every byte i, and a size of its own (a cut or a mix shows)."""
    return bytes([i]) * (2**20 + i * 2**16)


def test_a_read_racing_an_overwrite_gets_one_whole_version(seaweedfs_server, tmp_path):
    """Both ways of reading an object: into memory (read_bytes) and into a local file (fetch_file, which
    checkpoints and exported models take)."""
    uri = join_uri(_base(seaweedfs_server), "overwritten.bin")
    write_bytes(uri, _version(0))
    versions = 80
    writer = (
        "import sys, time\n"
        "from pipelines.storage import write_bytes\n"
        f"for i in range(1, {versions}):\n"
        "    write_bytes(sys.argv[1], bytes([i]) * (2**20 + i * 2**16))\n"
        "    time.sleep(0.05)\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    proc = subprocess.Popen([sys.executable, "-c", writer, uri], env=env)
    readers = {"read_bytes": read_bytes, "fetch_file": lambda u: Path(fetch_file(u, str(tmp_path))).read_bytes()}
    seen, changing = {name: [] for name in readers}, 0
    try:
        while proc.poll() is None:
            for name, read in readers.items():
                try:
                    data = read(uri)
                except OSError as e:
                    assert "changed while being read" in str(e), e
                    changing += 1
                    continue
                assert data == _version(data[0]), f"{name}: {len(data)} bytes, not one whole version {data[0]}"
                seen[name].append(data[0])
    finally:
        proc.wait()
    assert proc.returncode == 0
    for versions_read in seen.values():  # the reads overlapped the writes
        assert len(set(versions_read)) >= 3, (seen, changing)
    assert read_bytes(uri) == _version(versions - 1)


def test_messages_show_the_keys_of_a_uri_as_stars(seaweedfs_server, capsys):
    """Keys written into a bucket URI's query reach the server, never a message: a missing checkpoint
    given to the three tools that read one (evaluate, export, infer share its reading)."""
    from pipelines import evaluate, export

    missing = join_uri(_base(seaweedfs_server), "runs", "missing.pt")
    secret = seaweedfs_server.options["secret_key"]
    try:
        read_bytes(missing)
    except FileNotFoundError as e:
        message = str(e)
    assert "secret_key=***" in message and secret not in message, message
    assert evaluate.main(["--checkpoint", missing]) == 2
    assert export.main(["--checkpoint", missing, "--format", "onnx", "--output", "unused.onnx"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 2 and err.count("no such file") == 2 and secret not in err, err
