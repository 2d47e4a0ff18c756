"""``Predictor``: a checkpoint in, boxes in pixels with scores and class names out, for one image or many.

Plain PyTorch, usable from a notebook; the batch-inference actors of ``pipelines`` run the same object.

    predictor = Predictor.from_checkpoint("runs/demo-<time>/checkpoint_epoch0011")
    det = predictor("street.jpg" bytes | PIL image | (H, W, 3) uint8 array)
    det.boxes, det.scores, det.labels, det.names     # (k, 4) xyxy pixels, (k,), (k,) category ids, k names

Shapes: N images, Q queries, C classes of the head, k detections kept for one image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from core.build import build_detector
from core.checkpoint import Checkpoint, load_model_weights, read_checkpoint
from core.coco_names import COCO_CATEGORY_NAMES
from core.postprocess import PostProcess
from core.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    pad_and_normalize_batch,
    resize_rgb,
    size_for_short_side,
    to_rgb_array,
)


@dataclass
class Detections:
    """What the predictor finds in one image, highest score first.

    Attributes:
        boxes: (k, 4) float32 xyxy in the original image's pixels, clipped to the image.
        scores: (k,) float32 sigmoid probabilities, descending.
        labels: (k,) int64 dataset category ids (COCO's ids for the authors' checkpoints).
        names: k class names, one per label.
        height, width: the original image's size.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]
    height: int
    width: int


@dataclass
class PreparedImage:
    """An image resized for the model: ``pixels`` (h, w, 3) uint8 and its original (height, width)."""

    pixels: np.ndarray
    height: int
    width: int


@dataclass
class ClassInfo:
    """How the head's class indices become category ids and names.

    Attributes:
        names: category id -> name; empty when the checkpoint carries none (names are then the ids).
        label_map: head index -> category id (-1: a head class without a category); None when the
            head index is the category id (raw COCO ids, the authors' checkpoints).
    """

    names: dict[int, str] = field(default_factory=dict)
    label_map: list[int] | None = None

    def valid_classes(self, num_classes: int) -> torch.Tensor:
        """(C,) bool: head classes that stand for a real category (the others never trained as positives)."""
        if self.label_map is not None:
            if len(self.label_map) != num_classes:
                raise ValueError(f"label_map has {len(self.label_map)} entries, the head {num_classes} classes")
            return torch.tensor([c >= 0 for c in self.label_map], dtype=torch.bool)
        if not self.names:
            return torch.ones(num_classes, dtype=torch.bool)
        return torch.tensor([c in self.names for c in range(num_classes)], dtype=torch.bool)

    def name(self, category_id: int) -> str:
        return self.names.get(category_id, str(category_id))


@dataclass
class InputSize:
    """The evaluation resize and normalization a checkpoint was trained for (the paper's by default)."""

    short_side: int = 800
    max_size: int = 1333
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    def overridden(self, short_side: int | None, max_size: int | None) -> InputSize:
        """This size with the sides given (not None) replaced."""
        return dataclasses.replace(
            self,
            short_side=self.short_side if short_side is None else short_side,
            max_size=self.max_size if max_size is None else max_size,
        )


def checkpoint_class_info(ckpt: Checkpoint) -> ClassInfo:
    """Category names and label map of a checkpoint: its dataset metadata, or COCO's for the authors'."""
    if ckpt.source_format == "authors":
        return ClassInfo(names=dict(COCO_CATEGORY_NAMES), label_map=None)
    # The layout pipelines/train.py writes (``dataset_info``); a sweep's best trial has the same.
    dataset = ckpt.meta.get("dataset") or {}
    names = {int(k): str(v) for k, v in (dataset.get("category_names") or {}).items()}
    label_map = dataset.get("label_to_category_id")
    return ClassInfo(names=names, label_map=None if label_map is None else [int(c) for c in label_map])


def checkpoint_input_size(ckpt: Checkpoint) -> InputSize:
    """The evaluation size and normalization saved with a checkpoint of ours; the paper's otherwise."""
    job = ckpt.meta.get("job_config")
    if not job:
        return InputSize()
    data = (json.loads(job) if isinstance(job, str) else job).get("data", {})
    default = InputSize()
    return InputSize(
        short_side=int(data.get("val_short_side", default.short_side)),
        max_size=int(data.get("max_size", default.max_size)),
        pixel_mean=tuple(data.get("pixel_mean", default.pixel_mean)),
        pixel_std=tuple(data.get("pixel_std", default.pixel_std)),
    )


def export_class_info(meta: dict[str, Any]) -> ClassInfo:
    """Category names and label map an exported file carries (``core.export.metadata``)."""
    label_map = meta["label_map"]
    return ClassInfo(
        names={int(k): v for k, v in meta["category_names"].items()},
        label_map=None if label_map is None else [int(c) for c in label_map],
    )


def export_input_size(meta: dict[str, Any]) -> InputSize:
    """The input size an exported file carries."""
    size = meta["input_size"]
    return InputSize(
        short_side=int(size["short_side"]),
        max_size=int(size["max_size"]),
        pixel_mean=tuple(size["pixel_mean"]),
        pixel_std=tuple(size["pixel_std"]),
    )


def prepare_image(rgb: np.ndarray, input_size: InputSize) -> PreparedImage:
    """An (H, W, 3) uint8 RGB image resized for the model; ``Predictor.prepare`` after the conversion."""
    h, w = rgb.shape[:2]
    oh, ow = size_for_short_side(h, w, input_size.short_side, input_size.max_size)
    return PreparedImage(resize_rgb(rgb, oh, ow), h, w)


class Predictor:
    """Runs a Deformable DETR on images and returns detections in pixels with class names.

    An image's detections do not depend on the other images of a call: images are batched only with
    images of the same resized size (no padding), unless ``pad_mixed_sizes`` is set, which is faster
    on mixed sizes but lets the padding change results near the right and bottom borders slightly.

    Args:
        model: a DeformableDETR, put in eval mode and moved to ``device``; or an exported model with the
            same call (``core.export.OnnxDetector``, see ``from_onnx``).
        classes: category ids and names of the head's classes.
        input_size: resize and normalization of the inputs.
        score_threshold: keep detections scoring strictly above it.
        top_k: keep at most this many detections per image (the highest scoring).
        device: where the model runs; default CUDA when available.
        amp_dtype: run the model under autocast in this dtype (torch.bfloat16), None for float32.
        batch_size: most images per forward pass.
        pad_mixed_sizes: batch images of different sizes together, zero-padded.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        classes: ClassInfo | None = None,
        input_size: InputSize | None = None,
        score_threshold: float = 0.5,
        top_k: int = 100,
        device: torch.device | str | None = None,
        amp_dtype: torch.dtype | None = None,
        batch_size: int = 8,
        pad_mixed_sizes: bool = False,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not 0.0 <= score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in [0, 1), got {score_threshold}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(model, nn.Module):
            self.model = model.eval().to(self.device)
            num_classes = int(self.model.class_embed[0].out_features)
        else:  # an exported model behind the same call (core.export.OnnxDetector)
            if amp_dtype is not None:
                raise ValueError("amp_dtype applies to a PyTorch model; an exported one runs in its export's dtype")
            self.model = model
            num_classes = model.num_classes
        self.classes = classes or ClassInfo()
        self.input_size = input_size or InputSize()
        self.score_threshold = score_threshold
        self.top_k = top_k
        self.amp_dtype = amp_dtype
        self.batch_size = batch_size
        self.pad_mixed_sizes = pad_mixed_sizes
        self._valid = self.classes.valid_classes(num_classes).to(self.device)  # (C,)
        self._post = PostProcess(label_map=self.classes.label_map).to(self.device)

    @classmethod
    def from_checkpoint(
        cls,
        source: str | os.PathLike | Checkpoint,
        *,
        short_side: int | None = None,
        max_size: int | None = None,
        allow_unsafe_pickle: bool = False,
        **kwargs: Any,
    ) -> Predictor:
        """A predictor for any checkpoint ``core`` reads: ours, a sweep trial's, the authors' released files.

        Args:
            source: a checkpoint file (local path or http(s) URL), a folder holding one ``checkpoint.pt``,
                or a Checkpoint already read.
            short_side, max_size: override the checkpoint's evaluation size.
            allow_unsafe_pickle: see core.checkpoint.read_checkpoint.
            **kwargs: Predictor arguments (score_threshold, top_k, device, amp_dtype, batch_size, ...).
        """
        if isinstance(source, Checkpoint):
            ckpt = source
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "checkpoint.pt")
            ckpt = read_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle)
        model = build_detector(ckpt.config, load_backbone_weights=False)
        load_model_weights(model, ckpt.model)
        size = checkpoint_input_size(ckpt).overridden(short_side, max_size)
        return cls(model, classes=checkpoint_class_info(ckpt), input_size=size, **kwargs)

    @classmethod
    def from_onnx(
        cls,
        source: str | os.PathLike | bytes,
        *,
        short_side: int | None = None,
        max_size: int | None = None,
        threads: int | None = None,
        **kwargs: Any,
    ) -> Predictor:
        """A predictor running an ONNX file of ``pipelines/export.py`` (raw outputs, decomposed attention)
        in onnxruntime on the CPU; same call and detections as ``from_checkpoint``.

        Args:
            source: the .onnx file (or its bytes); it carries the classes and input size of its checkpoint.
            short_side, max_size: override the input size.
            threads: onnxruntime's intra-op threads (default: its choice).
            **kwargs: Predictor arguments (score_threshold, top_k, batch_size, pad_mixed_sizes).
        """
        from core.export import OnnxDetector

        detector = OnnxDetector(source if isinstance(source, bytes) else os.fspath(source), threads=threads)
        input_size = export_input_size(detector.meta).overridden(short_side, max_size)
        return cls(detector, classes=export_class_info(detector.meta), input_size=input_size, device="cpu", **kwargs)

    def prepare(self, image: Any) -> PreparedImage:
        """Converts and resizes one image (array, PIL image or bytes); CPU work a data pipeline can run apart."""
        return prepare_image(to_rgb_array(image), self.input_size)

    def __call__(self, images: Any) -> Detections | list[Detections]:
        """Detections of one image, or a list of them for a list (or tuple) of images."""
        if isinstance(images, (list, tuple)):
            return self.predict_prepared([self.prepare(im) for im in images])
        return self.predict_prepared([self.prepare(images)])[0]

    @torch.inference_mode()
    def predict_prepared(self, images: Sequence[PreparedImage]) -> list[Detections]:
        """Detections of prepared images, in their order."""
        results: list[Detections | None] = [None] * len(images)
        for group in self._batches(images):
            for i, det in zip(group, self._forward([images[i] for i in group])):
                results[i] = det
        return results  # type: ignore[return-value]

    def _batches(self, images: Sequence[PreparedImage]) -> list[list[int]]:
        """Index groups of at most batch_size images; equal resized sizes only, unless pad_mixed_sizes."""
        if self.pad_mixed_sizes:
            order = list(range(len(images)))
        else:
            order = sorted(range(len(images)), key=lambda i: images[i].pixels.shape[:2])
        groups: list[list[int]] = []
        for i in order:
            shape = images[i].pixels.shape[:2]
            g = groups[-1] if groups else None
            if g and len(g) < self.batch_size and (self.pad_mixed_sizes or images[g[0]].pixels.shape[:2] == shape):
                g.append(i)
            else:
                groups.append([i])
        return groups

    def _forward(self, images: Sequence[PreparedImage]) -> list[Detections]:
        size = self.input_size
        batch, mask = pad_and_normalize_batch(
            [im.pixels for im in images], size.pixel_mean, size.pixel_std, self.device
        )  # (N, 3, H, W), (N, H, W)
        amp = contextlib.nullcontext() if self.amp_dtype is None else torch.autocast(self.device.type, self.amp_dtype)
        with amp:
            out = self.model(batch, mask)
        # Classes without a category never had a positive example: they may not take top-k slots.
        logits = out["pred_logits"].float().masked_fill(~self._valid, float("-inf"))  # (N, Q, C)
        target_sizes = torch.tensor([[im.height, im.width] for im in images], device=self.device)  # (N, 2)
        kept = self._post.threshold(
            {"pred_logits": logits, "pred_boxes": out["pred_boxes"].float()},
            target_sizes,
            score_threshold=self.score_threshold,
            max_detections=self.top_k,
        )
        dets = []
        for im, r in zip(images, kept):
            boxes = r["boxes"].clone()  # (k, 4) xyxy pixels
            boxes[:, 0::2].clamp_(0, im.width)
            boxes[:, 1::2].clamp_(0, im.height)
            labels = r["labels"].cpu().numpy().astype(np.int64)
            dets.append(
                Detections(
                    boxes=boxes.cpu().numpy().astype(np.float32),
                    scores=r["scores"].cpu().numpy().astype(np.float32),
                    labels=labels,
                    names=[self.classes.name(int(c)) for c in labels],
                    height=im.height,
                    width=im.width,
                )
            )
        return dets
