"""The fused op's GPU checks of ``ops.bench.gpu_fused`` as a test: the fused CUDA kernel against the
float64 composition for every dtype and both reference forms, and CUDA-graph capture. Needs a GPU:
``pytest -m gpu ops/tests``; skips without CUDA.
"""

import pytest
import torch

import ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]


def test_fused_op_checks():
    from ops.bench.common import PASS, Report
    from ops.bench.gpu_fused import run_fused_checks
    from ops.cuda import fused as cuda_fused

    ok, reason = cuda_fused.is_available()
    assert ok, f"the fused CUDA kernel is unavailable on this GPU machine: {reason}"
    report = Report()
    previous = ops.get_backend()
    ops.set_backend("cuda")  # the fused op must run its kernel, never the composition
    try:
        run_fused_checks(report, torch.device("cuda", torch.cuda.current_device()))
    finally:
        ops.set_backend(previous)
    assert len(report.checks) >= 17, [c["name"] for c in report.checks]
    failed = [c for c in report.checks if c["status"] != PASS]
    assert not failed, "\n".join(f"{c['status']} {c['name']}: {c['detail']}" for c in failed)
