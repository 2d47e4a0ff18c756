"""Hungarian matcher: batched vs one image at a time, empty targets, and a brute-force check."""

import itertools
import math

import pytest
import torch

import core.matcher as matcher_module
from core.matcher import HungarianMatcher


def _random_batch(sizes, num_queries=8, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(sizes)
    outputs = {
        "pred_logits": torch.randn(n, num_queries, num_classes, generator=g),
        "pred_boxes": torch.cat(
            [torch.rand(n, num_queries, 2, generator=g), torch.rand(n, num_queries, 2, generator=g) * 0.4 + 0.05], -1
        ),
    }
    targets = [
        {
            "labels": torch.randint(0, num_classes, (k,), generator=g),
            "boxes": torch.cat([torch.rand(k, 2, generator=g), torch.rand(k, 2, generator=g) * 0.4 + 0.05], -1),
        }
        for k in sizes
    ]
    return outputs, targets


def _assert_valid(indices, sizes, num_queries):
    for (src, tgt), k in zip(indices, sizes):
        assert src.dtype == torch.int64 and tgt.dtype == torch.int64
        assert len(src) == len(tgt) == min(k, num_queries)
        assert len(set(src.tolist())) == len(src) and len(set(tgt.tolist())) == len(tgt)


def test_batched_equals_one_image_at_a_time():
    sizes = [3, 0, 5, 1]
    outputs, targets = _random_batch(sizes)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    _assert_valid(batched, sizes, num_queries=8)
    for i, target in enumerate(targets):
        single = matcher({k: v[i : i + 1] for k, v in outputs.items()}, [target])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])


def test_empty_targets():
    outputs, targets = _random_batch([2, 0])
    indices = HungarianMatcher()(outputs, targets)
    assert indices[1][0].numel() == 0 and indices[1][1].numel() == 0
    assert indices[1][0].dtype == torch.int64
    assert len(indices[0][0]) == 2


def test_all_empty_batch():
    outputs, targets = _random_batch([0, 0, 0])
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == 3
    for src, tgt in indices:
        assert src.shape == (0,) and tgt.shape == (0,) and src.dtype == torch.int64


def test_more_targets_than_queries():
    sizes = [6]
    outputs, targets = _random_batch(sizes, num_queries=4)
    _assert_valid(HungarianMatcher()(outputs, targets), sizes, num_queries=4)


def test_perfect_prediction_matches_obvious_assignment():
    num_queries, num_classes = 5, 4
    target_boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.3, 0.2, 0.3], [0.5, 0.8, 0.3, 0.2]])
    target_labels = torch.tensor([1, 3, 0])
    logits = torch.full((1, num_queries, num_classes), -8.0)
    boxes = torch.tensor([[0.9, 0.9, 0.05, 0.05]]).repeat(1, num_queries, 1)
    for query, target in [(3, 0), (0, 1), (4, 2)]:
        logits[0, query, target_labels[target]] = 8.0
        boxes[0, query] = target_boxes[target]
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    src, tgt = HungarianMatcher()(outputs, [{"labels": target_labels, "boxes": target_boxes}])[0]
    assert dict(zip(src.tolist(), tgt.tolist())) == {3: 0, 0: 1, 4: 2}


@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_the_confident_query_wins_with_or_without_alpha_balancing(alpha):
    """Two queries on the target's box, at p = 0.9 and p = 0.001: a negative alpha (no balancing, as in the
    focal loss) must not turn the class cost around."""
    logits = torch.logit(torch.tensor([[[0.9], [0.001]]]))
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    outputs = {"pred_logits": logits, "pred_boxes": box.repeat(1, 2, 1)}
    src, _ = HungarianMatcher(focal_alpha=alpha)(outputs, [{"labels": torch.tensor([0]), "boxes": box}])[0]
    assert src.tolist() == [0]


def _reference_cost(prob, box, label, tgt_box, w_class=2.0, w_bbox=5.0, w_giou=2.0, alpha=0.25, gamma=2.0):
    """One (query, target) cost written from the paper's definitions with Python floats."""
    p = prob[label]
    pos_w, neg_w = (alpha, 1 - alpha) if alpha >= 0 else (1.0, 1.0)  # a negative alpha: no balancing
    pos = pos_w * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = neg_w * p**gamma * -math.log(1 - p + 1e-8)
    l1 = sum(abs(a - b) for a, b in zip(box, tgt_box))

    def corners(b):
        return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2

    ax0, ay0, ax1, ay1 = corners(box)
    bx0, by0, bx1, by1 = corners(tgt_box)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    enclosing = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    giou = inter / union - (enclosing - union) / enclosing
    return w_class * (pos - neg) + w_bbox * l1 - w_giou * giou


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_brute_force(seed):
    num_queries, k = 5, 3
    outputs, targets = _random_batch([k], num_queries=num_queries, seed=seed)
    prob = outputs["pred_logits"][0].sigmoid().tolist()
    boxes = outputs["pred_boxes"][0].tolist()
    labels, tgt_boxes = targets[0]["labels"].tolist(), targets[0]["boxes"].tolist()
    cost = [[_reference_cost(prob[q], boxes[q], labels[t], tgt_boxes[t]) for t in range(k)] for q in range(num_queries)]

    # perm[t] is the query assigned to target t.
    best = min(
        itertools.permutations(range(num_queries), k), key=lambda perm: sum(cost[q][t] for t, q in enumerate(perm))
    )
    src, tgt = HungarianMatcher()(outputs, targets)[0]
    assert {t: q for q, t in zip(src.tolist(), tgt.tolist())} == dict(enumerate(best))
    total = sum(cost[q][t] for q, t in zip(src.tolist(), tgt.tolist()))
    assert total == pytest.approx(sum(cost[q][t] for t, q in enumerate(best)), rel=1e-5)


def test_same_result_under_bf16_autocast():
    outputs, targets = _random_batch([4, 2], seed=3)
    matcher = HungarianMatcher()
    expected = matcher(outputs, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = matcher(outputs, targets)
    for (src_e, tgt_e), (src_g, tgt_g) in zip(expected, got):
        assert torch.equal(src_e, src_g) and torch.equal(tgt_e, tgt_g)


def test_bad_arguments():
    with pytest.raises(ValueError, match="must be non-zero"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
    outputs, targets = _random_batch([2], num_classes=5)
    targets[0]["labels"] = torch.tensor([0, 5])
    with pytest.raises(ValueError, match=r"target labels must be in \[0, 5\)"):
        HungarianMatcher()(outputs, targets)
    with pytest.raises(ValueError, match="one target dict per image"):
        HungarianMatcher()(outputs, [])


@pytest.mark.parametrize("alpha", [0.25, 0.0, -1.0])
def test_cost_matrix_entries_match_the_definition(alpha, monkeypatch):
    """Every entry the assignment sees is w_class * focal cost + w_bbox * L1(cxcywh) - w_giou * GIoU."""
    blocks = []
    real = matcher_module.linear_sum_assignment

    def recording(cost):
        blocks.append(cost.copy())
        return real(cost)

    monkeypatch.setattr(matcher_module, "linear_sum_assignment", recording)
    sizes, num_queries = [3, 2], 6
    outputs, targets = _random_batch(sizes, num_queries=num_queries, seed=7)
    weights = dict(w_class=3.0, w_bbox=7.0, w_giou=1.5)
    matcher = HungarianMatcher(cost_class=3.0, cost_bbox=7.0, cost_giou=1.5, focal_alpha=alpha)
    matcher(outputs, targets)
    assert len(blocks) == len(sizes)
    for i, (block, target) in enumerate(zip(blocks, targets)):
        prob = outputs["pred_logits"][i].sigmoid().tolist()
        boxes = outputs["pred_boxes"][i].tolist()
        labels, tgt_boxes = target["labels"].tolist(), target["boxes"].tolist()
        expected = [
            [
                _reference_cost(prob[q], boxes[q], labels[t], tgt_boxes[t], alpha=alpha, **weights)
                for t in range(sizes[i])
            ]
            for q in range(num_queries)
        ]
        assert block.shape == (num_queries, sizes[i])
        for got_row, expected_row in zip(block.tolist(), expected):
            assert got_row == pytest.approx(expected_row, rel=1e-4, abs=1e-5)
