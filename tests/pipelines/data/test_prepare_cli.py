"""`python -m pipelines.data prepare`: bad fields and bad data are one line, before anything is written."""

from __future__ import annotations

import pytest

from pipelines.data.__main__ import main


def test_bad_fields_and_bad_data_are_one_line(tmp_path, capsys):
    shards = tmp_path / "parquet"
    for argv, named in (
        ([f"root={tmp_path}", f"parquet_dir={shards}", "rows_per_task=0"], "rows_per_task must be >= 1"),
        ([f"root={tmp_path}"], "parquet_dir=... is required"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(["prepare", "--split", "val", *argv])
        assert stop.value.code == 2
        assert named in capsys.readouterr().err.strip().splitlines()[-1]

    assert main(["prepare", "--split", "val", f"root={tmp_path / 'nowhere'}", f"parquet_dir={shards}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: val: annotation file not found: ") and "nowhere" in err[0]
    assert not shards.exists()
