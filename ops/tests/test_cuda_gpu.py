"""The CUDA op checks of ``ops.bench.gpu`` as a test: output and 3 gradients against the float64
reference over awkward D and dtypes, gradcheck in float64, indexing past 2**31, streams, CUDA graphs,
torch.compile. Needs a GPU: ``pytest -m gpu ops/tests``; skips without CUDA.
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

# Checks the machine may be unable to run (too little free memory, one GPU); every other one must PASS.
MAY_SKIP = {"int64 indexing (value > 2**31 elements)", "second GPU (cuda:1 while cuda:0 is current)"}


def test_cuda_op_checks():
    from ops.bench.common import PASS, SKIP, Report
    from ops.bench.gpu import run_checks
    from ops.cuda import unfused as cuda_unfused

    ok, reason = cuda_unfused.is_available()
    assert ok, f"the CUDA kernel is unavailable on this GPU machine: {reason}"
    report = Report()
    previous = ops.get_backend()
    ops.set_backend("cuda")  # a check must run the kernel, never the reference fallback
    try:
        run_checks(report, torch.device("cuda", torch.cuda.current_device()))
    finally:
        ops.set_backend(previous)

    names = [c["name"] for c in report.checks]
    assert any(n.startswith("vs reference") for n in names) and "gradcheck float64" in names, names
    not_passed = [
        c for c in report.checks if c["status"] != PASS and not (c["status"] == SKIP and c["name"] in MAY_SKIP)
    ]
    assert not not_passed, "\n".join(f"{c['status']} {c['name']}: {c['detail']}" for c in not_passed)
