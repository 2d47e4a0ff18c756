"""Annotation parsing: rows that match the JSON, label mappings, and every kind of bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.categories import CategoryMap
from pipelines.data.coco import BadInputError, load_coco, parse_instances
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
