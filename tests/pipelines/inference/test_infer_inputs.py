"""Inputs and outputs of batch inference without Ray: listing, manifests, whole writes, one-line errors."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from run_dirs import write_run
from s3_servers import CREDENTIALS, free_ports

from pipelines.infer import main
from pipelines.inference.job import write_manifest
from pipelines.inference.outputs import OutputDir, OutputError, part_name
from pipelines.inference.sources import InputError, list_images
from pipelines.inference.steps import RESULT_SCHEMA


def test_folder_listing_glob_and_hidden_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    for rel in ("x.jpg", "a/y.JPG", "a/b/z.jpg", "a/readme.txt", ".hidden.jpg", ".cache/w.jpg"):
        (tmp_path / rel).write_bytes(b"1")
    (tmp_path / "a" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")  # dangling: still an entry, so a row
    every = list_images(str(tmp_path)).uris
    expected = ("x.jpg", "a/y.JPG", "a/b/z.jpg", "a/readme.txt", "a/gone.jpg")
    assert every == sorted(str(tmp_path / r) for r in expected)
    jpgs = [str(tmp_path / r) for r in ("a/b/z.jpg", "a/gone.jpg", "x.jpg")]
    assert list_images(str(tmp_path), "*.jpg").uris == jpgs
    with pytest.raises(InputError, match=r"holds no file matching --glob '\*.png'"):
        list_images(str(tmp_path), "*.png")
    with pytest.raises(InputError, match="does not exist"):
        list_images(str(tmp_path / "nope"))


def test_a_link_back_up_the_folder_lists_each_image_once(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"1")
    (tmp_path / "a" / "again").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "up").symlink_to(tmp_path)  # two loops: the paths would double at every level
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert list_images(str(tmp_path)).uris == [str(tmp_path / "a" / "x.jpg")]


def test_manifests_txt_and_parquet(tmp_path):
    (tmp_path / "m.txt").write_text(
        "# five images, one twice\na.jpg\n/abs/b.jpg\n\na.jpg\ns3://bucket/c.jpg\nfile:///abs/d.jpg\nsub/../e.jpg\n"
    )
    listed = list_images(str(tmp_path / "m.txt"))
    expected = ["/abs/b.jpg", "/abs/d.jpg", str(tmp_path / "a.jpg"), str(tmp_path / "e.jpg"), "s3://bucket/c.jpg"]
    assert listed.uris == expected and listed.duplicates == 1
    pq.write_table(pa.table({"path": ["a.jpg", "b.png", None]}), tmp_path / "m.parquet")
    assert list_images(str(tmp_path / "m.parquet"), "*.png").uris == [str(tmp_path / "b.png")]
    pq.write_table(pa.table({"name": ["a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"needs a 'uri' or 'path' column, has \['name'\]"):
        list_images(str(tmp_path / "bad.parquet"))
    query = "?endpoint_override=127.0.0.1:9000&scheme=http"
    (tmp_path / "q.txt").write_text(f"s3://b/x.jpg{query}\nb.jpg\ns3://b/x.jpg\ns3://b/y.png{query}\n")
    with pytest.raises(InputError, match=rf"line 3 has the query \(none\), line 1 \{query}; every bucket line"):
        list_images(str(tmp_path / "q.txt"))
    (tmp_path / "q.txt").write_text(f"s3://b/x.jpg{query}\nb.jpg\ns3://b/x.jpg{query}\ns3://b/y.png{query}\n")
    listed = list_images(str(tmp_path / "q.txt"), "*.jpg")  # rows name the plain URI, the glob matches it
    assert listed.uris == [str(tmp_path / "b.jpg"), "s3://b/x.jpg"] and listed.duplicates == 1
    assert listed.storage_options == {"endpoint_override": "127.0.0.1:9000", "scheme": "http"}
    (tmp_path / "k.txt").write_text(f"s3://b/x.jpg{query}&secret_key=abc\ns3://b/y.jpg\n")
    with pytest.raises(InputError, match=r"scheme=http&secret_key=\*\*\*;") as e:
        list_images(str(tmp_path / "k.txt"))
    assert "abc" not in str(e.value)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(InputError, match="lists no image"):
        list_images(str(tmp_path / "empty.txt"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _rows(*uris):
    n = len(uris)
    cols = {"uri": list(uris), "width": [4] * n, "height": [3] * n, "boxes": [[[0, 0, 1, 1]]] * n}
    cols.update(scores=[[0.5]] * n, labels=[[1]] * n, names=[["a"]] * n, error=[None] * n, error_kind=[None] * n)
    cols["exif_orientation"] = [1] * n
    return pa.table(cols, schema=RESULT_SCHEMA)


def test_the_manifest_follows_a_part_written_again(tmp_path):
    """A part deleted by hand (to redo its images) and written again by the next run has the same name:
    the manifest counts what it holds now, not the first write's failure."""
    out = OutputDir(str(tmp_path / "out"))
    out.prepare()
    failed = _rows("/i/a.jpg").set_column(8, "error", pa.array(["read timed out"]))
    name = out.write_part(failed.set_column(9, "error_kind", pa.array(["unreadable"])))
    assert write_manifest(out)["failed"] == {"unreadable": 1}
    (tmp_path / "out" / name).unlink()
    assert out.write_part(_rows("/i/a.jpg")) == name
    manifest = write_manifest(out)
    assert (manifest["failed"], manifest["detections"], manifest["images"]) == ({}, 1, 1)


def test_parts_are_whole_named_by_content_and_never_overlap(tmp_path):
    out = OutputDir(str(tmp_path / "out"))
    out.prepare()
    name = out.write_part(_rows("/i/b.jpg", "/i/a.jpg"))
    assert name == part_name(["/i/a.jpg", "/i/b.jpg"]) and out.part_files() == [name]
    assert pq.read_table(tmp_path / "out" / name).column("uri").to_pylist() == ["/i/a.jpg", "/i/b.jpg"]
    assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o666 & ~_umask()  # not mkstemp's 0600
    (tmp_path / "out" / f".{name}.a1b2c3.tmp").write_bytes(b"half a file")  # as a killed write leaves it
    out.prepare()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [name]
    out.write_part(_rows("/i/a.jpg"))  # the same image in a second part: a broken folder
    with pytest.raises(OutputError, match=r"/i/a.jpg has rows in both .*two jobs at once"):
        out.done_uris()


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["--checkpoint", "c.pt", "--input", str(tmp_path), "--output", "o", "--top-k", "0"]) == 2
    assert capsys.readouterr().err.strip() == "infer: --top-k: Input should be greater than or equal to 1"
    assert main(["--checkpoint", "c.pt", "--input", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "x.jpg").write_bytes(b"1")
    assert (
        main(["--checkpoint", str(tmp_path / "c.pt"), "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"infer: --checkpoint '{tmp_path / 'c.pt'}' cannot be loaded") and "\n" not in err
    assert not (tmp_path / "o").exists(), "a failed start must not write into the output"


def test_a_run_directory_is_read_through_its_best_checkpoint(tmp_path, capsys):
    """--checkpoint <run directory> loads the best kept checkpoint (unreadable here, so the one-line error
    names the folder it resolved to), and a run with none yet is refused by name; nothing is written."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jpg").write_bytes(b"1")
    out = tmp_path / "o"
    best = "checkpoint_epoch0001"
    run_dir = write_run(tmp_path / "run", [("checkpoint_epoch0000", 0.2), (best, 0.4)], latest="checkpoint_epoch0000")
    assert main(["--checkpoint", str(run_dir), "--input", str(tmp_path / "in"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"infer: --checkpoint '{run_dir / best}' cannot be loaded") and "\n" not in err
    empty = write_run(tmp_path / "empty", [], latest=None)
    assert main(["--checkpoint", str(empty), "--input", str(tmp_path / "in"), "--output", str(out)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"infer: --checkpoint '{empty}': {empty}: a run directory with no checkpoint yet (checkpoint_manager_snapshot.json lists none)"
    )
    assert not out.exists()


def test_an_unreachable_endpoint_is_one_line_and_loses_nothing(tmp_path, capsys, monkeypatch, checkpoint, coco):
    """Input, checkpoint and output on a bucket whose endpoint does not answer: one line naming the
    option and the endpoint; the local output of an earlier run stays as it was."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)  # a user with credentials, and the endpoint down
    (port,) = free_ports(1)
    bucket = "s3://nowhere/{}?endpoint_override=127.0.0.1:" + f"{port}&scheme=http"
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-earlier.parquet").write_bytes(b"rows of an earlier run")
    images, ckpt = os.path.join(coco["root"], coco["val_images"]), str(checkpoint.parent)
    runs = {
        "--input": ["--checkpoint", ckpt, "--input", bucket.format("images"), "--output", str(out)],
        "--checkpoint": ["--checkpoint", bucket.format("ckpt"), "--input", images, "--output", str(out)],
        "--output": ["--checkpoint", ckpt, "--input", images, "--output", bucket.format("out")],
    }
    for option, argv in runs.items():
        assert main(argv) == 2, option
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"infer: {option} 's3://nowhere/") and "\n" not in err, err
        assert f"127.0.0.1:{port}" in err, err
        assert os.listdir(out) == ["part-earlier.parquet"]
        assert (out / "part-earlier.parquet").read_bytes() == b"rows of an earlier run"


def test_settings_are_fixed_once_rows_exist(tmp_path):
    out = OutputDir(str(tmp_path))
    out.check_job({"score_threshold": 0.3})
    out.check_job({"score_threshold": 0.5})  # no row yet: a first run stopped early binds nothing
    out.write_part(_rows("/i/a.jpg"))
    out.check_job({"score_threshold": 0.5})
    with pytest.raises(OutputError, match=r"other settings \(score_threshold: output 0.5, now 0.3\)"):
        out.check_job({"score_threshold": 0.3})
