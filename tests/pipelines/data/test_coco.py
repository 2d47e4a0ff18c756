"""Annotation parsing: rows that match the JSON, label mappings, and every kind of bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.categories import CategoryMap
from pipelines.data.coco import (
    MAX_EXAMPLES,
    BadInputError,
    BadInputSummary,
    attach_image_bytes,
    load_coco,
    parse_instances,
)
from pipelines.data.data_config import DataConfig


def _load(paths):
    root = Path(paths["root"])
    return json.loads((root / paths["train_ann"]).read_text()), root / paths["train_images"]


def _write(tmp_path, js, name="ann.json"):
    p = tmp_path / name
    p.write_text(json.dumps(js))
    return str(p)


def test_rows_match_json(coco_paths):
    js, images = _load(coco_paths)
    index = load_coco(str(Path(coco_paths["root"]) / coco_paths["train_ann"]), str(images))
    assert index.summary.total == 0
    rows = {r["image_id"]: r for r in index.table.to_pylist()}
    assert sorted(rows) == sorted(im["id"] for im in js["images"])
    for a in js["annotations"]:
        r = rows[a["image_id"]]
        k = r["ann_id"].index(a["id"])
        np.testing.assert_allclose(r["boxes"][4 * k : 4 * k + 4], a["bbox"], rtol=1e-6)
        assert (r["category_id"][k], r["iscrowd"][k]) == (a["category_id"], a["iscrowd"])
    assert sum(r["num_boxes"] for r in rows.values()) == len(js["annotations"])
    assert any(r["num_boxes"] == 0 for r in rows.values()) or len(rows) < 20


def test_category_maps():
    coco_like = [{"id": i, "name": f"c{i}"} for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    raw = CategoryMap.from_categories(coco_like, "raw")
    assert raw.num_classes == 91 and raw.labels(np.array([1, 90])).tolist() == [1, 90]
    cont = CategoryMap.from_categories(coco_like, "contiguous")
    assert cont.num_classes == 80
    assert cont.labels(np.array([1, 13, 90])).tolist() == [0, 11, 79]
    assert cont.category_ids_of(np.array([0, 11, 79])).tolist() == [1, 13, 90]
    assert CategoryMap.from_dict(cont.to_dict()) == cont
    with pytest.raises(ValueError, match="12"):
        cont.labels(np.array([12]))


def _bad_cases(js):
    """(kind, mutate(js) -> id that must be named)."""
    first_image = js["images"][0]

    def unknown_category(j):
        j["annotations"][0]["category_id"] = 999
        return f"annotation {j['annotations'][0]['id']}"

    def unlisted_image(j):
        j["annotations"][1]["image_id"] = 424242
        return f"annotation {j['annotations'][1]['id']}"

    def outside(j):
        a = j["annotations"][2]
        im = next(i for i in j["images"] if i["id"] == a["image_id"])
        a["bbox"] = [im["width"] - 5.0, 0.0, 20.0, 10.0]
        return f"annotation {a['id']}"

    def zero_size(j):
        j["annotations"][3]["bbox"][2] = 0.0
        return f"annotation {j['annotations'][3]['id']}"

    def malformed_record(j):
        del j["annotations"][4]["bbox"]
        return f"annotation {j['annotations'][4]['id']}"

    def bad_image(j):
        j["images"][1]["height"] = 0
        return "image #1"

    return [
        ("unknown_category", unknown_category),
        ("annotation_for_unlisted_image", unlisted_image),
        ("box_outside_image", outside),
        ("box_zero_size", zero_size),
        ("bad_annotation_record", malformed_record),
        ("bad_image_record", bad_image),
    ], first_image


def test_bad_annotations_error_or_skip(coco_paths, tmp_path):
    js, images = _load(coco_paths)
    cases, _ = _bad_cases(js)
    for kind, mutate in cases:
        j = copy.deepcopy(js)
        ident = mutate(j)
        ann = _write(tmp_path, j)
        with pytest.raises(BadInputError, match=ident):
            load_coco(ann, str(images))
        index = load_coco(ann, str(images), on_bad_input="skip")
        assert index.summary.counts == {kind: 1}, kind
        assert ident in index.summary.examples[kind][0]
        n_ann = sum(r["num_boxes"] for r in index.table.to_pylist())
        if kind == "bad_image_record":
            bad_id = js["images"][1]["id"]
            assert bad_id not in index.table.column("image_id").to_pylist()
            assert n_ann == len(js["annotations"]) - sum(a["image_id"] == bad_id for a in js["annotations"]) - 0
        else:
            assert n_ann == len(js["annotations"]) - 1
    # all at once: one error listing every kind
    j = copy.deepcopy(js)
    for _, mutate in cases:
        mutate(j)
    with pytest.raises(BadInputError) as e:
        load_coco(_write(tmp_path, j), str(images))
    assert all(kind in str(e.value) for kind, _ in cases)


def test_edge_tolerance_clips_and_counts(coco_paths):
    js, _ = _load(coco_paths)
    a = js["annotations"][0]
    im = next(i for i in js["images"] if i["id"] == a["image_id"])
    a["bbox"] = [-0.4, 1.0, im["width"] + 0.7, 5.0]  # 0.4 px past the left edge, 0.3 px past the right
    index = parse_instances(js)
    assert index.summary.total == 0 and index.summary.fixed == {"box_clipped_to_image": 1}
    row = next(r for r in index.table.to_pylist() if r["image_id"] == im["id"])
    k = row["ann_id"].index(a["id"])
    np.testing.assert_allclose(row["boxes"][4 * k : 4 * k + 4], [0, 1, im["width"], 5])
    assert parse_instances(js, box_edge_tolerance=0.1).summary.counts == {"box_outside_image": 1}


def test_ids_past_int64_are_bad_records_not_overflows():
    def js(image_id=1, ann_id=1, category_id=1):
        return {
            "images": [{"id": image_id, "file_name": "a.jpg", "height": 10, "width": 10}],
            "categories": [{"id": category_id, "name": "thing"}],
            "annotations": [{"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [0, 0, 2, 2]}],
        }

    assert parse_instances(js(image_id=2**63 - 1, ann_id=2**63 - 1)).summary.total == 0
    assert parse_instances(js(ann_id=2**63)).summary.counts == {"bad_annotation_record": 1}
    assert parse_instances(js(image_id=2**64)).summary.counts == {"bad_image_record": 1, "bad_annotation_record": 1}
    with pytest.raises(BadInputError, match=r"category #0 needs an integer id in 0\.\.2\^63-1"):
        parse_instances(js(category_id=1e30))


def test_bad_files_and_json(coco_paths, tmp_path):
    js, images = _load(coco_paths)
    folder = tmp_path / "images"
    folder.mkdir()
    for im in js["images"]:
        (folder / im["file_name"]).write_bytes((images / im["file_name"]).read_bytes())
    missing, empty = js["images"][0]["file_name"], js["images"][1]["file_name"]
    (folder / missing).unlink()
    (folder / empty).write_bytes(b"")
    ann = _write(tmp_path, js)
    with pytest.raises(BadInputError, match=missing):
        load_coco(ann, str(folder))
    index = load_coco(ann, str(folder), on_bad_input="skip")
    assert index.summary.counts == {"missing_file": 1, "empty_file": 1}
    assert empty in index.summary.examples["empty_file"][0]
    assert index.table.num_rows == len(js["images"]) - 2
    bad = tmp_path / "broken.json"
    bad.write_text(json.dumps(js)[:-20])
    with pytest.raises(BadInputError, match="malformed JSON in .*broken.json"):
        load_coco(str(bad), str(folder), on_bad_input="skip")
    with pytest.raises(BadInputError, match="not found.*nope.json"):
        load_coco(str(tmp_path / "nope.json"), None)
    with pytest.raises(BadInputError, match="'images' must be a list"):
        parse_instances({"categories": []})
    with pytest.raises(BadInputError, match="image folder not found"):
        load_coco(ann, str(tmp_path / "no_such_folder"))


def test_config_validation_names_fields():
    with pytest.raises(ValueError, match="train_short_sides"):
        DataConfig(train_short_sides=())
    with pytest.raises(ValueError, match="crop_size"):
        DataConfig(crop_size=(600, 384))
    with pytest.raises(ValueError, match="category_ids"):
        DataConfig(category_ids="dense")
    with pytest.raises(ValueError, match="num_workers"):
        DataConfig(num_workers=2)  # extra fields are refused
    cfg = DataConfig(root="s3://bucket/coco", val_ann="/abs/val.json")
    assert cfg.images_uri("train") == "s3://bucket/coco/train2017"
    assert cfg.ann_uri("val") == "/abs/val.json"


def _tiny(images, annotations=(), categories=({"id": 1, "name": "thing"},)):
    """A small instances dict: images as (id, file name), 100x100 each; annotations as given."""
    return {
        "images": [{"id": i, "file_name": n, "height": 100, "width": 100} for i, n in images],
        "categories": [dict(c) for c in categories],
        "annotations": [dict(a) for a in annotations],
    }


def _ann(aid, image_id, bbox=(0, 0, 10, 10), **extra):
    return {"id": aid, "image_id": image_id, "category_id": 1, "bbox": list(bbox), **extra}


def test_annotations_listed_out_of_image_order_stay_with_their_image():
    """Annotations 10, 11, 12 of images 1, 2, 1 in that order: image 1 has 10 and 12, image 2 has 11."""
    js = _tiny(
        [(1, "a.jpg"), (2, "b.jpg")], [_ann(10, 1, (1, 1, 5, 5)), _ann(11, 2, (2, 2, 6, 6)), _ann(12, 1, (3, 3, 7, 7))]
    )
    rows = {r["image_id"]: r for r in parse_instances(js).table.to_pylist()}
    assert rows[1]["ann_id"] == [10, 12] and rows[2]["ann_id"] == [11]
    assert rows[1]["num_boxes"] == 2 and rows[2]["num_boxes"] == 1
    assert rows[1]["boxes"] == [1, 1, 5, 5, 3, 3, 7, 7] and rows[2]["boxes"] == [2, 2, 6, 6]


def test_duplicate_image_ids_are_counted_and_dropped():
    """Two image records with id 1: the second is bad input (duplicate_image_id), one row is kept."""
    index = parse_instances(_tiny([(1, "a.jpg"), (1, "b.jpg")]))
    assert index.summary.counts == {"duplicate_image_id": 1}
    assert "image 1 (b.jpg)" in index.summary.examples["duplicate_image_id"][0]
    assert index.table.column("file_name").to_pylist() == ["a.jpg"]


def test_a_fractional_image_id_is_a_bad_record_not_truncated():
    """Image id 1.5 is not an integer: a bad image record, not image 1. A whole float (2.0) is image 2."""
    index = parse_instances(_tiny([(1.5, "a.jpg"), (2.0, "b.jpg")]))
    assert index.summary.counts == {"bad_image_record": 1}
    assert index.table.column("image_id").to_pylist() == [2]


def test_a_negative_category_id_is_refused():
    """Category id -1: an error naming the category (ids are 0..2^63-1)."""
    with pytest.raises(BadInputError, match=r"category #0 needs an integer id.*'id': -1"):
        parse_instances(_tiny([(1, "a.jpg")], categories=[{"id": -1, "name": "minus"}]))
    assert parse_instances(_tiny([(1, "a.jpg")], categories=[{"id": 0, "name": "zero"}])).categories[0]["id"] == 0


def test_iscrowd_other_than_0_or_1_is_a_bad_annotation():
    """iscrowd 2 is neither a box nor a crowd region: the annotation is skipped as a bad record."""
    index = parse_instances(_tiny([(1, "a.jpg")], [_ann(10, 1, iscrowd=2), _ann(11, 1, iscrowd=1)]))
    assert index.summary.counts == {"bad_annotation_record": 1}
    assert index.summary.examples["bad_annotation_record"] == ["annotation 10"]
    row = index.table.to_pylist()[0]
    assert row["ann_id"] == [11] and row["iscrowd"] == [1]


def test_the_json_area_is_kept():
    """A 10x10 box whose JSON area is 123 (a segmentation's area) keeps 123; COCO's metrics bin by it."""
    index = parse_instances(_tiny([(1, "a.jpg")], [_ann(10, 1, (0, 0, 10, 10), area=123.0)]))
    assert index.table.to_pylist()[0]["area"] == [123.0]


def test_summaries_merge_by_adding():
    """Merging the bad input of two shards adds the counts of each kind and keeps at most MAX_EXAMPLES examples."""
    a = BadInputSummary()
    a.add("x", "x1")
    a.flag("exif_orientation", "e1")
    a.fixed["box_clipped_to_image"] = 4
    b = BadInputSummary()
    for i in range(MAX_EXAMPLES + 2):
        b.add("x" if i < 2 else "y", f"b{i}")
    b.flag("exif_orientation", "e2")
    b.fixed["box_clipped_to_image"] = 1
    m = a.merge(b)
    assert m.counts == {"x": 3, "y": MAX_EXAMPLES} and m.total == 3 + MAX_EXAMPLES
    assert m.fixed == {"box_clipped_to_image": 5} and m.flagged == {"exif_orientation": 2}
    assert m.examples["x"] == ["x1", "b0", "b1"] and m.examples["exif_orientation"] == ["e1", "e2"]
    big = BadInputSummary()
    for i in range(MAX_EXAMPLES):
        big.add("x", f"big{i}")
    assert big.merge(b).examples["x"] == [f"big{i}" for i in range(MAX_EXAMPLES)]
    assert a.counts == {"x": 1}, "merge returns a new summary"


def test_a_file_gone_since_the_listing_is_skipped_and_reported(tmp_path):
    """Reading the image bytes: a listed file that is missing by then is an error naming it, or with
    on_bad_input=skip is left out and reported as missing_file; the other rows keep their bytes."""
    (tmp_path / "a.jpg").write_bytes(b"pixels of a")
    meta = parse_instances(_tiny([(1, "a.jpg"), (2, "gone.jpg")], [_ann(10, 1), _ann(11, 2)])).table
    with pytest.raises(BadInputError, match=r"gone\.jpg \(image 2\)"):
        attach_image_bytes(meta, str(tmp_path), threads=2)
    rows, bad = attach_image_bytes(meta, str(tmp_path), threads=2, on_bad_input="skip")
    assert bad == [("missing_file", "gone.jpg (image 2)")]
    assert rows.num_rows == 1
    row = rows.to_pylist()[0]
    assert (row["image"], row["image_id"], row["ann_id"]) == (b"pixels of a", 1, [10])


def test_category_map_sorts_the_ids():
    """Categories listed as ids 3, 1: the map holds (1, 3) with their names, and raw mode has 4 classes."""
    cats = [{"id": 3, "name": "three"}, {"id": 1, "name": "one"}]
    raw = CategoryMap.from_categories(cats, "raw")
    assert raw.category_ids == (1, 3) and raw.names == ("one", "three") and raw.num_classes == 4
    assert raw.label_to_category_id() == [-1, 1, -1, 3]
    cont = CategoryMap.from_categories(cats, "contiguous")
    assert cont.num_classes == 2 and cont.labels(np.array([3, 1])).tolist() == [1, 0]


def test_contiguous_labels_refuse_ids_past_the_largest():
    """Contiguous labels of ids (1, 3): id 5 is past the largest, an error naming it, not label 1."""
    cont = CategoryMap.from_categories([{"id": 1, "name": "one"}, {"id": 3, "name": "three"}], "contiguous")
    with pytest.raises(ValueError, match=r"\[5\] are not in \[1, 3\]"):
        cont.labels(np.array([1, 5]))
    with pytest.raises(ValueError, match=r"\[0\]"):
        cont.labels(np.array([0]))
