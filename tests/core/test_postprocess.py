"""PostProcess: top-k over queries x classes, scaling to original pixels, the threshold form."""

import pytest
import torch

from core.postprocess import PostProcess


def _outputs(n=2, num_queries=10, num_classes=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(n, num_queries, num_classes, generator=g),
        "pred_boxes": torch.cat(
            [torch.rand(n, num_queries, 2, generator=g), torch.rand(n, num_queries, 2, generator=g) * 0.3], -1
        ),
    }


def test_top_k_shapes_and_order():
    outputs = _outputs()
    results = PostProcess(num_select=100)(outputs, torch.tensor([[480, 640], [300, 200]]))
    assert len(results) == 2
    for r in results:
        assert r["scores"].shape == (100,) and r["labels"].shape == (100,) and r["boxes"].shape == (100, 4)
        assert r["labels"].dtype == torch.int64
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
        assert ((r["labels"] >= 0) & (r["labels"] < 20)).all()
    # The best score is the highest sigmoid over all queries and classes of that image.
    torch.testing.assert_close(results[1]["scores"][0], outputs["pred_logits"][1].sigmoid().max())


def test_num_select_larger_than_queries_times_classes():
    results = PostProcess(num_select=100)(_outputs(num_queries=3, num_classes=4), torch.tensor([[10, 10], [10, 10]]))
    assert results[0]["scores"].shape == (12,)


def test_query_class_decomposition_and_pixel_boxes():
    outputs = _outputs(n=2, num_queries=5, num_classes=8)
    outputs["pred_logits"][1] = -10.0
    outputs["pred_logits"][1, 3, 7] = 10.0  # query 3, class 7
    outputs["pred_boxes"][1, 3] = torch.tensor([0.5, 0.5, 0.2, 0.4])
    # (height, width) = (100, 200): x scales by 200, y by 100.
    results = PostProcess(num_select=5)(outputs, torch.tensor([[50, 50], [100, 200]]))
    assert results[1]["labels"][0].item() == 7
    torch.testing.assert_close(results[1]["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))


def test_threshold_keeps_only_confident_detections():
    outputs = _outputs(n=2, num_queries=6, num_classes=3)
    outputs["pred_logits"][:] = -5.0
    outputs["pred_logits"][0, 1, 2] = 3.0
    outputs["pred_logits"][0, 4, 0] = 1.0
    outputs["pred_logits"][0, 4, 1] = 2.0
    postprocess = PostProcess()
    results = postprocess.threshold(outputs, torch.tensor([[100, 100], [100, 100]]), score_threshold=0.5)
    assert results[0]["scores"].shape == (3,) and results[0]["boxes"].shape == (3, 4)
    assert results[0]["labels"].tolist() == [2, 1, 0]
    assert (results[0]["scores"] > 0.5).all()
    assert results[1]["scores"].shape == (0,) and results[1]["boxes"].shape == (0, 4)
    limited = postprocess.threshold(outputs, torch.tensor([[100, 100], [100, 100]]), max_detections=2)
    assert limited[0]["labels"].tolist() == [2, 1]


def test_label_map():
    outputs = _outputs(n=1, num_queries=4, num_classes=3)
    category_ids = [1, 5, 90]
    plain = PostProcess(num_select=12)(outputs, torch.tensor([[10, 10]]))[0]
    mapped = PostProcess(num_select=12, label_map=category_ids)(outputs, torch.tensor([[10, 10]]))[0]
    assert mapped["labels"].tolist() == [category_ids[i] for i in plain["labels"].tolist()]
    with pytest.raises(ValueError, match="one entry per class"):
        PostProcess(label_map=[1, 2])(outputs, torch.tensor([[10, 10]]))


def test_bad_target_sizes():
    with pytest.raises(ValueError, match=r"target_sizes must be \(N, 2\)"):
        PostProcess()(_outputs(n=2), torch.tensor([[10, 10]]))


def test_threshold_is_strict():
    """A score exactly at the threshold (logit 0: score 0.5) is not "above" it: no detection."""
    outputs = {"pred_logits": torch.zeros(1, 1, 1), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])}
    results = PostProcess().threshold(outputs, torch.tensor([[100, 100]]), score_threshold=0.5)
    assert results[0]["scores"].shape == (0,)
    outputs["pred_logits"][:] = 1e-3
    assert PostProcess().threshold(outputs, torch.tensor([[100, 100]]), score_threshold=0.5)[0]["scores"].shape == (1,)


def test_num_select_must_be_positive():
    with pytest.raises(ValueError, match="num_select must be >= 1, got 0"):
        PostProcess(num_select=0)
    assert PostProcess(num_select=1)(_outputs(n=1), torch.tensor([[10, 10]]))[0]["scores"].shape == (1,)


def test_label_map_longer_than_the_classes_is_refused():
    outputs = _outputs(n=1, num_queries=4, num_classes=3)
    with pytest.raises(ValueError, match=r"one entry per class \(3\), got 4"):
        PostProcess(label_map=[1, 5, 90, 91])(outputs, torch.tensor([[10, 10]]))
