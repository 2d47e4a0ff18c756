"""The DDP options the Ray Train workers wrap the model with, on this torch and on one before 2.13."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from pipelines.raytrain.worker import no_forward_buffer_sync


def test_this_torchs_ddp_takes_the_option_without_a_deprecation_warning():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        options = no_forward_buffer_sync()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the deprecated name warns on torch >= 2.13
            ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2), **options)
        (name,) = options  # DDP keeps the setting under the option's name
        assert getattr(ddp, name) is False
    finally:
        dist.destroy_process_group()


def test_a_ddp_before_the_rename_gets_the_old_name():
    class DdpOfTorch212:  # the signature's head as torch 2.12 has it
        def __init__(self, module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True): ...

    assert no_forward_buffer_sync(DdpOfTorch212) == {"broadcast_buffers": False}
