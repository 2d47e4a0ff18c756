"""Detector tests: authors' state_dict layout, variants, variable image sizes, init, autocast, config errors."""

import math
from pathlib import Path

import pydantic
import pytest
import torch
from tiny import tiny_config as shared_tiny_config

from core import DetrConfig, ModelConfig, build_model
from core.backbone import Backbone, ResNet
from core.config import LossConfig
from core.position_encoding import PositionEmbeddingSine
from ops import MSDeformAttn

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"

VARIANTS = {
    "plain": {},
    "with_box_refine": {"with_box_refine": True},
    "two_stage": {"two_stage": True},
    "with_box_refine_two_stage": {"with_box_refine": True, "two_stage": True},
    "num_feature_levels_1": {"num_feature_levels": 1},
}


def tiny_config(**model) -> DetrConfig:
    """The shared tiny model with two encoder layers and 12 queries; the architecture switches are the real ones."""
    return shared_tiny_config(**{"enc_layers": 2, "num_queries": 12, **model})


def padded_batch(sizes=((96, 128), (64, 80)), seed=0):
    """Images of different sizes zero-padded into one batch, with their padding mask."""
    g = torch.Generator().manual_seed(seed)
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    images = torch.zeros(len(sizes), 3, h, w)
    mask = torch.ones(len(sizes), h, w, dtype=torch.bool)
    for i, (hi, wi) in enumerate(sizes):
        images[i, :, :hi, :wi] = torch.randn(3, hi, wi, generator=g)
        mask[i, :hi, :wi] = False
    return images, mask


def make_targets():
    return [
        {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.5]]), "labels": torch.tensor([0, 4])},
    ]


def read_reference(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (REFERENCE_DIR / f"official_state_dict_{name}.txt").read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    return rows


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_matches_authors(variant):
    """ResNet-50, 91 classes: the same keys, in the same order, with the same shapes as the authors'."""
    model, _, _ = build_model(DetrConfig(model=ModelConfig(**VARIANTS[variant])))
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    reference = read_reference(variant)
    assert set(ours) - set(reference) == set(), "keys the authors' checkpoint lacks"
    assert set(reference) - set(ours) == set(), "keys of the authors' checkpoint we lack"
    assert ours == reference


def test_head_sharing_and_aliases():
    plain, _, _ = build_model(tiny_config())
    assert all(m is plain.class_embed[0] for m in plain.class_embed)
    assert all(m is plain.bbox_embed[0] for m in plain.bbox_embed)

    refine, _, _ = build_model(tiny_config(with_box_refine=True, two_stage=True))
    assert refine.class_embed[0] is not refine.class_embed[1]
    assert len(refine.bbox_embed) == refine.transformer.decoder.num_layers + 1  # + proposal head
    sd = refine.state_dict()
    for i in range(len(refine.bbox_embed)):
        # state_dict() detaches: aliases show up as views of the same storage.
        alias, head = sd[f"transformer.decoder.bbox_embed.{i}.layers.2.weight"], sd[f"bbox_embed.{i}.layers.2.weight"]
        assert alias.data_ptr() == head.data_ptr()
        assert sd[f"transformer.decoder.class_embed.{i}.weight"].data_ptr() == sd[f"class_embed.{i}.weight"].data_ptr()


@pytest.mark.parametrize("variant", ["plain", "with_box_refine", "two_stage", "with_box_refine_two_stage"])
def test_initialization(variant):
    kw = VARIANTS[variant]
    model, _, _ = build_model(tiny_config(**kw))
    prior = -math.log((1 - 0.01) / 0.01)
    for head in model.class_embed:
        torch.testing.assert_close(head.bias, torch.full_like(head.bias, prior))
    for head in model.bbox_embed:
        assert torch.count_nonzero(head.layers[-1].weight) == 0
    wh_bias = model.bbox_embed[0].layers[-1].bias[2:]
    expected = 0.0 if kw.get("two_stage") else -2.0
    torch.testing.assert_close(wh_bias, torch.full_like(wh_bias, expected))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_variable_sizes_finite_loss_and_gradients(variant):
    torch.manual_seed(0)
    cfg = tiny_config(**VARIANTS[variant])
    model, criterion, postprocessor = build_model(cfg)
    images, mask = padded_batch()
    outputs = model(images, mask)

    n, q, k = 2, cfg.model.num_queries, cfg.model.num_classes
    assert outputs["pred_logits"].shape == (n, q, k)
    assert outputs["pred_boxes"].shape == (n, q, 4)
    assert ((outputs["pred_boxes"] >= 0) & (outputs["pred_boxes"] <= 1)).all()
    assert len(outputs["aux_outputs"]) == cfg.model.dec_layers - 1
    for aux in outputs["aux_outputs"]:
        assert aux["pred_logits"].shape == (n, q, k) and aux["pred_boxes"].shape == (n, q, 4)
    if cfg.model.two_stage:
        enc = outputs["enc_outputs"]
        assert enc["pred_logits"].shape[:2] == enc["pred_boxes"].shape[:2]
        assert enc["pred_logits"].shape[0] == n and enc["pred_logits"].shape[2] == k
    else:
        assert "enc_outputs" not in outputs

    losses = criterion(outputs, make_targets())
    assert all(torch.isfinite(v) for v in losses.values())
    if cfg.model.two_stage:
        assert "loss_ce_enc" in losses
    loss = criterion.total_loss(losses)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"

    detections = postprocessor(outputs, torch.tensor([[96, 128], [64, 80]]))
    assert len(detections) == 2 and detections[0]["boxes"].shape[-1] == 4


def test_no_aux_loss_and_eval_mode_is_deterministic():
    model, _, _ = build_model(tiny_config(aux_loss=False))
    model.eval()
    images, mask = padded_batch()
    with torch.no_grad():
        a = model(images, mask)
        b = model(images, mask)
    assert "aux_outputs" not in a
    torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=0)


def test_batch_of_one_matches_batched_unpadded_image():
    """The largest image is unpadded in the batch; alone it must give the same detections."""
    model, _, _ = build_model(tiny_config(num_feature_levels=4))
    model.eval()
    images, mask = padded_batch()
    with torch.no_grad():
        batched = model(images, mask)
        alone = model(images[:1], mask[:1])
    torch.testing.assert_close(batched["pred_boxes"][:1], alone["pred_boxes"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched["pred_logits"][:1], alone["pred_logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_end_to_end(dtype):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_config(with_box_refine=True, two_stage=True))
    images, mask = padded_batch()
    reference_dtypes = []
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.register_forward_pre_hook(lambda _, args: reference_dtypes.append(args[1].dtype))
    with torch.autocast("cpu", dtype=dtype):
        outputs = model(images, mask)
        losses = criterion(outputs, make_targets())
        loss = criterion.total_loss(losses)
    # Reference points (hence sampling locations) stay float32 in every attention layer.
    assert reference_dtypes and set(reference_dtypes) == {torch.float32}
    assert outputs["pred_boxes"].dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_backbone_channels_strides_and_freezing():
    for name, channels in (
        ("resnet18", [128, 256, 512]),
        ("resnet34", [128, 256, 512]),
        ("resnet50", [512, 1024, 2048]),
    ):
        assert Backbone(name).num_channels == channels
    backbone = Backbone("resnet50", return_interm_layers=False, dilation=True)
    assert backbone.num_channels == [2048] and backbone.strides == [16]
    frozen = {n for n, p in backbone.body.named_parameters() if not p.requires_grad}
    assert "conv1.weight" in frozen and "layer1.0.conv1.weight" in frozen
    assert "layer2.0.conv1.weight" not in frozen
    assert not any("num_batches_tracked" in k for k in backbone.state_dict())
    features = backbone(torch.randn(1, 3, 64, 96), torch.zeros(1, 64, 96, dtype=torch.bool))
    ((x, m),) = features
    assert x.shape == (1, 2048, 4, 6) and m.shape == (1, 4, 6)


def test_backbone_loads_torchvision_layout_weights(tmp_path):
    """A torchvision state_dict has fc.* and BatchNorm's num_batches_tracked; both are ignored."""
    source = ResNet("resnet18")
    with torch.no_grad():
        for t in source.state_dict().values():
            t.copy_(torch.randn_like(t))
    state = dict(source.state_dict())
    for key in [k for k in state if k.endswith("running_var")]:
        state[key.replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)

    model, _, _ = build_model(tiny_config(backbone_weights=str(path)))
    loaded = model.backbone[0].body.state_dict()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded[key], value)

    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(ValueError, match="missing"):
        build_model(tiny_config(backbone_weights=str(path)))


def test_position_encoding_ignores_padding():
    """The valid part of a padded map is encoded exactly as the same map without padding."""
    pe = PositionEmbeddingSine(32, normalize=True)
    mask = torch.zeros(1, 6, 9, dtype=torch.bool)
    padded = torch.ones(1, 10, 12, dtype=torch.bool)
    padded[:, :6, :9] = False
    torch.testing.assert_close(pe(padded)[..., :6, :9], pe(mask))
    assert pe(mask).shape == (1, 64, 6, 9)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hidden_dim": 96, "nheads": 5}, "hidden_dim must be divisible by nheads"),
        ({"hidden_dim": 48, "nheads": 4}, "hidden_dim must be a multiple of 32"),
        ({"num_feature_levels": 2}, "num_feature_levels"),
        ({"backbone": "resnet18", "dilation": True}, "dilation"),
        ({"backbone": "resnet34", "dilation": True}, "dilation"),
        ({"backbone": "resnet152"}, "backbone"),
        ({"num_queries": 0}, "num_queries"),
        ({"dropout": 1.5}, "dropout"),
        ({"dropout": 1.0}, "dropout"),
        ({"hidden_dimm": 256}, "hidden_dimm"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        ModelConfig(**fields)


def test_config_defaults_are_the_papers():
    cfg = DetrConfig()
    m = cfg.model
    assert (m.backbone, m.hidden_dim, m.nheads, m.enc_layers, m.dec_layers) == ("resnet50", 256, 8, 6, 6)
    assert (m.dim_feedforward, m.dropout, m.num_feature_levels, m.enc_n_points, m.dec_n_points) == (1024, 0.1, 4, 4, 4)
    assert (m.num_queries, m.num_classes, m.with_box_refine, m.two_stage, m.aux_loss) == (300, 91, False, False, True)
    assert m.position_embedding_scale == pytest.approx(2 * math.pi)
    assert (cfg.matcher.set_cost_class, cfg.matcher.set_cost_bbox, cfg.matcher.set_cost_giou) == (2, 5, 2)
    assert (cfg.loss.cls_loss_coef, cfg.loss.bbox_loss_coef, cfg.loss.giou_loss_coef, cfg.loss.focal_alpha) == (
        2,
        5,
        2,
        0.25,
    )
    assert DetrConfig.model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(pydantic.ValidationError, match="extra"):
        DetrConfig.model_validate({"model": {}, "trainer": {}})


def test_two_stage_needs_enough_encoder_positions():
    model, _, _ = build_model(tiny_config(two_stage=True, num_queries=500))
    images, mask = padded_batch(sizes=((64, 64), (64, 64)))
    with pytest.raises(ValueError, match="num_queries"):
        model(images, mask)


def test_box_refinement_starts_each_layer_from_the_previous_layers_boxes():
    """With box refinement, layer l's boxes are sigmoid(bbox_embed[l](hs[l]) + logit(boxes after layer l - 1))."""
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_config(with_box_refine=True, dec_layers=3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the initialization, where the later box heads output 0 and change nothing
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.eval()
    captured = {}
    model.transformer.register_forward_hook(lambda module, args, output: captured.update(out=output))
    images, mask = padded_batch(sizes=((64, 80),))
    with torch.no_grad():
        outputs = model(images, mask)
    hs, inter_references = captured["out"].hs, captured["out"].inter_references
    layer_boxes = [a["pred_boxes"] for a in outputs["aux_outputs"]] + [outputs["pred_boxes"]]
    assert len(layer_boxes) == 3
    for lvl in (1, 2):
        previous = inter_references[lvl - 1].clamp(1e-5, 1 - 1e-5)
        with torch.no_grad():
            expected = (model.bbox_embed[lvl](hs[lvl]) + torch.log(previous / (1 - previous))).sigmoid()
        torch.testing.assert_close(layer_boxes[lvl], expected, rtol=1e-4, atol=1e-5)
    # The layers really move the boxes, so reading another layer's reference would show.
    assert (inter_references[1] - inter_references[0]).abs().max() > 1e-3


def test_dropout_just_below_one_is_accepted():
    assert ModelConfig(dropout=0.99).dropout == 0.99


def test_focal_alpha_range():
    """focal_alpha is a weight in [0, 1], or negative to turn the balancing off."""
    with pytest.raises(pydantic.ValidationError, match="focal_alpha"):
        LossConfig(focal_alpha=1.5)
    assert LossConfig(focal_alpha=1.0).focal_alpha == 1.0
    assert LossConfig(focal_alpha=-1.0).focal_alpha == -1.0


# Every field that shapes the weights, with another valid value (the default model is ResNet-50, two-stage off).
WEIGHT_SHAPING = {
    "backbone": "resnet101",
    "dilation": True,
    "num_feature_levels": 1,
    "enc_layers": 3,
    "dec_layers": 3,
    "dim_feedforward": 512,
    "hidden_dim": 128,
    "nheads": 4,
    "dec_n_points": 2,
    "enc_n_points": 2,
    "with_box_refine": True,
    "two_stage": True,
    "num_queries": 100,
}


def test_architecture_differences_name_every_weight_shaping_field():
    base = ModelConfig()
    for name, value in WEIGHT_SHAPING.items():
        other = ModelConfig(**{name: value})
        assert base.architecture_differences(other, ("checkpoint", "config")) == [
            f"{name}: checkpoint {getattr(base, name)!r}, config {value!r}"
        ]
    assert base.architecture_differences(ModelConfig(dec_n_points=2), ("a", "b")) == ["dec_n_points: a 4, b 2"]
    # The class count only when asked (a fine-tune re-initializes the heads); training switches never.
    classes = ModelConfig(num_classes=3)
    assert base.architecture_differences(classes, ("checkpoint", "config")) == []
    assert base.architecture_differences(classes, ("checkpoint", "config"), with_classes=True) == [
        "num_classes: checkpoint 91, config 3"
    ]
    other = ModelConfig(dropout=0.0, aux_loss=False, position_embedding_scale=1.0, backbone_weights="r50.pth")
    assert base.architecture_differences(other, ("checkpoint", "config")) == []
