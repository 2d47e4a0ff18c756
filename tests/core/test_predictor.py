"""Predictor tests: our checkpoints and the authors', every input type, batches equal one-by-one calls."""

import argparse
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_SIZES, tiny_config

from core import Predictor, build_model, save_checkpoint
from core.coco_names import COCO_CATEGORY_NAMES
from core.predictor import ClassInfo, InputSize, PreparedImage
from core.preprocess import pad_and_normalize_batch, size_for_short_side, to_rgb_array


def tiny_model(num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(num_classes=num_classes)
    model, _, _ = build_model(cfg, load_backbone_weights=False)
    with torch.no_grad():  # class biases near 0, so sigmoid scores spread around 0.5 rather than 0.01
        for layer in model.class_embed:
            layer.bias.fill_(0.0)
    return model, cfg


def images(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=s, dtype=np.uint8) for s in ((60, 90, 3), (90, 60, 3), (60, 90, 3), (75, 75, 3))]


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A checkpoint as pipelines/train.py writes it: contiguous labels, 6-way head over 4 categories."""
    model, cfg = tiny_model(6)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    meta = {
        "dataset": {
            "mode": "contiguous",
            "category_ids": [1, 3, 7, 8],
            "category_names": {1: "rectangle", 3: "ellipse", 7: "triangle", 8: "diamond"},
            "label_to_category_id": [1, 3, 7, 8, -1, -1],
        },
        "job_config": json.dumps({"data": {"val_short_side": 64, "max_size": 100}}),
    }
    save_checkpoint(path, model, cfg, meta=meta, epoch=3)
    return path


def test_our_checkpoint_gives_names_ids_and_pixel_boxes(ours):
    pred = Predictor.from_checkpoint(ours.parent, score_threshold=0.0, top_k=25)  # a run's checkpoint folder
    assert pred.input_size.short_side == 64 and pred.input_size.max_size == 100
    for im in images():
        det = pred(im)
        h, w = im.shape[:2]
        assert (det.height, det.width) == (h, w)
        assert len(det.scores) == 25 and np.all(np.diff(det.scores) <= 0) and np.all(det.scores > 0)
        assert set(det.labels.tolist()) <= {1, 3, 7, 8}  # never the head's two unmapped classes
        names = {1: "rectangle", 3: "ellipse", 7: "triangle", 8: "diamond"}
        assert det.names == [names[c] for c in det.labels.tolist()]
        assert det.boxes.shape == (25, 4) and det.boxes.dtype == np.float32
        assert np.all(det.boxes[:, 0::2] >= 0) and np.all(det.boxes[:, 0::2] <= w)
        assert np.all(det.boxes[:, 1::2] >= 0) and np.all(det.boxes[:, 1::2] <= h)
        assert np.all(det.boxes[:, 2:] >= det.boxes[:, :2])


def test_threshold_and_top_k(ours):
    im = images()[0]
    all_ = Predictor.from_checkpoint(ours, score_threshold=0.0, top_k=40)(im)
    few = Predictor.from_checkpoint(ours, score_threshold=0.0, top_k=5)(im)
    cut = float(np.median(all_.scores))
    above = Predictor.from_checkpoint(ours, score_threshold=cut, top_k=40)(im)
    np.testing.assert_allclose(few.scores, all_.scores[:5], rtol=1e-6)
    assert len(above.scores) == int((all_.scores > cut).sum()) and np.all(above.scores > cut)


def test_batch_equals_one_by_one_and_keeps_order(ours):
    ims = images(1)
    pred = Predictor.from_checkpoint(ours, score_threshold=0.0, top_k=20, batch_size=3)
    batched = pred(ims)
    assert [(d.height, d.width) for d in batched] == [im.shape[:2] for im in ims]
    for im, b in zip(ims, batched):
        one = pred(im)
        np.testing.assert_allclose(b.scores, one.scores, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b.boxes, one.boxes, rtol=1e-4, atol=1e-3)
        assert b.labels.tolist() == one.labels.tolist()


def test_pad_mixed_sizes_batches_different_sizes_together(ours):
    ims = images(2)
    pred = Predictor.from_checkpoint(ours, score_threshold=0.0, top_k=20, batch_size=4, pad_mixed_sizes=True)
    prepared = [pred.prepare(im) for im in ims]
    assert pred._batches(prepared) == [[0, 1, 2, 3]]
    strict = Predictor.from_checkpoint(ours, batch_size=4)
    assert sorted(map(sorted, strict._batches(prepared))) == [[0, 2], [1], [3]]
    assert [(d.height, d.width) for d in pred(ims)] == [im.shape[:2] for im in ims]


def test_bytes_pil_and_array_inputs_agree(ours):
    pred = Predictor.from_checkpoint(ours, score_threshold=0.0, top_k=10)
    rgb = images(3)[0]
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    gray = rgb[..., 0]
    a, b, c = pred(rgb), pred(buf.getvalue()), pred(Image.fromarray(rgb))
    for d in (b, c):
        np.testing.assert_array_equal(d.boxes, a.boxes)
        np.testing.assert_array_equal(d.scores, a.scores)
    np.testing.assert_array_equal(pred(gray).scores, pred(np.repeat(gray[..., None], 3, 2)).scores)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(pred(rgba).scores, a.scores)
    exif = Image.Exif()
    exif[0x0112] = 8  # "turn a quarter anticlockwise to display": bytes come in the frame viewers show
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", exif=exif.tobytes())
    np.testing.assert_array_equal(to_rgb_array(buf.getvalue()), np.rot90(rgb, 1))


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 4, 3), np.float32), "must be uint8, got float32"),
        (np.zeros((4, 4, 2), np.uint8), r"\(H, W, 3\).*got shape \(4, 4, 2\)"),
        (b"", "empty"),
        (b"not an image", "cannot decode image bytes"),
    ],
)
def test_bad_images_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_array(bad)


def test_authors_checkpoint_gets_coco_names(tmp_path):
    model, _ = tiny_model(91, seed=1)
    args = argparse.Namespace(**TINY_SIZES, lr=2e-4, dataset_file="coco", masks=False, position_embedding="sine")
    path = tmp_path / "r18_tiny-checkpoint.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 49}, path)
    pred = Predictor.from_checkpoint(path, score_threshold=0.0, top_k=50)
    assert (pred.input_size.short_side, pred.input_size.max_size) == (800, 1333)
    det = pred(images()[3])
    assert len(det.labels) == 50 and set(det.labels.tolist()) <= set(COCO_CATEGORY_NAMES)
    assert det.names == [COCO_CATEGORY_NAMES[c] for c in det.labels.tolist()]


def test_size_for_short_side_follows_detr():
    assert size_for_short_side(480, 640, 800, 1333) == (800, 1066)
    assert size_for_short_side(400, 1200, 800, 1333) == (444, 1332)  # long side capped, DETR's rounding
    assert size_for_short_side(800, 600, 600, 1333) == (800, 600)  # already at size
    assert size_for_short_side(1, 3000, 800, 1333) == (1, 1333)  # a strip: DETR's rounding gives 0x0
    assert size_for_short_side(3000, 1, 160, 160) == (160, 1)


def test_a_strip_one_pixel_high_is_detected(ours):
    det = Predictor.from_checkpoint(ours, score_threshold=0.0, top_k=5)(np.zeros((1, 500, 3), np.uint8))
    assert (det.height, det.width, len(det.scores)) == (1, 500, 5)


def test_padding_is_zero_and_masked():
    a, b = np.full((2, 3, 3), 255, np.uint8), np.zeros((3, 2, 3), np.uint8)
    x, mask = pad_and_normalize_batch([a, b], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (2, 3, 3, 3) and mask.shape == (2, 3, 3)
    assert torch.all(x[0, :, :2, :] == 1.0) and torch.all(x[0, :, 2:, :] == 0) and mask[0, 2:].all()
    assert torch.all(x[1, :, :, :2] == -1.0) and torch.all(x[1, :, :, 2:] == 0) and mask[1, :, 2:].all()
    assert not mask[0, :2].any() and not mask[1, :, :2].any()


class OneBoxDetector(torch.nn.Module):
    """A stand-in detector: one class, one query at logit 5 with the box (0.5, 0.5, 0.2, 0.4) cxcywh."""

    def __init__(self):
        super().__init__()
        self.class_embed = torch.nn.ModuleList([torch.nn.Linear(4, 1)])

    def forward(self, images, mask):
        n = images.shape[0]
        return {
            "pred_logits": torch.full((n, 1, 1), 5.0),
            "pred_boxes": torch.tensor([0.5, 0.5, 0.2, 0.4]).repeat(n, 1, 1),
        }


def test_boxes_scale_x_by_width_and_y_by_height():
    """An image 100 high and 200 wide, not resized: cx 0.5 * 200 = 100, w 0.2 * 200 = 40 -> x 80..120;
    cy 0.5 * 100 = 50, h 0.4 * 100 = 40 -> y 30..70."""
    pred = Predictor(OneBoxDetector(), input_size=InputSize(short_side=100, max_size=200), device="cpu")
    det = pred(np.zeros((100, 200, 3), np.uint8))
    assert (det.height, det.width) == (100, 200)
    np.testing.assert_allclose(det.boxes, [[80.0, 30.0, 120.0, 70.0]], atol=1e-4)


def test_category_id_zero_is_a_valid_class():
    """Only -1 in a label map means "no category"; category id 0 is a real one."""
    assert ClassInfo(label_map=[0, 5, -1]).valid_classes(3).tolist() == [True, True, False]


def test_batches_hold_at_most_batch_size_images():
    pred = Predictor(OneBoxDetector(), batch_size=2, device="cpu")
    same = [PreparedImage(np.zeros((8, 8, 3), np.uint8), 8, 8) for _ in range(3)]
    assert pred._batches(same) == [[0, 1], [2]]
    padded = Predictor(OneBoxDetector(), batch_size=2, pad_mixed_sizes=True, device="cpu")
    assert padded._batches(same) == [[0, 1], [2]]


def test_input_size_override():
    default = InputSize()
    assert default.overridden(None, None) == default
    assert (default.overridden(500, 999).short_side, default.overridden(500, 999).max_size) == (500, 999)
    assert (default.overridden(None, 999).short_side, default.overridden(None, 999).max_size) == (800, 999)
    assert (default.overridden(500, None).short_side, default.overridden(500, None).max_size) == (500, 1333)
