"""How the op chooses the CUDA kernel: the loud fallback, MSDA_BACKEND=cuda as an error, deterministic
algorithms, no grad_value work when value needs none, and no per-call device sync in inference mode."""

from __future__ import annotations

import warnings

import pytest
import torch

import ops
from ops import backend, functional
from ops.cuda import fused as cuda_fused
from ops.cuda import unfused as cuda_unfused

CUDA0 = torch.device("cuda", 0)


@pytest.fixture
def no_kernel(monkeypatch):
    """A CUDA device whose kernel is unavailable, for the reason a machine without the wheels gives."""
    reason = "NVIDIA's runtime compiler is not installed (No module named 'cuda.bindings')"
    monkeypatch.setattr(cuda_unfused.KERNELS, "availability", {0: (False, reason)})
    monkeypatch.setattr(backend, "_fallback_logged", False)
    monkeypatch.delenv("MSDA_BACKEND", raising=False)
    ops.set_backend(None)
    return reason


def test_fallback_warns_once_naming_cause_and_fix(no_kernel):
    with pytest.warns(RuntimeWarning) as record:
        assert backend.use_cuda_kernel(CUDA0) is False
    (warning,) = record
    text = str(warning.message)
    assert "falls back to the PyTorch reference on cuda:0" in text and no_kernel in text
    assert "pip install 'msda-ops[cuda]'" in text and "MSDA_BACKEND=cuda" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second fallback stays quiet
        assert backend.use_cuda_kernel(CUDA0) is False


def test_msda_backend_cuda_turns_the_fallback_into_an_error(no_kernel, monkeypatch):
    monkeypatch.setenv("MSDA_BACKEND", "cuda")
    with pytest.raises(
        RuntimeError, match=r"MSDA_BACKEND=cuda but the MSDeformAttn CUDA kernel is unavailable on cuda:0: NVIDIA"
    ):
        backend.use_cuda_kernel(CUDA0)


def test_msda_backend_cuda_makes_the_fused_fallback_an_error(monkeypatch):
    reason = "NVIDIA's runtime compiler is not installed (No module named 'cuda.bindings')"
    monkeypatch.setattr(cuda_fused.KERNELS, "availability", {0: (False, reason)})
    monkeypatch.setattr(backend, "_fused_fallback_logged", False)
    monkeypatch.setenv("MSDA_BACKEND", "cuda")
    ops.set_backend(None)
    with pytest.raises(
        RuntimeError, match=r"MSDA_BACKEND=cuda but the fused MSDeformAttn kernel is unavailable on cuda:0: NVIDIA"
    ):
        backend.use_fused_kernel(CUDA0)


def test_cuda_tensors_run_the_kernel_where_it_is_available(monkeypatch):
    monkeypatch.setattr(cuda_unfused.KERNELS, "availability", {0: (True, "")})
    monkeypatch.delenv("MSDA_BACKEND", raising=False)
    ops.set_backend(None)
    assert backend.use_kernel(CUDA0) is True
    monkeypatch.setenv("MSDA_BACKEND", "reference")
    assert backend.use_kernel(CUDA0) is False


def test_reference_backend_is_chosen_quietly(no_kernel, monkeypatch):
    monkeypatch.setenv("MSDA_BACKEND", "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.use_cuda_kernel(CUDA0) is False


def test_deterministic_algorithms_raise_or_warn():
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            backend.check_deterministic("ms_deform_attn's CUDA backward")
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="float atomics"):
            backend.check_deterministic("ms_deform_attn's CUDA backward")
        torch.use_deterministic_algorithms(False)
        backend.check_deterministic("ms_deform_attn's CUDA backward")  # silent
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def test_backward_op_is_told_when_value_needs_no_gradient(inputs_factory, monkeypatch):
    value, spatial_shapes, level_start_index, loc, attn = inputs_factory([[4, 5], [2, 3]])
    seen = []
    original = functional.backward_op

    def spy(*args):
        seen.append(args[-1])
        return original(*args)

    monkeypatch.setattr(functional, "backward_op", spy)
    loc.requires_grad_(True)
    out = ops.ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn)
    (grad_loc,) = torch.autograd.grad(out.sum(), loc)
    value.requires_grad_(True)
    out = ops.ms_deform_attn(value, spatial_shapes, level_start_index, loc, attn)
    grad_value, grad_loc_again = torch.autograd.grad(out.sum(), (value, loc))
    assert seen == [False, True]
    assert grad_value.shape == value.shape and torch.allclose(grad_loc, grad_loc_again)


def test_inference_mode_checks_the_level_table_once(inputs_factory, monkeypatch):
    """Each check reads spatial_shapes and level_start_index back to the host: a device sync on CUDA,
    which every attention layer of every image used to pay in inference mode."""
    monkeypatch.setattr(functional, "_last_checked", None)
    with torch.inference_mode():
        inputs = inputs_factory([[4, 5], [2, 3]])
        calls = []
        original = torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or original(self))
        for _ in range(3):
            functional.validate(*inputs)
        assert len(calls) == 2  # spatial_shapes and level_start_index, once
        shapes = inputs[1].clone()  # another level table is checked again
        functional.validate(inputs[0], shapes, *inputs[2:])
        assert len(calls) == 4
