"""Training and evaluation loops without Ray: parameter groups, schedules, accumulation, clipping, records."""

from __future__ import annotations

import math

import pytest
import torch
from oracle import Oracle, ap_of_shift, coco_ground_truth

from core.build import build_model
from core.evaluation import coco_evaluate, load_coco_gt
from core.postprocess import PostProcess
from pipelines.engine import (
    build_lr_scheduler,
    build_optimizer,
    build_param_groups,
    evaluate,
    freeze_zero_lr_params,
    lr_factor,
    realign_lr_scheduler,
    resolve_amp_dtype,
    train_one_epoch,
)
from pipelines.job_config import TrainConfig, load_job_config


def tiny_model(num_classes=3):
    job = load_job_config(preset="tiny", overrides=[f"model.num_classes={num_classes}"])
    torch.manual_seed(0)
    return build_model(job.detr_config())


def batches(n_batches=3, batch_size=2, seed=0, size=(64, 80)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        h, w = size
        images = torch.randn(batch_size, 3, h, w, generator=g)
        mask = torch.zeros(batch_size, h, w, dtype=torch.bool)
        mask[-1, :, w - 16 :] = True  # the last image is narrower
        images[-1, :, :, w - 16 :] = 0
        targets = []
        for i in range(batch_size):
            k = 1 + i % 2
            boxes = torch.cat([torch.rand(k, 2, generator=g) * 0.4 + 0.3, torch.rand(k, 2, generator=g) * 0.2 + 0.1], 1)
            targets.append(
                {
                    "boxes": boxes,
                    "labels": torch.randint(0, 3, (k,), generator=g),
                    "image_id": 100 * b + i,
                    "orig_size": torch.tensor([2 * h, 2 * w]),
                    "size": torch.tensor([h, w - (16 if i == batch_size - 1 else 0)]),
                }
            )
        out.append({"images": images, "mask": mask, "targets": targets})
    return out


def test_param_groups_follow_the_authors():
    model, _, _ = tiny_model()
    cfg = TrainConfig(lr=2e-4, lr_backbone=2e-5, lr_linear_proj_mult=0.1)
    groups = {g["name"]: g for g in build_param_groups(model, cfg)}
    assert groups["main"]["lr"] == 2e-4
    assert groups["backbone"]["lr"] == 2e-5
    assert math.isclose(groups["linear_proj"]["lr"], 2e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].startswith("backbone.0.") for p in groups["backbone"]["params"])
    assert all(
        ("sampling_offsets" in names[id(p)] or "reference_points" in names[id(p)])
        for p in groups["linear_proj"]["params"]
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in groups.values() for p in g["params"]]
    assert len(grouped) == len(trainable) == len({id(p) for p in grouped})
    # The stem and layer1 are frozen and in no group.
    assert not any(names[id(p)].startswith("backbone.0.body.layer1.") for p in grouped)


def test_zero_backbone_lr_leaves_the_backbone_out():
    model, _, _ = tiny_model()
    groups = build_param_groups(model, TrainConfig(lr_backbone=0))
    assert [g["name"] for g in groups] == ["main", "linear_proj"]


def test_zero_backbone_lr_freezes_the_backbone():
    model, criterion, _ = tiny_model()
    cfg = TrainConfig(lr_backbone=0)
    trainable_backbone = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.0.")]
    assert trainable_backbone, "layer2-4 are trainable by default"
    assert freeze_zero_lr_params(model, cfg) == len(trainable_backbone)
    assert freeze_zero_lr_params(model, TrainConfig()) == 0  # nothing else has lr 0
    # No gradient is computed for a frozen backbone, so none can leak into clipping or the all-reduce.
    images, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    out = model(images, mask)
    target = {"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([1])}
    criterion.total_loss(criterion(out, [target])).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("backbone.0."))
    assert any(p.grad is not None for n, p in model.named_parameters() if not n.startswith("backbone.0."))
    opt = build_optimizer(model, TrainConfig(weight_decay=1e-4))
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)


def test_step_schedule_drops_at_lr_drop():
    cfg = TrainConfig(epochs=50, lr_drop=40, lr_schedule="step")
    assert lr_factor(0, cfg) == 1.0 and lr_factor(39.99, cfg) == 1.0 and lr_factor(40, cfg) == pytest.approx(0.1)
    model, _, _ = tiny_model()
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg, steps_per_epoch=2)
    lrs = []
    for _ in range(50 * 2):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[79] == pytest.approx(2e-4) and lrs[80] == pytest.approx(2e-5)
    # The groups keep their ratios.
    assert opt.param_groups[1]["lr"] == pytest.approx(2e-6)


def test_resume_with_other_steps_per_epoch_keeps_the_lr_drop_at_its_epoch():
    cfg = TrainConfig(epochs=4, lr_drop=2, lr_schedule="step")
    model, _, _ = tiny_model()
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg, steps_per_epoch=10)
    for _ in range(2 * 10 - 1):  # stopped one step before the end of epoch 1 would be 20
        opt.step()
        sched.step()
    state = sched.state_dict()
    # Resumed at epoch 1 on twice the workers: 5 optimizer steps an epoch.
    opt2 = build_optimizer(model, cfg)
    sched2 = build_lr_scheduler(opt2, cfg, steps_per_epoch=5)
    sched2.load_state_dict(state)
    assert realign_lr_scheduler(sched2, 1 * 5) and not realign_lr_scheduler(sched2, 5)
    assert opt2.param_groups[0]["lr"] == pytest.approx(2e-4) and sched2.get_last_lr()[0] == pytest.approx(2e-4)
    lrs = []
    for _ in range(10):
        opt2.step()
        sched2.step()
        lrs.append(opt2.param_groups[0]["lr"])
    # The drop lands at the start of epoch 2 = step 10 of this run, not at the restored step 19 + 1.
    assert lrs[3] == pytest.approx(2e-4) and lrs[4] == pytest.approx(2e-5)


def test_warmup_cosine_rises_then_decays_to_the_floor():
    cfg = TrainConfig(epochs=10, lr_schedule="warmup_cosine", warmup_epochs=1, min_lr_ratio=0.05)
    assert lr_factor(0, cfg) < 0.01
    assert lr_factor(0.5, cfg) == pytest.approx(0.5)
    assert lr_factor(1, cfg) == pytest.approx(1.0)
    assert lr_factor(5.5, cfg) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_factor(10, cfg) == pytest.approx(0.05)
    cos = TrainConfig(epochs=10, lr_schedule="cosine")
    assert lr_factor(0, cos) == 1.0 and lr_factor(10, cos) == pytest.approx(0.0)


def test_amp_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_amp_dtype("auto", cpu) is None
    assert resolve_amp_dtype("auto", cuda) is torch.bfloat16
    assert resolve_amp_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_amp_dtype("off", cuda) is None
    with pytest.raises(ValueError, match="fp16"):
        resolve_amp_dtype("fp16", cpu)


def test_train_one_epoch_learns_and_reports_every_step():
    model, criterion, _ = tiny_model()
    cfg = TrainConfig(lr=1e-3, lr_backbone=1e-4, clip_max_norm=0.1)
    opt = build_optimizer(model, cfg)
    data = batches(2)
    records = []
    first = train_one_epoch(
        model, criterion, data, opt, None, device=torch.device("cpu"), clip_max_norm=0.1, on_step=records.append
    )
    assert first["steps"] == 2 and first["images"] == 4 and len(records) == 2
    rec = records[0]
    for key in (
        "loss",
        "loss_ce",
        "loss_bbox",
        "loss_giou",
        "class_error",
        "lr",
        "lr_backbone",
        "grad_norm",
        "step_images",
        "step_time_s",
    ):
        assert key in rec, key
    assert all(math.isfinite(r["loss"]) for r in records)
    for _ in range(8):
        last = train_one_epoch(model, criterion, data, opt, None, device=torch.device("cpu"), clip_max_norm=0.1)
    assert last["loss"] < first["loss"]


def test_grad_accumulation_steps_and_short_last_group():
    model, criterion, _ = tiny_model()
    cfg = TrainConfig(epochs=1)
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg, steps_per_epoch=2)
    records = []
    out = train_one_epoch(
        model, criterion, batches(3), opt, sched, device=torch.device("cpu"), grad_accum_steps=2, on_step=records.append
    )
    # 3 micro-batches with 2 per step: a full step and a short one.
    assert out["steps"] == 2 and [r["step_images"] for r in records] == [4, 2]
    assert sched.last_epoch == 2
    some_param = next(p for p in model.parameters() if p.requires_grad)
    assert opt.state[some_param]["step"].item() == 2


def test_max_steps_stops_early():
    model, criterion, _ = tiny_model()
    opt = build_optimizer(model, TrainConfig())
    out = train_one_epoch(model, criterion, batches(3), opt, None, device=torch.device("cpu"), max_steps=1)
    assert out["steps"] == 1


def test_non_finite_loss_raises():
    model, criterion, _ = tiny_model()
    opt = build_optimizer(model, TrainConfig())
    criterion.weight_dict["loss_ce"] = float("inf")  # as a diverged run would give
    with pytest.raises(FloatingPointError, match="loss is inf"):
        train_one_epoch(model, criterion, batches(1), opt, None, device=torch.device("cpu"))


def test_evaluate_gives_coco_records_in_original_pixels():
    model, _, _ = tiny_model()
    post = PostProcess(num_select=5, label_map=[1, 3, 7])
    data = batches(2)
    records, image_ids, vis = evaluate(
        model, post, data, device=torch.device("cpu"), num_vis=3, vis_score_threshold=0.0
    )
    assert sorted(image_ids) == [0, 1, 100, 101]
    assert len(records) == 4 * 5
    assert {r["category_id"] for r in records} <= {1, 3, 7}
    assert {r["image_id"] for r in records} == set(image_ids)
    # Boxes are in the ORIGINAL size (twice the batch's 64x80): within ~(0..160) x (0..128).
    for r in records:
        x, y, w, h = r["bbox"]
        assert -1 <= x <= 161 and -1 <= y <= 129 and w >= 0 and h >= 0
    assert len(vis) == 3
    assert vis[0]["image"].dtype.name == "uint8" and vis[0]["image"].shape == (64, 80, 3)
    assert vis[1]["image"].shape == (64, 64, 3)  # the valid region only
    assert set(vis[0]["true_labels"].tolist()) <= {1, 3, 7}
    assert model.training  # restored


@pytest.mark.parametrize("shift", [0.0, 0.2])
def test_evaluate_scores_the_targets_one_and_a_known_shift_its_iou_ap(shift):
    """pycocotools sees boxes in original pixels: the targets themselves score AP 1.0, and boxes moved by a
    fifth of their width (IoU 2/3) hit at the thresholds 0.5-0.65 only: AP 0.4."""
    data = batches(2)
    label_map = [1, 3, 7]
    gt = load_coco_gt(coco_ground_truth(data, label_map))
    oracle = Oracle(data, num_classes=3, shift=shift)
    records, image_ids, _ = evaluate(
        oracle, PostProcess(num_select=5, label_map=label_map), data, device=torch.device("cpu")
    )
    stats = coco_evaluate(gt, records, image_ids)
    assert stats["AP"] == pytest.approx(ap_of_shift(shift), abs=1e-6)
    assert stats["AP50"] == pytest.approx(1.0)


def test_evaluate_leaves_a_model_in_eval_mode_as_it_was():
    model, _, _ = tiny_model()
    model.eval()
    evaluate(model, PostProcess(num_select=3), batches(1), device=torch.device("cpu"))
    assert not model.training


def test_realign_with_a_new_base_lr_at_the_same_step_rebases():
    """An elastic resume on fewer workers at the checkpoint's own step still takes this run's lr."""
    cfg = TrainConfig(epochs=4, lr=1e-3, lr_drop=2, lr_schedule="step")
    layer = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    sched = build_lr_scheduler(opt, cfg, steps_per_epoch=2)
    for _ in range(5):
        opt.step()
        sched.step()
    assert sched.last_epoch == 5 and opt.param_groups[0]["lr"] == pytest.approx(1e-4)  # step 5: epoch 2.5, dropped
    assert realign_lr_scheduler(sched, 5, [5e-4])
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-5) and sched.get_last_lr()[0] == pytest.approx(5e-5)
    assert sched.base_lrs == [5e-4]
    assert not realign_lr_scheduler(sched, 5, [5e-4])  # nothing left to change


def _one_small_batch(model, criterion, opt, **kwargs):
    """``train_one_epoch`` over one batch of one 32x48 image on the CPU."""
    return train_one_epoch(
        model, criterion, batches(1, 1, size=(32, 48)), opt, None, device=torch.device("cpu"), **kwargs
    )


def test_clip_max_norm_zero_does_not_clip():
    """clip_max_norm=0 is off: no grad_norm reported, and the step still moves the weights."""
    model, criterion, _ = tiny_model()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.0))
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    records = []
    _one_small_batch(model, criterion, opt, clip_max_norm=0.0, on_step=records.append)
    assert records[0]["grad_norm"] is None
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_a_short_last_group_steps_with_the_gradient_of_its_batches():
    """One batch left for a group of 2: its step's gradient is that batch's, as without accumulation."""
    model, criterion, _ = tiny_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    grads = []

    def capture():  # in place of the optimizer's step: the weights stay, the gradients are kept
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])

    opt.step = capture
    for accum in (2, 1):
        torch.manual_seed(1)
        assert _one_small_batch(model, criterion, opt, grad_accum_steps=accum)["steps"] == 1
    short, plain = grads
    assert len(short) == len(plain) > 0
    for a, b in zip(short, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
