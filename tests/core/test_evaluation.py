"""COCO evaluation through real pycocotools on a small hand-made ground truth."""

import torch

from core.evaluation import coco_evaluate, detections_to_coco, format_ap_table, load_coco_gt


def _gt():
    return {
        "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 100, "height": 80}],
        "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [50, 20, 30, 40], "area": 1200, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 1},
        ],
    }


def test_perfect_detections_score_one():
    gt = load_coco_gt(_gt())
    records = detections_to_coco(
        1, {"boxes": torch.tensor([[10.0, 10, 50, 40]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([3])}
    )
    records += detections_to_coco(
        2, {"boxes": torch.tensor([[50.0, 20, 80, 60]]), "scores": torch.tensor([0.8]), "labels": torch.tensor([7])}
    )
    stats = coco_evaluate(gt, records)
    assert stats["AP"] > 0.99 and stats["AP50"] > 0.99
    assert "| AP | AP50" in format_ap_table(stats)


def test_wrong_class_and_no_detections():
    gt = load_coco_gt(_gt())
    wrong = detections_to_coco(
        1, {"boxes": torch.tensor([[10.0, 10, 50, 40]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([7])}
    )
    assert coco_evaluate(gt, wrong)["AP"] == 0.0
    assert coco_evaluate(gt, [])["AP50"] == 0.0


def test_half_overlap_counts_at_iou_50_only():
    gt = load_coco_gt(_gt())
    # IoU with the gt box [10,10,50,40] is 0.6: a hit at 0.5, a miss at 0.75
    det = detections_to_coco(
        1, {"boxes": torch.tensor([[10.0, 10, 50, 28]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([3])}
    )
    stats = coco_evaluate(gt, det, image_ids=[1])
    assert stats["AP50"] > 0.99 and stats["AP75"] == 0.0
