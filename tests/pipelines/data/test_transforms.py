"""The paper's augmentation on arrays: sizes as DETR computes them, and boxes that follow every step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.preprocess import resize_rgb, size_for_short_side
from pipelines.data.transforms import (
    Affine,
    boxes_cxcywh_normalized_to_xyxy,
    boxes_xywh_to_xyxy,
    boxes_xyxy_to_cxcywh_normalized,
    crop,
    hflip,
    normalize_image,
    resize,
    train_transform,
    val_transform,
)

PAPER = dict(
    short_sides=tuple(range(480, 801, 32)), max_size=1333, crop_resize_sides=(400, 500, 600), crop_size=(384, 600)
)


def _random_boxes(rng, n, h, w):
    xy = rng.uniform(0, [w - 2, h - 2], size=(n, 2))
    wh = rng.uniform(1, [w, h], size=(n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32)


@pytest.mark.parametrize(
    "hw,side,max_size,expected",
    [
        ((480, 640), 800, 1333, (800, 1066)),
        ((640, 480), 800, 1333, (1066, 800)),
        ((480, 2000), 800, 1333, (320, 1333)),  # long side caps the short side
        ((800, 1000), 800, 1333, (800, 1000)),  # already there
        ((427, 640), 512, None, (512, 767)),
    ],
)
def test_size_matches_detr(hw, side, max_size, expected):
    assert size_for_short_side(*hw, side, max_size) == expected


def test_resize_matches_pillow_and_scales_boxes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((40, 30), Image.BILINEAR)).astype(int)
    assert np.abs(resize_rgb(img, 30, 40).astype(int) - ref).max() <= 1
    boxes = np.array([[10, 20, 30, 40]], np.float32)
    out, b, aff = resize(img, boxes, 120, None)
    assert out.shape == (120, 160, 3)
    np.testing.assert_allclose(b, [[20, 40, 60, 80]])
    np.testing.assert_allclose(aff.inverse().apply(b), boxes, atol=1e-4)


def test_hflip_and_crop_move_boxes():
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :5] = 255
    out, b, _ = hflip(img, np.array([[0, 0, 5, 10]], np.float32))
    assert (out[:, 15:] == 255).all() and (out[:, :15] == 0).all()
    np.testing.assert_allclose(b, [[15, 0, 20, 10]])
    boxes = np.array([[0, 0, 4, 4], [2, 2, 12, 8], [15, 5, 19, 9], [3, 3, 5, 5]], np.float32)
    out, b, keep, _ = crop(img, boxes, top=1, left=3, height=6, width=9)
    assert out.shape == (6, 9, 3)
    # box 0 clipped to x 3..4, box 1 clipped on the right, box 2 falls outside (dropped), box 3 inside
    assert keep.tolist() == [0, 1, 3]
    np.testing.assert_allclose(b, [[0, 0, 1, 3], [0, 1, 9, 6], [0, 2, 2, 4]])


@pytest.mark.parametrize("seed", range(40))
def test_train_transform_boxes_round_trip(seed):
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(300, 700)), int(rng.integers(300, 700))
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    boxes = _random_boxes(rng, 8, h, w)
    out = train_transform(img, boxes, np.random.default_rng([seed, 1]), **PAPER)
    oh, ow = out.image.shape[:2]
    # The short side takes a listed size, unless that would stretch the long side past the cap, which it then
    # meets (to the pixel or two that the authors' rounding of the short side moves it by).
    assert (min(oh, ow) in PAPER["short_sides"] and max(oh, ow) <= 1333) or abs(max(oh, ow) - 1333) <= 2
    # The output image seen from the input: the crop window. Each surviving box, mapped back, is the
    # original clipped to that window; every dropped box has nothing inside it.
    inv = out.affine.inverse()
    window = inv.apply(np.array([[0, 0, ow, oh]], np.float32))[0]
    clipped = np.concatenate([np.maximum(boxes[:, :2], window[:2]), np.minimum(boxes[:, 2:], window[2:])], 1)
    visible = (clipped[:, 2] > clipped[:, 0] + 1e-3) & (clipped[:, 3] > clipped[:, 1] + 1e-3)
    assert set(out.keep.tolist()) <= set(
        np.nonzero((clipped[:, 2] >= clipped[:, 0]) & (clipped[:, 3] >= clipped[:, 1]))[0].tolist()
    )
    assert set(np.nonzero(visible)[0].tolist()) <= set(out.keep.tolist())
    back = inv.apply(out.boxes_xyxy)
    np.testing.assert_allclose(back, clipped[out.keep], atol=0.05)
    # and through the model's box format
    cxcywh = boxes_xyxy_to_cxcywh_normalized(out.boxes_xyxy, oh, ow)
    assert ((cxcywh >= 0) & (cxcywh <= 1)).all()
    np.testing.assert_allclose(inv.apply(boxes_cxcywh_normalized_to_xyxy(cxcywh, oh, ow)), clipped[out.keep], atol=0.05)


def test_train_transform_takes_both_branches_and_flips():
    img = np.zeros((480, 640, 3), np.uint8)
    boxes = np.array([[10, 10, 100, 100]], np.float32)
    affines = [train_transform(img, boxes, np.random.default_rng(s), **PAPER).affine for s in range(60)]
    assert any(a.sx < 0 for a in affines) and any(a.sx > 0 for a in affines)
    assert any(a.sx > 0 and (a.tx < 0 or a.ty < 0) for a in affines), "some crops shift the image"
    assert any(a.sx > 0 and a.tx == 0 and a.ty == 0 for a in affines), "some plain resizes"
    again = train_transform(img, boxes, np.random.default_rng(7), **PAPER)
    assert again.affine == affines[7], "same generator, same augmentation"


def test_tiny_images_crop_whole_side():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    out = train_transform(
        img,
        np.array([[1, 1, 20, 20]], np.float32),
        rng,
        short_sides=(32,),
        max_size=64,
        crop_resize_sides=(30,),
        crop_size=(384, 600),
        crop_prob=1.0,
    )
    assert min(out.image.shape[:2]) == 32


def test_val_transform_and_normalize():
    img = np.full((480, 640, 3), 128, np.uint8)
    out = val_transform(img, np.array([[0, 0, 640, 480]], np.float32))
    assert out.image.shape == (800, 1066, 3)
    np.testing.assert_allclose(out.boxes_xyxy, [[0, 0, 1066, 800]], rtol=1e-6)
    assert val_transform(img).boxes_xyxy.shape == (0, 4)
    x = normalize_image(out.image, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert x.shape == (3, 800, 1066) and x.dtype == torch.float32
    np.testing.assert_allclose(x[:, 0, 0].numpy(), (128 / 255 - 0.5) / np.array([0.25, 0.5, 1.0]), atol=1e-6)


def test_affine_composition():
    a, b = Affine(sx=-1, tx=10), Affine(sx=2, tx=1, sy=3, ty=-2)
    pts = np.array([[1, 2, 3, 4]], np.float32)
    np.testing.assert_allclose(a.then(b).apply(pts), b.apply(a.apply(pts)))
    np.testing.assert_allclose(a.then(b).inverse().apply(a.then(b).apply(pts)), pts, atol=1e-5)


def test_coco_xywh_boxes_become_corners():
    """A COCO box at (10, 20) of 30x40 pixels ends at (40, 60), not at (30, 40)."""
    np.testing.assert_array_equal(boxes_xywh_to_xyxy(np.array([10, 20, 30, 40])), [[10, 20, 40, 60]])
    np.testing.assert_array_equal(
        boxes_xywh_to_xyxy([[0, 0, 1, 2], [5, 5, 0.5, 0.25]]), [[0, 0, 1, 2], [5, 5, 5.5, 5.25]]
    )


def test_val_transform_caps_the_long_side():
    """A 100x1000 panorama at short side 800 would be 8000 wide: the long side is capped at 1333, and the
    short side is DETR's round(1333 * 100 / 1000) = 133, so the image is 133x1330."""
    out = val_transform(np.zeros((100, 1000, 3), np.uint8), np.array([[0, 0, 1000, 100]], np.float32))
    assert out.image.shape == (133, 1330, 3)
    np.testing.assert_allclose(out.boxes_xyxy, [[0, 0, 1330, 133]], rtol=1e-6)
