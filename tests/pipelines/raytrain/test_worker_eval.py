"""The workers' evaluation end to end on two real torch.distributed ranks (gloo): each infers on its shard,
rank 0 gathers the detections and scores them with pycocotools. An oracle detector makes the AP known in
advance: 1.0 for the targets themselves, the IoU-derived AP for boxes shifted by a known fraction."""

from __future__ import annotations

import json
import multiprocessing
import socket

import pytest
import torch
import torch.distributed as dist
from oracle import Oracle, ap_of_shift, coco_ground_truth

from core.evaluation import load_coco_gt
from core.postprocess import PostProcess
from pipelines.job_config import load_job_config
from pipelines.raytrain.worker_config import DatasetFacts
from pipelines.raytrain.worker_context import WorkerContext
from pipelines.raytrain.worker_eval import distributed_evaluate

LABEL_MAP = [1, 3, 7]


def shard(rank: int) -> list[dict]:
    """Rank 0 gets two batches (3 images), rank 1 one batch (2): shards of unequal length, as Ray Data gives."""
    g = torch.Generator().manual_seed(rank)
    out = []
    for b in range(2 - rank):
        n = 2 if rank else 1 + b
        targets = []
        for i in range(n):
            k = 1 + (b + i) % 3
            centers = torch.rand(k, 2, generator=g) * 0.4 + 0.3
            sizes = torch.rand(k, 2, generator=g) * 0.2 + 0.1
            h, w = 48 + 8 * i, 64
            targets.append(
                {
                    "boxes": torch.cat([centers, sizes], 1),
                    "labels": torch.randint(0, 3, (k,), generator=g),
                    "image_id": 1000 * rank + 10 * b + i,
                    "orig_size": torch.tensor([3 * h, 5 * w]),
                    "size": torch.tensor([h, w]),
                }
            )
        out.append(
            {"images": torch.zeros(n, 3, 56, 64), "mask": torch.zeros(n, 56, 64, dtype=torch.bool), "targets": targets}
        )
    return out


def run_rank(rank: int, port: int, shift: float, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        data = shard(rank)
        job = load_job_config(preset="tiny", overrides=["train.num_vis_images=0"])
        facts = DatasetFacts(
            mode="contiguous",
            num_classes=3,
            category_ids=LABEL_MAP,
            category_names={c: str(c) for c in LABEL_MAP},
            label_to_category_id=LABEL_MAP,
            num_val=5,
        )
        gt = load_coco_gt(coco_ground_truth(shard(0) + shard(1), LABEL_MAP)) if rank == 0 else None
        stats, _ = distributed_evaluate(
            Oracle(data, num_classes=3, shift=shift),
            PostProcess(num_select=5, label_map=LABEL_MAP),
            data,
            job=job,
            ctx=WorkerContext(rank, 2, torch.device("cpu"), None),
            coco_gt=gt,
            dataset=facts,
        )
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(stats, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shift", [0.0, 0.2])
def test_two_ranks_score_the_targets_one_and_a_known_shift_its_iou_ap(shift, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "stats.json"
    ctx = multiprocessing.get_context("fork")  # this module's functions need no import in the children
    procs = [ctx.Process(target=run_rank, args=(rank, port, shift, str(out))) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    stats = json.loads(out.read_text())
    assert stats["num_eval_images"] == 5  # both ranks' images, each once
    assert stats["AP"] == pytest.approx(ap_of_shift(shift), abs=1e-6)
    assert stats["AP50"] == pytest.approx(1.0)
