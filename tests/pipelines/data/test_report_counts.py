"""The data report's numbers, from a stand-in DatasetInfo (no Ray): skipped is the total of the counts."""

from __future__ import annotations

from pipelines.data.coco import BadInputSummary
from pipelines.data.report import data_report, format_data_report


class _Info:
    """What data_report reads of a DatasetInfo: source, num_images and the two reports."""

    source = "ann.json"
    num_images = 7

    def __init__(self, bad: BadInputSummary, found: dict):
        self.bad, self.found = bad, found

    def bad_input_report(self) -> BadInputSummary:
        return self.bad

    def found_while_decoding(self) -> dict:
        return self.found


def test_skipped_is_the_number_of_bad_inputs_not_of_kinds():
    """Two missing files and one bad annotation: 3 bad inputs skipped (of 2 kinds)."""
    bad = BadInputSummary()
    bad.add("missing_file", "a.jpg (image 1)")
    bad.add("missing_file", "b.jpg (image 2)")
    bad.add("bad_annotation_record", "annotation 9")
    bad.fixed["box_clipped_to_image"] = 4
    found = {"missing_file": ["a.jpg"]}
    report = data_report({"train": _Info(bad, found)})
    r = report["train"]
    assert r["skipped"] == 3 and r["num_images"] == 7 and r["source"] == "ann.json"
    assert r["counts"] == {"missing_file": 2, "bad_annotation_record": 1}
    assert r["fixed"] == {"box_clipped_to_image": 4} and r["found_while_decoding"] == found
    assert "train: 7 images from ann.json; 3 bad inputs skipped" in format_data_report(report, "skip")
    assert data_report({"val": _Info(BadInputSummary(), {})})["val"]["skipped"] == 0
