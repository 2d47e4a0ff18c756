"""Checkpoint tests: our format and the authors' released format, round trips, fine-tuning with new classes."""

import argparse
import fractions
import json
import logging
import math
import os
import pickle
import stat

import pytest
import torch
from http_files import serve_folder
from tiny import TINY_SIZES, tiny_config

from core import (
    CHECKPOINT_FORMAT,
    DetrConfig,
    build_model,
    load_checkpoint,
    load_model_weights,
    read_checkpoint,
    save_checkpoint,
)


def trained_looking(model):
    """Perturbs every weight so a load that silently kept the initialization would be noticed."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def outputs_of(model):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 64:] = True
    model.eval()
    with torch.no_grad():
        return model(images, mask)


def authors_args(**overrides) -> argparse.Namespace:
    """An args namespace with the authors' flag names and defaults (main.py), as their files pickle it."""
    args = dict(
        lr=2e-4,
        lr_backbone_names=["backbone.0"],
        lr_backbone=2e-5,
        lr_linear_proj_names=["reference_points", "sampling_offsets"],
        lr_linear_proj_mult=0.1,
        batch_size=2,
        weight_decay=1e-4,
        epochs=50,
        lr_drop=40,
        lr_drop_epochs=None,
        clip_max_norm=0.1,
        sgd=False,
        with_box_refine=False,
        two_stage=False,
        frozen_weights=None,
        backbone="resnet50",
        dilation=False,
        position_embedding="sine",
        position_embedding_scale=2 * math.pi,
        num_feature_levels=4,
        enc_layers=6,
        dec_layers=6,
        dim_feedforward=1024,
        hidden_dim=256,
        dropout=0.1,
        nheads=8,
        num_queries=300,
        dec_n_points=4,
        enc_n_points=4,
        masks=False,
        aux_loss=True,
        set_cost_class=2,
        set_cost_bbox=5,
        set_cost_giou=2,
        mask_loss_coef=1,
        dice_loss_coef=1,
        cls_loss_coef=2,
        bbox_loss_coef=5,
        giou_loss_coef=2,
        focal_alpha=0.25,
        dataset_file="coco",
        coco_path="./data/coco",
        output_dir="exps/r50_deformable_detr",
        device="cuda",
        seed=42,
        resume="",
        start_epoch=0,
        eval=False,
        num_workers=2,
        cache_mode=False,
        distributed=True,
        rank=0,
        world_size=8,
    )
    args.update(overrides)
    return argparse.Namespace(**args)


def test_our_format_round_trip(tmp_path):
    cfg = tiny_config(with_box_refine=True)
    model, _, _ = build_model(cfg)
    trained_looking(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    meta = {"category_ids": [1, 2, 3, 5, 7], "category_names": ["a", "b", "c", "d", "e"]}
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, cfg, meta=meta, optimizer=optimizer.state_dict(), epoch=3)

    raw = torch.load(path, weights_only=True)  # our format needs no unpickling of classes
    assert raw["format"] == CHECKPOINT_FORMAT and DetrConfig.model_validate_json(raw["config"]) == cfg

    loaded, criterion, postprocessor, ckpt = load_checkpoint(path)
    assert ckpt.config == cfg and ckpt.meta == meta and ckpt.extra["epoch"] == 3
    assert "optimizer" in ckpt.extra and ckpt.source_format == CHECKPOINT_FORMAT
    expected, actual = outputs_of(model), outputs_of(loaded)
    torch.testing.assert_close(actual["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0)
    torch.testing.assert_close(actual["pred_logits"], expected["pred_logits"], rtol=0, atol=0)


def test_saved_file_has_the_umask_mode_and_no_temporary_left(tmp_path):
    """A checkpoint in a shared run folder must be readable by the others the umask lets read it."""
    cfg = tiny_config()
    model, _, _ = build_model(cfg)
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ckpt.pt", model, cfg)
        save_checkpoint(tmp_path / "ckpt.pt", model, cfg)  # over an existing one
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt.pt").stat().st_mode) == 0o644
    assert [f.name for f in tmp_path.iterdir()] == ["ckpt.pt"]


def test_save_unwraps_compiled_model(tmp_path):
    cfg = tiny_config()
    model, _, _ = build_model(cfg)
    save_checkpoint(tmp_path / "c.pt", torch.compile(model), cfg)
    keys = read_checkpoint(tmp_path / "c.pt").model.keys()
    assert keys == model.state_dict().keys()


@pytest.mark.parametrize(
    ("flags", "zipfile"),
    [
        ({}, True),
        ({"with_box_refine": True}, True),
        ({"with_box_refine": True, "two_stage": True}, True),
        ({"num_feature_levels": 1}, True),
        ({"with_box_refine": True}, False),  # files from PyTorch < 1.6 use the legacy format
    ],
)
def test_authors_format_round_trip(tmp_path, flags, zipfile):
    """A file shaped like the released ones: {model, optimizer, lr_scheduler, epoch, args=Namespace}."""
    cfg = tiny_config(num_classes=91, **flags)
    model, _, _ = build_model(cfg)
    trained_looking(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 40)
    # The authors' code ignores --position_embedding_scale; a stray value must not change outputs.
    args = authors_args(**TINY_SIZES, **flags, position_embedding_scale=1.0)
    path = tmp_path / "r50_deformable_detr-checkpoint.pth"
    weights = dict(model.state_dict())
    weights["backbone.0.body.total_ops"] = torch.zeros(1, dtype=torch.float64)  # thop leftovers, ignored
    weights["backbone.0.body.total_params"] = torch.zeros(1, dtype=torch.float64)
    torch.save(
        {
            "model": weights,
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": 49,
            "args": args,
        },
        path,
        _use_new_zipfile_serialization=zipfile,
    )
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # why the authors' files need special handling

    loaded, _, _, ckpt = load_checkpoint(path)
    assert ckpt.source_format == "authors" and ckpt.extra["epoch"] == 49
    assert ckpt.config.model.model_dump(exclude={"dropout"}) == cfg.model.model_dump(exclude={"dropout"})
    assert ckpt.extra["args"].lr_backbone_names == ["backbone.0"]
    expected, actual = outputs_of(model), outputs_of(loaded)
    torch.testing.assert_close(actual["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0)
    torch.testing.assert_close(actual["pred_logits"], expected["pred_logits"], rtol=0, atol=0)


def test_authors_format_with_unknown_globals_needs_explicit_trust(tmp_path):
    model, _, _ = build_model(tiny_config(num_classes=91))
    args = authors_args(**TINY_SIZES)
    args.extra = fractions.Fraction(1, 3)  # any class beyond argparse.Namespace
    path = tmp_path / "odd.pth"
    torch.save({"model": model.state_dict(), "args": args}, path)
    with pytest.raises(ValueError, match="allow_unsafe_pickle"):
        read_checkpoint(path)
    assert read_checkpoint(path, allow_unsafe_pickle=True).source_format == "authors"


def test_finetune_with_other_num_classes_reinitializes_class_heads(tmp_path, caplog):
    cfg = tiny_config(with_box_refine=True, two_stage=True, num_classes=91)
    model, _, _ = build_model(cfg)
    trained_looking(model)
    path = tmp_path / "coco.pt"
    save_checkpoint(path, model, cfg)

    new_cfg = tiny_config(with_box_refine=True, two_stage=True, num_classes=3)
    with caplog.at_level(logging.WARNING, logger="core.checkpoint"):
        finetune, criterion, _, _ = load_checkpoint(path, new_cfg)
    assert "re-initialized" in caplog.text and "91" in caplog.text
    assert finetune.class_embed[0].weight.shape == (3, 64) and criterion.num_classes == 3
    prior = -math.log(99)
    torch.testing.assert_close(finetune.class_embed[0].bias, torch.full((3,), prior))
    torch.testing.assert_close(finetune.bbox_embed[0].layers[0].weight, model.bbox_embed[0].layers[0].weight)
    torch.testing.assert_close(finetune.transformer.level_embed, model.transformer.level_embed)


def test_architecture_mismatch_names_the_field(tmp_path):
    cfg = tiny_config()
    model, _, _ = build_model(cfg)
    save_checkpoint(tmp_path / "c.pt", model, cfg)
    with pytest.raises(ValueError, match="with_box_refine"):
        load_checkpoint(tmp_path / "c.pt", tiny_config(with_box_refine=True))
    with pytest.raises(ValueError, match="num_queries: checkpoint 10, config 12"):
        load_checkpoint(tmp_path / "c.pt", tiny_config(num_queries=12))


def test_load_model_weights_strips_wrapper_prefixes():
    cfg = tiny_config()
    source, _, _ = build_model(cfg)
    trained_looking(source)
    # DDP's prefix, torch.compile's, and both in either order (a compiled DDP model, a DDP of a compiled one).
    for prefix in ("module.", "_orig_mod.", "_orig_mod.module.", "module._orig_mod."):
        target, _, _ = build_model(cfg)
        load_model_weights(target, {f"{prefix}{k}": v for k, v in source.state_dict().items()})
        torch.testing.assert_close(target.query_embed.weight, source.query_embed.weight)


def test_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="'model'"):
        read_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pt")
    # A text file, an empty one: ValueErrors that name the file.
    (tmp_path / "notes.pt").write_text("hello, not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("notes.pt", "empty.pt"):
        with pytest.raises(ValueError, match=rf"{name} is not a checkpoint torch.load can read"):
            read_checkpoint(tmp_path / name)
    # Ours, with a config entry from a newer version, or none.
    config = json.loads(tiny_config().model_dump_json())
    config["model"]["num_denoising"] = 100
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}, "config": json.dumps(config)}, tmp_path / "newer.pt")
    with pytest.raises(ValueError) as e:
        read_checkpoint(tmp_path / "newer.pt")
    assert str(e.value) == (
        f"{tmp_path / 'newer.pt'} has a config entry this version cannot build "
        "(model.num_denoising: Extra inputs are not permitted)"
    )
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match=r"bare.pt has no config entry"):
        read_checkpoint(tmp_path / "bare.pt")


def test_two_urls_with_one_file_name_are_two_checkpoints(tmp_path, monkeypatch):
    """A checkpoint read from http(s) is downloaded once into torch.hub's cache. Two runs' URLs that end in
    the same file name are two files there, not the first run's file twice."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    served = tmp_path / "served"
    for run, queries in (("run1", 10), ("run2", 12)):
        cfg = tiny_config(num_queries=queries)
        (served / run).mkdir(parents=True)
        save_checkpoint(served / run / "checkpoint.pt", build_model(cfg)[0], cfg, epoch=1)
    with serve_folder(served) as base:
        read = [read_checkpoint(f"{base}/{run}/checkpoint.pt").config.model.num_queries for run in ("run1", "run2")]
    assert read == [10, 12]
    # Read again with the server gone: from the cache.
    assert read_checkpoint(f"{base}/run2/checkpoint.pt").config.model.num_queries == 12


def test_authors_args_carry_the_matcher_loss_and_head_flags(tmp_path):
    """Flags of an authors' run that differ from the paper's defaults are read back, not reset."""
    args = authors_args(
        **TINY_SIZES,
        focal_alpha=0.5,
        aux_loss=False,
        dropout=0.0,
        set_cost_class=3,
        set_cost_bbox=4,
        set_cost_giou=1,
        cls_loss_coef=1,
        bbox_loss_coef=6,
        giou_loss_coef=3,
    )
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"class_embed.0.weight": torch.zeros(91, 64)}, "args": args}, path)
    cfg = read_checkpoint(path).config
    assert cfg.loss.focal_alpha == 0.5 and cfg.model.aux_loss is False and cfg.model.dropout == 0.0
    assert (cfg.matcher.set_cost_class, cfg.matcher.set_cost_bbox, cfg.matcher.set_cost_giou) == (3, 4, 1)
    assert (cfg.loss.cls_loss_coef, cfg.loss.bbox_loss_coef, cfg.loss.giou_loss_coef) == (1, 6, 3)
    assert (cfg.model.num_classes, cfg.model.dec_n_points, cfg.model.enc_n_points) == (91, 4, 4)


def test_finetune_refuses_a_checkpoint_missing_a_non_class_weight():
    """With another class count only the class heads may be missing; a missing query embedding is an error,
    not a silently random one."""
    source, _, _ = build_model(tiny_config(num_classes=91))
    state = dict(source.state_dict())
    del state["query_embed.weight"]
    target, _, _ = build_model(tiny_config(num_classes=3))
    with pytest.raises(RuntimeError, match=r"missing keys \['query_embed.weight'\]"):
        load_model_weights(target, state)
