"""Presets: named starting points of a run config, declared as plain data (partial config dicts).

Each is applied over the pydantic defaults (the paper's R50 model), then a config file and ``--set``
overrides go on top (``pipelines.job_config.load_job_config``).
"""

from __future__ import annotations

from typing import Any

# torchvision's ImageNet weights of the backbones (fetched once into torch.hub's cache, on the driver first).
R50_IMAGENET = "https://download.pytorch.org/models/resnet50-0676ba61.pth"
R18_IMAGENET = "https://download.pytorch.org/models/resnet18-f37072fd.pth"

# The paper's recipe: total batch 32 (8 GPUs x 4 images), 50 epochs, lr drop at 40, bf16.
_COCO_TRAIN: dict[str, Any] = {
    "epochs": 50,
    "lr_drop": 40,
    "lr_schedule": "step",
    "num_workers": 8,
    "use_gpu": True,
    "gpus_per_worker": 1,
    "cpus_per_worker": 8,
    "amp": "auto",
    "eval_every": 1,
    "keep_checkpoints": 3,
    "max_failures": 3,
    "log_every_s": 30,
    "metrics_every_steps": 20,
}
_R50: dict[str, Any] = {"backbone": "resnet50", "num_classes": 91, "backbone_weights": R50_IMAGENET}

# Generated shapes, light model, small images: trains from scratch on 2 CPU cores (see README).
_DEMO_DATA: dict[str, Any] = {
    "root": "data/demo",
    "train_images": "train",
    "val_images": "val",
    "train_ann": "instances_train.json",
    "val_ann": "instances_val.json",
    "category_ids": "contiguous",
    "train_short_sides": [160],
    "max_size": 160,
    "val_short_side": 160,
    "crop_prob": 0.0,
    "hflip_prob": 0.5,
    "batch_size_per_worker": 4,
    "rows_per_task": 32,
    "read_threads": 4,
    "num_decode_workers": 1,
    "prefetch_batches": 2,
}

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "demo_data": {"num_train": 1000, "num_val": 100, "num_classes": 4, "min_side": 160, "max_side": 224},
        "model": {
            "backbone": "resnet18",
            "num_feature_levels": 3,
            "hidden_dim": 128,
            "nheads": 8,
            "enc_layers": 2,
            "dec_layers": 2,
            "dim_feedforward": 512,
            "dropout": 0.0,
            "num_queries": 30,
            "dec_n_points": 4,
            "enc_n_points": 4,
            "with_box_refine": True,
            "num_classes": 4,
        },
        "data": _DEMO_DATA,
        "train": {
            "epochs": 12,
            "lr": 5e-4,
            "lr_backbone": 2e-4,
            "lr_schedule": "warmup_cosine",
            "warmup_epochs": 0.5,
            "min_lr_ratio": 0.05,
            "clip_max_norm": 0.1,
            "num_workers": 2,
            "cpus_per_worker": 1,
            "eval_every": 2,
            "keep_checkpoints": 2,
            "log_every_s": 10,
        },
    },
    # The CI-sized run of the tests and of `ray job submit` smoke checks: seconds per epoch.
    "tiny": {
        "demo_data": {"num_train": 8, "num_val": 4, "num_classes": 3, "min_side": 64, "max_side": 96, "max_objects": 3},
        "model": {
            "backbone": "resnet18",
            "num_feature_levels": 3,
            "hidden_dim": 32,
            "nheads": 4,
            "enc_layers": 1,
            "dec_layers": 1,
            "dim_feedforward": 64,
            "dropout": 0.0,
            "num_queries": 10,
            "dec_n_points": 2,
            "enc_n_points": 2,
            "num_classes": 3,
        },
        "data": {
            **_DEMO_DATA,
            "root": "data/tiny",
            "train_short_sides": [96],
            "max_size": 96,
            "val_short_side": 96,
            "batch_size_per_worker": 2,
        },
        "train": {
            "epochs": 2,
            "lr": 1e-3,
            "lr_backbone": 1e-4,
            "lr_schedule": "step",
            "num_workers": 2,
            "cpus_per_worker": 1,
            "eval_every": 1,
            "keep_checkpoints": 2,
            "log_every_s": 2,
            "num_vis_images": 2,
        },
    },
    # A small run on CPUs over COCO-layout data (train2017/, val2017/, annotations/instances_*2017.json):
    # the demo's light model with an ImageNet ResNet-18, COCO's raw category ids, images at ~1/2 scale.
    # A custom dataset in that layout: --set data.root=... and, if its ids are not COCO's,
    # --set data.category_ids=contiguous --set model.num_classes=<number of categories>.
    "cpu_coco": {
        "model": {
            "backbone": "resnet18",
            "backbone_weights": R18_IMAGENET,
            "num_feature_levels": 3,
            "hidden_dim": 128,
            "nheads": 8,
            "enc_layers": 2,
            "dec_layers": 2,
            "dim_feedforward": 512,
            "dropout": 0.0,
            "num_queries": 100,
            "dec_n_points": 4,
            "enc_n_points": 4,
            "with_box_refine": True,
            "num_classes": 91,
        },
        "data": {
            "root": "data/coco",
            "train_short_sides": [288, 320, 352, 384, 416],
            "max_size": 640,
            "val_short_side": 384,
            "crop_resize_sides": [224, 288, 352],
            "crop_size": [192, 320],
            "batch_size_per_worker": 2,
            "num_decode_workers": 1,
            "read_threads": 8,
        },
        "train": {
            "epochs": 12,
            "lr": 2e-4,
            "lr_backbone": 2e-5,
            "lr_schedule": "warmup_cosine",
            "warmup_epochs": 0.2,
            "min_lr_ratio": 0.05,
            "num_workers": 2,
            "cpus_per_worker": 1,
            "use_gpu": False,
            "amp": "off",
            "eval_every": 1,
            "keep_checkpoints": 2,
            "log_every_s": 30,
            "metrics_every_steps": 10,
        },
    },
    "r50": {"data": {"root": "data/coco", "batch_size_per_worker": 4}, "train": _COCO_TRAIN, "model": _R50},
    "r50_box_refine": {
        "data": {"root": "data/coco", "batch_size_per_worker": 4},
        "train": _COCO_TRAIN,
        "model": {**_R50, "with_box_refine": True},
    },
    "r50_two_stage": {
        "data": {"root": "data/coco", "batch_size_per_worker": 4},
        "train": _COCO_TRAIN,
        "model": {**_R50, "with_box_refine": True, "two_stage": True},
    },
}
