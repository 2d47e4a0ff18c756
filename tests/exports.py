"""Helpers of the export tests: tiny checkpoints of each variant, pipelines/export.py run in-process, and
an exported file compared with the eager model at sizes and batches other than the export's."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny import tiny_config

from core import build_detector, load_model_weights, read_checkpoint, save_checkpoint
from core.export import ExportableDetector, load_exported, output_names
from core.predictor import checkpoint_class_info
from pipelines.export import main as export_main

CATEGORIES = {1: "rectangle", 3: "ellipse", 7: "triangle", 8: "diamond"}
EXPORT_SIZE = 96  # the example's short side; the comparisons run other sizes


def write_checkpoint(path: Path, num_classes: int = 6, **model) -> Path:
    """A checkpoint as pipelines/train.py writes one: contiguous labels of 4 categories on a
    ``num_classes``-way head (the rest unmapped), tiny model; ``model`` overrides ModelConfig fields."""
    torch.manual_seed(0)
    cfg = tiny_config(num_classes=num_classes, **model)
    detector = build_detector(cfg, load_backbone_weights=False)
    with torch.no_grad():  # scores spread around 0.5 instead of the 0.01 prior
        for layer in detector.class_embed:
            layer.bias.fill_(0.0)
    meta = {
        "dataset": {
            "mode": "contiguous",
            "category_ids": list(CATEGORIES),
            "category_names": dict(CATEGORIES),
            "label_to_category_id": [*CATEGORIES] + [-1] * (num_classes - len(CATEGORIES)),
        },
        "job_config": json.dumps({"data": {"val_short_side": 64, "max_size": 100}}),
    }
    save_checkpoint(path, detector, cfg, meta=meta, epoch=1)
    return path


def export(checkpoint, output, *flags: str) -> Path:
    rc = export_main(
        ["--checkpoint", str(checkpoint), "--output", str(output), "--image-size", str(EXPORT_SIZE), *flags]
    )
    assert rc == 0, f"export.py exited with {rc}"
    return Path(output)


def eager(checkpoint, postprocess: bool = False) -> ExportableDetector:
    ckpt = read_checkpoint(checkpoint)
    model = build_detector(ckpt.config, load_backbone_weights=False)
    load_model_weights(model, ckpt.model)
    classes = checkpoint_class_info(ckpt)
    valid = classes.valid_classes(int(model.class_embed[0].out_features))
    return ExportableDetector(model, postprocess=postprocess, valid_classes=valid, label_map=classes.label_map)


def batches(postprocess: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """Batch 1 and batch 3 at two sizes other than the export's; the second image of 3 is padded."""
    g = torch.Generator().manual_seed(5)
    out = []
    for n, h, w in ((1, 133, 101), (3, 77, 117)):
        images, mask = torch.randn(n, 3, h, w, generator=g), torch.zeros(n, h, w, dtype=torch.bool)
        if n > 1:
            images[1, :, :, 90:], mask[1, :, 90:] = 0, True
        sizes = torch.tensor([[h * 2, w * 2]] * n, dtype=torch.int64)  # original images twice the size
        out.append((images, mask, sizes) if postprocess else (images, mask))
    return out


def differences(path, checkpoint, postprocess: bool = False) -> list[dict[str, float]]:
    """Per batch of ``batches``: the largest |exported - eager| of each output (labels: count differing)."""
    run, detector = load_exported(str(path)), eager(checkpoint, postprocess)
    names = output_names(detector)
    result = []
    for inputs in batches(postprocess):
        with torch.inference_mode():
            want = detector(*inputs)
        got = run(*inputs)
        assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
        result.append(
            {
                name: float((g != w).sum()) if name == "labels" else float((g.float() - w.float()).abs().max())
                for name, g, w in zip(names, got, want)
            }
        )
    return result
