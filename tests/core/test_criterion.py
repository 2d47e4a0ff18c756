"""SetCriterion: finite losses and gradients, aux and encoder keys, focal loss value, weights."""

import math

import pytest
import torch

import core.criterion as criterion_module
from core.build import build_criterion
from core.config import DetrConfig, LossConfig, MatcherConfig, ModelConfig
from core.criterion import SetCriterion, build_weight_dict, sigmoid_focal_loss, total_loss
from core.matcher import HungarianMatcher

NUM_CLASSES = 6
NUM_QUERIES = 10


def _targets(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "labels": torch.randint(0, NUM_CLASSES, (k,), generator=g),
            "boxes": torch.cat(
                [torch.rand(k, 2, generator=g) * 0.6 + 0.2, torch.rand(k, 2, generator=g) * 0.3 + 0.05], -1
            ),
        }
        for k in sizes
    ]


def _outputs(n, num_aux=0, enc=False, seed=0):
    """Outputs from leaf tensors, so their .grad shows whether each loss reaches them."""
    g = torch.Generator().manual_seed(seed)

    def layer():
        logits = torch.randn(n, NUM_QUERIES, NUM_CLASSES, generator=g).requires_grad_()
        raw_boxes = torch.randn(n, NUM_QUERIES, 4, generator=g).requires_grad_()
        return {"pred_logits": logits, "pred_boxes": raw_boxes.sigmoid()}, (logits, raw_boxes)

    outputs, leaves = layer()
    if num_aux:
        outputs["aux_outputs"] = []
        for _ in range(num_aux):
            aux, aux_leaves = layer()
            outputs["aux_outputs"].append(aux)
            leaves += aux_leaves
    if enc:
        outputs["enc_outputs"], enc_leaves = layer()
        leaves += enc_leaves
    return outputs, leaves


def _criterion(dec_layers=1, two_stage=False):
    weights = build_weight_dict(dec_layers=dec_layers, two_stage=two_stage)
    return SetCriterion(NUM_CLASSES, HungarianMatcher(), weights)


def test_finite_losses_and_gradients():
    outputs, leaves = _outputs(3, num_aux=2, enc=True)
    criterion = _criterion(dec_layers=3, two_stage=True)
    losses = criterion(outputs, _targets([4, 1, 2]))
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in losses.values())
    loss = criterion.total_loss(losses)
    loss.backward()
    for leaf in leaves:
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
        assert leaf.grad.abs().sum() > 0


def test_perfect_predictions_have_zero_box_loss():
    targets = _targets([3, 2], seed=1)
    logits = torch.full((2, NUM_QUERIES, NUM_CLASSES), -10.0)
    boxes = torch.tensor([0.5, 0.5, 0.1, 0.1]).repeat(2, NUM_QUERIES, 1)
    for i, t in enumerate(targets):
        queries = torch.arange(len(t["labels"])) * 2 + 1  # not the first queries, so matching matters
        logits[i, queries, t["labels"]] = 10.0
        boxes[i, queries] = t["boxes"]
    losses = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_ce"].item() < 1e-6
    assert losses["class_error"].item() == 0.0
    assert losses["cardinality_error"].item() == 0.0


def test_aux_and_enc_keys():
    outputs, _ = _outputs(2, num_aux=2, enc=True)
    losses = _criterion(dec_layers=3, two_stage=True)(outputs, _targets([2, 3]))
    base = {"loss_ce", "loss_bbox", "loss_giou", "cardinality_error"}
    expected = base | {"class_error"}
    for suffix in ("_0", "_1", "_enc"):
        expected |= {k + suffix for k in base}
    assert set(losses) == expected
    # Without aux_outputs or enc_outputs only the final layer's keys appear.
    outputs, _ = _outputs(2)
    assert set(_criterion()(outputs, _targets([2, 3]))) == base | {"class_error"}


def test_enc_loss_is_class_agnostic():
    outputs, _ = _outputs(2, enc=True, seed=4)
    targets = _targets([3, 2], seed=4)
    criterion = _criterion(two_stage=True)
    losses = criterion(outputs, targets)
    zero_targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
    as_final = criterion(outputs["enc_outputs"], zero_targets)
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[key + "_enc"], as_final[key])
    # The caller's targets are not modified.
    assert targets[0]["labels"].tolist() == _targets([3, 2], seed=4)[0]["labels"].tolist()


def test_no_objects_does_not_divide_by_zero():
    outputs, (logits, raw_boxes) = _outputs(2)
    targets = _targets([0, 0])
    criterion = _criterion()
    assert criterion.num_boxes(targets) == 1.0
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["class_error"].item() == 0.0
    criterion.total_loss(losses).backward()
    # Every query is pushed to "no object"; the box head still gets a (zero) gradient.
    assert logits.grad.abs().sum() > 0
    assert raw_boxes.grad is not None and raw_boxes.grad.abs().sum() == 0


def test_num_boxes_is_averaged_across_workers(monkeypatch):
    # Simulate a second worker holding 5 boxes: the SUM all-reduce gives 3 + 5, averaged over 2 workers.
    def fake_all_reduce(tensor, op=None):
        tensor += 5

    monkeypatch.setattr(criterion_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criterion_module.dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(criterion_module.dist, "get_world_size", lambda: 2)
    assert SetCriterion.num_boxes(_targets([1, 2])) == 4.0


def _reference_focal(logits, targets, num_boxes, alpha=0.25, gamma=2.0):
    total = 0.0
    for x, t in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        if t == 1:
            total += -alpha * (1 - p) ** gamma * math.log(p)
        else:
            total += -(1 - alpha) * p**gamma * math.log(1 - p)
    return total / num_boxes


def test_focal_loss_matches_per_element_formula():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 4, 3, generator=g) * 3
    onehot = torch.zeros(2, 4, 3)
    onehot[0, 1, 2] = onehot[1, 3, 0] = onehot[1, 0, 1] = 1
    got = sigmoid_focal_loss(logits, onehot, num_boxes=3.0)
    assert got.item() == pytest.approx(_reference_focal(logits, onehot, 3.0), rel=1e-5)

    # The authors' form: mean over queries, sum, divide by num_boxes, times the number of queries.
    p = logits.sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    elementwise = (0.25 * onehot + 0.75 * (1 - onehot)) * ce * (1 - p_t) ** 2
    assert got.item() == pytest.approx((elementwise.mean(1).sum() / 3.0 * 4).item(), rel=1e-5)


def test_loss_ce_uses_matched_classes():
    outputs, _ = _outputs(2, seed=6)
    targets = _targets([2, 1], seed=6)
    criterion = _criterion()
    indices = [(torch.tensor([4, 7]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([0]))]
    onehot = torch.zeros(2, NUM_QUERIES, NUM_CLASSES)
    for i, (src, tgt) in enumerate(indices):
        onehot[i, src, targets[i]["labels"][tgt]] = 1
    loss = criterion.loss_labels(outputs, targets, indices, num_boxes=3.0)["loss_ce"]
    assert loss.item() == pytest.approx(_reference_focal(outputs["pred_logits"].detach(), onehot, 3.0), rel=1e-5)


def test_losses_are_float32_under_bf16_autocast():
    outputs, _ = _outputs(2, num_aux=1)
    outputs = {
        "pred_logits": outputs["pred_logits"].bfloat16(),
        "pred_boxes": outputs["pred_boxes"].bfloat16(),
        "aux_outputs": [{k: v.bfloat16() for k, v in outputs["aux_outputs"][0].items()}],
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _criterion(dec_layers=2)(outputs, _targets([2, 3]))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_weight_dict_keys():
    weights = build_weight_dict()
    base = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    expected = dict(base)
    for i in range(5):
        expected.update({f"{k}_{i}": v for k, v in base.items()})
    assert weights == expected
    assert set(build_weight_dict(aux_loss=False)) == set(base)
    two_stage = build_weight_dict(dec_layers=2, two_stage=True, cls_loss_coef=1.0)
    assert set(two_stage) == set(base) | {k + s for k in base for s in ("_0", "_enc")}
    assert two_stage["loss_ce_enc"] == 1.0
    with pytest.raises(ValueError, match="dec_layers must be >= 1, got 0"):
        build_weight_dict(dec_layers=0)


def test_total_loss_weights_losses_and_skips_metrics():
    losses = {"loss_ce": torch.tensor(1.0), "loss_bbox": torch.tensor(2.0), "class_error": torch.tensor(50.0)}
    weights = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    assert total_loss(losses, weights).item() == pytest.approx(12.0)
    with pytest.raises(ValueError, match="no loss in loss_dict has a weight"):
        total_loss({"class_error": torch.tensor(1.0)}, weights)


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(NUM_CLASSES, HungarianMatcher(), {}, losses=("labels", "masks"))


def _one_image_boxes(pred_boxes, target_boxes):
    outputs = {"pred_logits": torch.zeros(1, len(pred_boxes), NUM_CLASSES), "pred_boxes": torch.tensor([pred_boxes])}
    targets = [{"labels": torch.zeros(len(target_boxes), dtype=torch.int64), "boxes": torch.tensor(target_boxes)}]
    return outputs, targets


def test_box_losses_follow_the_match_not_the_target_order():
    """Query 0 is matched to target 1 and query 1 to target 0, each predicting its own target exactly."""
    a, b = [0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]
    outputs, targets = _one_image_boxes([b, a], [a, b])
    indices = [(torch.tensor([0, 1]), torch.tensor([1, 0]))]
    losses = _criterion().loss_boxes(outputs, targets, indices, num_boxes=2.0)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)


def test_box_loss_values_by_hand():
    """Prediction (0.5, 0.5, 0.2, 0.2) against target (0.6, 0.6, 0.2, 0.2), both cxcywh.

    L1 on cxcywh: 0.1 + 0.1 = 0.2 (on xyxy corners it would be 0.4).
    GIoU: xyxy [0.4, 0.4, 0.6, 0.6] and [0.5, 0.5, 0.7, 0.7]; intersection 0.01, union 0.07, enclosing box
    0.09, so GIoU = 1/7 - 0.02/0.09 = -5/63 and 1 - GIoU = 68/63. Both are divided by num_boxes.
    """
    outputs, targets = _one_image_boxes([[0.5, 0.5, 0.2, 0.2]], [[0.6, 0.6, 0.2, 0.2]])
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    criterion = _criterion()
    one = criterion.loss_boxes(outputs, targets, indices, num_boxes=1.0)
    assert one["loss_bbox"].item() == pytest.approx(0.2, rel=1e-5)
    assert one["loss_giou"].item() == pytest.approx(68 / 63, rel=1e-5)
    two = criterion.loss_boxes(outputs, targets, indices, num_boxes=2.0)
    assert two["loss_bbox"].item() == pytest.approx(0.1, rel=1e-5)
    assert two["loss_giou"].item() == pytest.approx(34 / 63, rel=1e-5)


def test_cardinality_counts_queries_above_probability_one_half():
    """Two queries at logit 0.3 (p = 0.57) are detections; -0.3 (p = 0.43) and -5 are not: 2 for 2 targets."""
    logits = torch.full((1, NUM_QUERIES, NUM_CLASSES), -5.0)
    logits[0, 2, 1] = logits[0, 6, 4] = 0.3
    logits[0, 8, 0] = -0.3
    outputs = {"pred_logits": logits, "pred_boxes": torch.full((1, NUM_QUERIES, 4), 0.5)}
    criterion = _criterion()
    two = criterion.loss_cardinality(outputs, _targets([2]), [], num_boxes=2.0)
    assert two["cardinality_error"].item() == 0.0
    three = criterion.loss_cardinality(outputs, _targets([3]), [], num_boxes=3.0)
    assert three["cardinality_error"].item() == 1.0


def test_build_criterion_passes_the_config_to_the_matcher():
    """The matcher's cost weights and focal alpha come from the config's matcher and loss sections."""
    cfg = DetrConfig(
        model=ModelConfig(num_classes=5),
        matcher=MatcherConfig(set_cost_class=2, set_cost_bbox=7, set_cost_giou=3),
        loss=LossConfig(focal_alpha=0.5),
    )
    criterion = build_criterion(cfg)
    matcher = criterion.matcher
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (2, 7, 3)
    assert matcher.focal_alpha == 0.5 and criterion.focal_alpha == 0.5
