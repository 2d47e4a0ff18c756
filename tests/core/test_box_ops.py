"""Box conversions, IoU and generalized IoU against hand-computed values."""

import pytest
import torch

from core.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    paired_generalized_box_iou,
)


def _random_cxcywh(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.rand(n, 2, generator=g)
    sizes = torch.rand(n, 2, generator=g) * 0.5 + 0.01
    return torch.cat([centers, sizes], dim=1)


def test_cxcywh_xyxy_round_trip():
    boxes = _random_cxcywh(50)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)
    xyxy = box_cxcywh_to_xyxy(boxes)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)


def test_conversions_keep_leading_dims():
    boxes = _random_cxcywh(24).view(2, 3, 4, 4)
    assert box_cxcywh_to_xyxy(boxes).shape == (2, 3, 4, 4)
    assert box_area(box_cxcywh_to_xyxy(boxes)).shape == (2, 3, 4)


def test_known_conversions():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    # COCO annotation [x, y, w, h].
    xywh = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    torch.testing.assert_close(box_xywh_to_xyxy(xywh), torch.tensor([[10.0, 20.0, 40.0, 60.0]]))
    assert box_area(torch.tensor([[10.0, 20.0, 40.0, 60.0]])).item() == 1200.0


def test_iou_of_identical_boxes_is_one():
    boxes = box_cxcywh_to_xyxy(_random_cxcywh(7))
    iou, _ = box_iou(boxes, boxes)
    torch.testing.assert_close(iou.diagonal(), torch.ones(7))
    torch.testing.assert_close(generalized_box_iou(boxes, boxes).diagonal(), torch.ones(7))


def test_iou_and_giou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    iou, union = box_iou(a, b)
    # Intersection 1, union 4 + 4 - 1 = 7, enclosing box [0, 0, 3, 3] of area 9.
    assert union.item() == pytest.approx(7.0)
    assert iou.item() == pytest.approx(1 / 7)
    assert generalized_box_iou(a, b).item() == pytest.approx(1 / 7 - 2 / 9)


def test_disjoint_boxes_have_negative_giou():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    iou, _ = box_iou(a, b)
    assert iou.item() == 0.0
    # Union 2, enclosing [0, 0, 3, 1] of area 3: GIoU = 0 - (3 - 2) / 3.
    giou = generalized_box_iou(a, b)
    assert giou.item() == pytest.approx(-1 / 3)
    assert giou.item() < 0
    # Farther apart is worse, which is why GIoU gives a gradient where IoU has none.
    c = torch.tensor([[5.0, 0.0, 6.0, 1.0]])
    assert generalized_box_iou(a, c).item() < giou.item()


def test_pairwise_shape_and_paired_equals_diagonal():
    boxes1 = box_cxcywh_to_xyxy(_random_cxcywh(6, seed=1))
    boxes2 = box_cxcywh_to_xyxy(_random_cxcywh(6, seed=2))
    matrix = generalized_box_iou(boxes1, boxes2[:4])
    assert matrix.shape == (6, 4)
    assert ((matrix >= -1) & (matrix <= 1)).all()
    paired = paired_generalized_box_iou(boxes1, boxes2)
    torch.testing.assert_close(paired, generalized_box_iou(boxes1, boxes2).diagonal())


def test_empty_sets():
    boxes = box_cxcywh_to_xyxy(_random_cxcywh(3))
    assert generalized_box_iou(torch.zeros(0, 4), boxes).shape == (0, 3)
    assert paired_generalized_box_iou(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0,)


@pytest.mark.parametrize("fn", [generalized_box_iou, paired_generalized_box_iou])
def test_degenerate_box_raises(fn):
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    flipped = torch.tensor([[1.0, 0.0, 0.5, 1.0]])  # x1 < x0
    with pytest.raises(ValueError, match="degenerate box in boxes2"):
        fn(good, flipped)
    with pytest.raises(ValueError, match="degenerate box in boxes1"):
        fn(torch.tensor([[float("nan"), 0.0, 1.0, 1.0]]), good)


def test_giou_gradient_is_finite():
    raw = torch.randn(5, 4, requires_grad=True)
    boxes = box_cxcywh_to_xyxy(raw.sigmoid())
    target = box_cxcywh_to_xyxy(_random_cxcywh(5))
    (1 - paired_generalized_box_iou(boxes, target)).sum().backward()
    assert torch.isfinite(raw.grad).all()
