"""The Ray Data pipeline end to end on a local Ray: JSON to batches, Parquet, order, bad input, shards."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.data.batching import DetectionCollate, iter_batches, to_model_batch
from pipelines.data.categories import CategoryMap
from pipelines.data.coco import BadInputError
from pipelines.data.datasets import EpochClock, build_dataset, build_raw_dataset, ingest_options
from pipelines.data.parquet import prepare_parquet
from pipelines.data.transforms import Affine, boxes_cxcywh_normalized_to_xyxy

pytestmark = pytest.mark.ray

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _json(paths, split):
    return json.loads((Path(paths["root"]) / paths[f"{split}_ann"]).read_text())


def _check_targets_against_json(flat, batch, js, categories: CategoryMap, keep_crowd: bool):
    """Every box mapped back to original pixels equals its annotation clipped to the visible window."""
    images = {im["id"]: im for im in js["images"]}
    anns = {}
    for a in js["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    for i, t in enumerate(batch["targets"]):
        im = images[t["image_id"]]
        h, w = t["size"].tolist()
        assert t["orig_size"].tolist() == [im["height"], im["width"]]
        assert not batch["mask"][i, :h, :w].any() and batch["mask"][i].sum() == batch["mask"][i].numel() - h * w
        inv = Affine(*flat["affine"][i].tolist()).inverse()
        window = inv.apply(np.array([[0, 0, w, h]], np.float32))[0]
        back = inv.apply(boxes_cxcywh_normalized_to_xyxy(t["boxes"].numpy(), h, w))
        got = dict(zip(t["ann_id"].tolist(), range(len(back))))
        for a in anns.get(t["image_id"], []):
            if a["iscrowd"] and not keep_crowd:
                assert a["id"] not in got, "crowd boxes are not training targets"
                continue
            x, y, bw, bh = a["bbox"]
            clipped = np.array([max(x, window[0]), max(y, window[1]), min(x + bw, window[2]), min(y + bh, window[3])])
            if a["id"] in got:
                k = got[a["id"]]
                np.testing.assert_allclose(back[k], clipped, atol=0.02)
                assert t["labels"][k].item() == categories.labels(np.array([a["category_id"]]))[0]
                assert bool(t["iscrowd"][k]) == bool(a["iscrowd"])
            else:  # emptied by the crop
                assert clipped[2] - clipped[0] < 0.02 or clipped[3] - clipped[1] < 0.02, a["id"]


def test_round_trip_json_to_batches(ray_local, make_config, coco_paths):
    cfg = make_config(category_ids="contiguous")
    ds, info = build_dataset(cfg, "train")
    js = _json(coco_paths, "train")
    assert info.num_images == len(js["images"]) and info.num_classes == 4
    assert info.to_dict()["categories"]["label_to_category_id"] == [1, 3, 7, 8]
    seen, flips, crops = [], 0, 0
    for flat in ds.iter_torch_batches(batch_size=5, collate_fn=DetectionCollate()):
        batch = to_model_batch(flat, pixel_mean=MEAN, pixel_std=STD, device="cpu")
        assert batch["images"].dtype == torch.float32 and batch["images"].shape[0] == len(batch["targets"])
        _check_targets_against_json(flat, batch, js, info.categories, keep_crowd=False)
        seen += [t["image_id"] for t in batch["targets"]]
        flips += int((flat["affine"][:, 0] < 0).sum())
        crops += int(((flat["affine"][:, 1] < 0) & (flat["affine"][:, 0] > 0)).sum())
        for t in batch["targets"]:
            short, long = min(t["size"].tolist()), max(t["size"].tolist())
            assert (short in cfg.train_short_sides and long <= cfg.max_size) or abs(long - cfg.max_size) <= 2
    assert sorted(seen) == sorted(im["id"] for im in js["images"])
    assert flips and crops, "both flip and crop ran"


def test_val_keeps_order_and_crowd(ray_local, make_config, coco_paths):
    cfg = make_config()
    ds, info = build_dataset(cfg, "val")
    js = _json(coco_paths, "val")
    assert info.num_classes == 9, "raw ids 1, 3, 7, 8 -> a 9-way head, as COCO's 91"
    order, crowd = [], 0
    for flat in ds.iter_torch_batches(batch_size=3, collate_fn=DetectionCollate()):
        batch = to_model_batch(flat, pixel_mean=MEAN, pixel_std=STD, device="cpu")
        _check_targets_against_json(flat, batch, js, info.categories, keep_crowd=True)
        assert (flat["affine"][:, 1] == 0).all() and (flat["affine"][:, 0] > 0).all(), "no flip, no crop"
        for t in batch["targets"]:
            assert min(t["size"].tolist()) == cfg.val_short_side
            assert len(t["boxes"]) == sum(a["image_id"] == t["image_id"] for a in js["annotations"])
            crowd += int(t["iscrowd"].sum())
        order += [t["image_id"] for t in batch["targets"]]
    assert order == [im["id"] for im in js["images"]]
    assert crowd == sum(a["iscrowd"] for a in js["annotations"]) > 0


def _epoch(ds, epoch, seed=0):
    out = []
    for b in iter_batches(ds, 4, seed, epoch, device="cpu"):
        out += [(t["image_id"], tuple(t["size"].tolist()), t["boxes"].numpy().round(5).tobytes()) for t in b["targets"]]
    return out


def test_order_and_augmentation_reproducible_per_seed_and_epoch(ray_local, make_config, caplog):
    cfg = make_config()
    ds, _ = build_dataset(cfg, "train")
    e0, e1 = _epoch(ds, 0), _epoch(ds, 1)
    assert [r[0] for r in e0] != [r[0] for r in e1] and sorted(e0) != sorted(e1)
    assert sorted(r[0] for r in e0) == sorted(r[0] for r in e1)
    assert _epoch(build_dataset(cfg, "train")[0], 0) == e0
    assert _epoch(build_dataset(cfg, "train", start_epoch=1)[0], 1) == e1, "resuming at epoch 1"
    other = _epoch(build_dataset(make_config(seed=cfg.seed + 1), "train")[0], 0)
    assert [r[0] for r in other] != [r[0] for r in e0]
    with caplog.at_level(logging.WARNING, logger="pipelines.data"):
        _epoch(ds, 0)  # the third run of `ds` is epoch 2
    assert "epoch(s) [2]" in caplog.text


def test_an_epoch_clock_sets_the_epoch_whatever_ran_before(ray_local, make_config, caplog):
    import ray

    cfg = make_config()
    e0, e1 = _epoch(build_dataset(cfg, "train")[0], 0), _epoch(build_dataset(cfg, "train", start_epoch=1)[0], 1)
    clock = EpochClock.remote(1)
    ds, _ = build_dataset(cfg, "train", epoch_clock=clock)
    with caplog.at_level(logging.WARNING, logger="pipelines.data"):
        assert _epoch(ds, 1) == e1
        # A restarted loop goes back to epoch 0 on a dataset that has run before: no counting of runs.
        ray.get(clock.set.remote(0))
        assert _epoch(ds, 0) == e0
        assert _epoch(ds, 0) == e0
    assert "augmentation was drawn" not in caplog.text


def test_parquet_shards_give_the_same_rows(ray_local, make_config, tmp_path):
    folder_cfg = make_config()
    cfg = make_config(parquet_dir=str(tmp_path / "parquet"))
    with pytest.raises(BadInputError, match="no prepared Parquet shards"):
        build_dataset(cfg, "train")
    manifest = json.loads(Path(prepare_parquet(cfg, "train")).read_text())
    assert manifest["num_images"] == 24 and len(manifest["shards"]) == 3
    assert all(g <= cfg.rows_per_task for s in manifest["shards"] for g in s["row_groups"])

    def rows(c):
        return sorted(build_raw_dataset(c, "train")[0].take_all(), key=lambda r: r["image_id"])

    a, b = rows(folder_cfg), rows(cfg)
    assert len(a) == len(b) == 24
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            np.testing.assert_array_equal(np.asarray(ra[k]), np.asarray(rb[k]), err_msg=k)

    def samples(c):
        ds, _ = build_dataset(c, "train", augment=False, shuffle=False)
        out = {}
        for flat in ds.iter_torch_batches(batch_size=8, collate_fn=DetectionCollate()):
            batch = to_model_batch(flat, pixel_mean=MEAN, pixel_std=STD)
            for i, t in enumerate(batch["targets"]):
                h, w = t["size"].tolist()
                out[t["image_id"]] = (batch["images"][i, :, :h, :w].clone(), t["boxes"], t["labels"])
        return out

    sa, sb = samples(folder_cfg), samples(cfg)
    assert sa.keys() == sb.keys()
    for k in sa:
        for x, y in zip(sa[k], sb[k]):
            torch.testing.assert_close(x, y)
    shuffled, _ = build_dataset(cfg, "train")
    e0, e1 = _epoch(shuffled, 0), _epoch(shuffled, 1)
    assert sorted(r[0] for r in e0) == sorted(r[0] for r in e1) == sorted(sa)
    assert [r[0] for r in e0] != [r[0] for r in e1]


def test_bad_images_error_or_skip_and_summary(ray_local, make_config, coco_paths, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_paths["root"], root)
    js = _json(coco_paths, "train")
    truncated, resized, missing = (im["file_name"] for im in js["images"][:3])
    data = (root / "train" / truncated).read_bytes()
    (root / "train" / truncated).write_bytes(data[: len(data) // 2])
    js["images"][1]["height"] += 3  # the file no longer matches its annotation
    (root / "train" / missing).unlink()
    js["annotations"][-1]["category_id"] = 5  # not a category
    (root / "instances_train.json").write_text(json.dumps(js))

    with pytest.raises(BadInputError, match=missing):
        build_dataset(make_config(root=str(root)), "train")
    (root / "train" / missing).write_bytes(b"")  # now present but empty: still reported
    with pytest.raises(BadInputError, match=missing):
        build_dataset(make_config(root=str(root)), "train")
    (root / "train" / missing).write_bytes((Path(coco_paths["root"]) / "train" / missing).read_bytes())
    js["annotations"][-1]["category_id"] = js["categories"][0]["id"]
    (root / "instances_train.json").write_text(json.dumps(js))

    ds, _ = build_dataset(make_config(root=str(root)), "train", shuffle=False)
    with pytest.raises(Exception) as e:  # Ray wraps the task's BadInputError
        for _ in iter_batches(ds, 4, device="cpu"):
            pass
    assert truncated in str(e.value) or resized in str(e.value)

    (root / "train" / missing).unlink()
    js["annotations"][-1]["category_id"] = 5
    (root / "instances_train.json").write_text(json.dumps(js))
    ds, info = build_dataset(make_config(root=str(root), on_bad_input="skip"), "train")
    ids = [t["image_id"] for b in iter_batches(ds, 4, device="cpu") for t in b["targets"]]
    assert sorted(ids) == sorted(im["id"] for im in js["images"][3:])
    report = info.bad_input_report()
    assert report.counts == {"undecodable_image": 1, "size_mismatch": 1, "missing_file": 1, "unknown_category": 1}
    assert truncated in report.examples["undecodable_image"][0] and resized in report.examples["size_mismatch"][0]
    _ = [b for b in iter_batches(ds, 4, 0, 1, device="cpu")]
    assert info.bad_input_report().counts == report.counts, "a file is counted once, not once per epoch"
    assert info.to_dict()["bad_input"]["counts"] == report.counts


@pytest.mark.slow
def test_ray_train_workers_get_disjoint_shards_reshuffled_each_epoch(ray_local, make_config, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    ds, _ = build_dataset(make_config(), "train")

    def loop(config):
        shard = ray.train.get_dataset_shard("train")
        rank = ray.train.get_context().get_world_rank()
        epochs = [[t["image_id"] for b in iter_batches(shard, 4, 0, e) for t in b["targets"]] for e in range(2)]
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps(epochs))

    trainer = TorchTrainer(
        loop,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.25}),
        run_config=ray.train.RunConfig(name="shards", storage_path=str(tmp_path / "runs")),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(execution_options=ingest_options()),
    )
    trainer.fit()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for e in range(2):
        assert len(r0[e]) == len(r1[e]) == 12 and not set(r0[e]) & set(r1[e])
    assert r0[0] != r0[1]
    single = _epoch(build_dataset(make_config(), "train")[0], 0)
    assert sorted(r0[0] + r1[0]) == sorted(r[0] for r in single)
