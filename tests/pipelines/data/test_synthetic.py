"""The generated COCO set: valid for pycocotools, deterministic by seed, varied, fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from pipelines.data.synthetic import SHAPES, generate_coco, main


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_by_seed(tmp_path):
    a = generate_coco(tmp_path / "a", 6, 3, seed=5, threads=1)
    b = generate_coco(tmp_path / "b", 6, 3, seed=5, threads=4)
    c = generate_coco(tmp_path / "c", 6, 3, seed=6)
    fa, fb, fc = _files(Path(a["root"])), _files(Path(b["root"])), _files(Path(c["root"]))
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    assert fa["instances_train.json"] != fc["instances_train.json"]


def test_valid_coco_with_gapped_ids_crowds_and_empty_images(tmp_path):
    paths = generate_coco(
        tmp_path,
        40,
        10,
        num_classes=5,
        crowd_fraction=0.3,
        empty_fraction=0.1,
        image_size=((80, 120), (90, 140)),
        seed=1,
    )
    root = Path(paths["root"])
    for split in ("train", "val"):
        coco = COCO(str(root / paths[f"{split}_ann"]))
        assert coco.getCatIds() == [cid for cid, _ in SHAPES[:5]] == [1, 3, 7, 8, 12]
        images = coco.loadImgs(coco.getImgIds())
        for im in images:
            with Image.open(root / paths[f"{split}_images"] / im["file_name"]) as f:
                assert (f.height, f.width, f.format) == (im["height"], im["width"], "JPEG")
            for a in coco.loadAnns(coco.getAnnIds(imgIds=im["id"])):
                x, y, w, h = a["bbox"]
                assert w > 0 and h > 0 and x >= 0 and y >= 0
                assert x + w <= im["width"] and y + h <= im["height"]
    js = json.loads((root / "instances_train.json").read_text())
    per_image = np.bincount([a["image_id"] for a in js["annotations"]], minlength=41)[1:]
    assert (per_image == 0).any(), "some images must have no objects"
    assert per_image.max() > 1, "objects must share images (and overlap)"
    assert any(a["iscrowd"] for a in js["annotations"])
    assert len({a["category_id"] for a in js["annotations"]}) == 5
    sizes = {(im["height"], im["width"]) for im in js["images"]}
    assert len(sizes) > 5, "image sizes vary when a range is given"
    train_ids = {im["id"] for im in js["images"]}
    val_ids = {im["id"] for im in json.loads((root / "instances_val.json").read_text())["images"]}
    assert not train_ids & val_ids


def test_cli_writes_the_sizes_asked_for(tmp_path, capsys):
    main(["--out", str(tmp_path / "cli"), "--num-train", "3", "--num-val", "2", "--seed", "3", "--size", "64x96"])
    out = json.loads(capsys.readouterr().out)
    js = json.loads((Path(out["root"]) / out["val_ann"]).read_text())
    assert [(im["height"], im["width"]) for im in js["images"]] == [(64, 96)] * 2
