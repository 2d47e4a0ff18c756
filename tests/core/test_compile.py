"""torch.compile of the detector: whole-graph capture for every variant, and inductor on the plain one."""

import pytest
import torch
from tiny import tiny_config as shared_tiny_config

from core import DetrConfig, build_model


def tiny_config(**model) -> DetrConfig:
    """The shared tiny model at half its width and 3 levels: compiling is the slow part."""
    base = dict(hidden_dim=32, nheads=2, dim_feedforward=64, num_queries=8, num_classes=3, num_feature_levels=3)
    return shared_tiny_config(**{**base, **model})


def inputs():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 128, generator=g)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True
    return images, mask


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "flags", [{}, {"with_box_refine": True}, {"two_stage": True}, {"with_box_refine": True, "two_stage": True}]
)
def test_forward_and_backward_capture_as_one_graph(flags):
    """fullgraph=True: no graph breaks, including the deformable attention custom op and its backward."""
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_config(**flags))
    model.train()
    images, mask = inputs()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    outputs = compiled(images, mask)
    targets = [
        {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]]), "labels": torch.tensor([2])},
    ]
    loss = criterion.total_loss(criterion(outputs, targets))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.transformer.encoder.layers[0].self_attn.value_proj.weight.grad is not None

    model.eval()
    with torch.no_grad():
        eager = model(images, mask)
        graph = compiled(images, mask)
    torch.testing.assert_close(graph["pred_boxes"], eager["pred_boxes"])
    torch.testing.assert_close(graph["pred_logits"], eager["pred_logits"])


@pytest.mark.slow
def test_inductor_matches_eager():
    """The default backend generates code for the whole forward pass (about 35 s on 2 CPU cores, cold cache)."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_config())
    model.eval()
    images, mask = inputs()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager = model(images, mask)
        graph = compiled(images, mask)
    torch.testing.assert_close(graph["pred_boxes"], eager["pred_boxes"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(graph["pred_logits"], eager["pred_logits"], rtol=1e-4, atol=1e-4)
