"""Bad input to ops.ms_deform_attn raises errors that name the argument and the expected shape."""

import pytest
import torch

import ops
from ops.cpu import unfused as cpu_unfused


@pytest.fixture
def good(inputs_factory):
    return inputs_factory([[3, 4], [2, 2]], N=2, Lq=3, M=2, D=4, P=2, dtype=torch.float32)


def test_s_must_equal_sum_of_areas(good):
    value, ss, lsi, loc, attn = good
    with pytest.raises(ValueError, match=r"value has S=16 positions but spatial_shapes .* sum to 17"):
        ops.ms_deform_attn(value, torch.tensor([[3, 4], [1, 5]]), torch.tensor([0, 12]), loc, attn)


def test_level_start_index_checked(good):
    value, ss, lsi, loc, attn = good
    with pytest.raises(ValueError, match=r"level_start_index must be \[0, 12\]"):
        ops.ms_deform_attn(value, ss, torch.tensor([0, 10]), loc, attn)
    with pytest.raises(ValueError, match=r"level_start_index must have shape \(L,\) = \(2,\)"):
        ops.ms_deform_attn(value, ss, torch.tensor([0]), loc, attn)


@pytest.mark.parametrize(
    "index,bad,match",
    [
        (0, lambda t: t[0], r"value must have shape \(N, S, M, D\)"),
        (1, lambda t: t[:, :1], r"spatial_shapes must have shape \(L, 2\)"),
        (3, lambda t: t[..., 0], r"sampling_locations must have shape \(N, Lq, M, L, P, 2\)"),
        (
            3,
            lambda t: t[:, :, :1],
            r"sampling_locations must have shape \(N, Lq, M, L, P, 2\) = \(2, 3, 2, 2, 2, 2\), got \(2, 3, 1, 2, 2, 2\)",
        ),
        (4, lambda t: t[..., :1], r"attention_weights must have shape \(N, Lq, M, L, P\) = \(2, 3, 2, 2, 2\)"),
    ],
)
def test_wrong_rank_or_shape(good, index, bad, match):
    args = list(good)
    args[index] = bad(args[index])
    with pytest.raises(ValueError, match=match):
        ops.ms_deform_attn(*args)


def test_dtype_errors(good):
    value, ss, lsi, loc, attn = good
    with pytest.raises(TypeError, match="value must be float32, float16, bfloat16 or float64, got torch.int64"):
        ops.ms_deform_attn(value.long(), ss, lsi, loc, attn)
    with pytest.raises(TypeError, match="spatial_shapes must be an integer tensor"):
        ops.ms_deform_attn(value, ss.float(), lsi, loc, attn)
    with pytest.raises(TypeError, match="attention_weights must be a floating-point tensor"):
        ops.ms_deform_attn(value, ss, lsi, loc, attn.long())
    with pytest.raises(TypeError, match="sampling_locations must be a torch.Tensor"):
        ops.ms_deform_attn(value, ss, lsi, loc.tolist(), attn)


def test_device_mismatch(good):
    value, ss, lsi, loc, attn = good
    with pytest.raises(ValueError, match="attention_weights is on meta but value is on cpu"):
        ops.ms_deform_attn(value, ss, lsi, loc, attn.to("meta"))


def test_int32_shapes_and_non_contiguous_inputs_are_handled(good):
    value, ss, lsi, loc, attn = good
    expected = ops.ms_deform_attn(value, ss, lsi, loc, attn)
    # non-contiguous views of the same numbers give the same answer
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_nc = loc.transpose(1, 2).contiguous().transpose(1, 2)
    attn_nc = attn.permute(4, 3, 2, 1, 0).contiguous().permute(4, 3, 2, 1, 0)
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or attn_nc.is_contiguous())
    out = ops.ms_deform_attn(value_nc, ss.int(), lsi.int(), loc_nc, attn_nc)
    torch.testing.assert_close(out, expected)


def test_backend_setting(good, monkeypatch):
    value, ss, lsi, loc, attn = good
    monkeypatch.setenv("MSDA_BACKEND", "bogus")
    ops.set_backend(None)
    with pytest.raises(ValueError, match="MSDA_BACKEND must be one of"):
        ops.get_backend()
    monkeypatch.setenv("MSDA_BACKEND", "reference")
    assert ops.get_backend() == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("triton")
    ops.set_backend("cuda")
    try:
        assert ops.get_backend() == "cuda"
        # CPU tensors always run the reference: the setting chooses the path for CUDA tensors
        ops.ms_deform_attn(value, ss, lsi, loc, attn)
    finally:
        ops.set_backend(None)


def test_level_check_cache_sees_in_place_changes(good):
    value, ss, lsi, loc, attn = good
    ops.ms_deform_attn(value, ss, lsi, loc, attn)  # checked and remembered
    ss[1, 0] = 3  # same tensor object, new contents: must be checked again
    with pytest.raises(ValueError, match="sum of H\\*W must equal S"):
        ops.ms_deform_attn(value, ss, lsi, loc, attn)


def test_level_check_cache_sees_a_different_s(good):
    """The same level table with a value one position short is checked again, not waved through."""
    value, ss, lsi, loc, attn = good
    ops.ms_deform_attn(value, ss, lsi, loc, attn)  # checked and remembered
    with pytest.raises(ValueError, match=r"value has S=15 positions .* \(sum of H\*W must equal S\)"):
        ops.ms_deform_attn(value[:, :-1], ss, lsi, loc, attn)


def test_empty_level_rejected(good):
    """A 0 x 5 level adds no positions, so the sums still fit S: it must be refused by itself."""
    value, ss, lsi, loc, attn = good
    with pytest.raises(
        ValueError, match=r"spatial_shapes must hold positive \(H, W\) pairs, got \[\[0, 5\], \[4, 4\]\]"
    ):
        ops.ms_deform_attn(value, torch.tensor([[0, 5], [4, 4]]), torch.tensor([0, 0]), loc, attn)


def test_bool_level_table_rejected(good):
    value, ss, lsi, loc, attn = good
    with pytest.raises(TypeError, match=r"spatial_shapes must be an integer tensor \(int64\), got torch.bool"):
        ops.ms_deform_attn(value, ss.bool(), lsi, loc, attn)
    with pytest.raises(TypeError, match=r"level_start_index must be an integer tensor \(int64\), got torch.bool"):
        ops.ms_deform_attn(value, ss, lsi.bool(), loc, attn)


def test_cpu_kernel_wrapper_refuses_non_contiguous_locations(good):
    """The kernel reads raw pointers: a strided view must be refused before it gets there."""
    value, ss, lsi, loc, attn = good
    loc_nc = loc.transpose(1, 2).contiguous().transpose(1, 2)
    assert not loc_nc.is_contiguous()
    with pytest.raises(ValueError, match="sampling_locations must be contiguous"):
        cpu_unfused.forward(value, ss, lsi, loc_nc, attn)


def test_cpu_kernel_wrapper_checks_the_level_count_of_the_locations(good):
    value, ss, lsi, loc, attn = good
    with pytest.raises(
        ValueError,
        match=r"sampling_locations must have shape \(N, Lq, M, L, P, 2\) = \(2, Lq, 2, 2, P, 2\), got \(2, 3, 2, 1, 2, 2\)",
    ):
        cpu_unfused.forward(value, ss, lsi, loc[:, :, :, :1].contiguous(), attn)


def test_inference_mode_inputs(good):
    value, ss, lsi, loc, attn = good
    with torch.inference_mode():
        ss_i, lsi_i = ss.clone(), lsi.clone()
        out = ops.ms_deform_attn(value, ss_i, lsi_i, loc, attn)
        out2 = ops.ms_deform_attn(value, ss_i, lsi_i, loc, attn)  # the second call meets the level-check cache
    # Both right, not merely equal: against the float64 reference, computed outside inference mode.
    expected = ops.ms_deform_attn_reference(value.double(), ss, lsi, loc.double(), attn.double()).float()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out2, expected, rtol=1e-4, atol=1e-5)


def test_zero_levels_rejected(good):
    value, ss, lsi, loc, attn = good
    # (N, Lq, M, L, P, ...) with L = 0
    loc0, attn0 = loc[:, :, :, :0], attn[:, :, :, :0]
    with pytest.raises(ValueError, match=r"spatial_shapes must hold at least one level \(L >= 1\), got shape \(0, 2\)"):
        ops.ms_deform_attn(value, ss[:0], lsi[:0], loc0, attn0)
    with pytest.raises(ValueError, match="spatial_shapes must hold at least one level"):
        ops.ms_deform_attn_reference(value, ss[:0], lsi[:0], loc0, attn0)
