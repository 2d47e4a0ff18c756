"""ms_deform_attn_fused on the CPU: equal to softmax + location arithmetic + the unfused op, in values
and in the gradients of every raw input (both reference-point forms), gradcheck in float64, opcheck."""

import pytest
import torch

from ops import MSDeformAttn, ms_deform_attn, ms_deform_attn_fused
from ops.fused import _fused_forward_op

SHAPES = [[6, 7], [3, 4], [1, 2]]


def fused_inputs(ref_dim, N=2, Lq=5, M=2, D=4, P=3, dtype=torch.float64, seed=0):
    """Raw op inputs as MSDeformAttn makes them: offsets of a few pixels, logits of a few units.
    Locations land partly outside the maps, so the border and zero padding are exercised."""
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(SHAPES, dtype=torch.int64)
    areas = ss.prod(1)
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(SHAPES)
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64).to(dtype)
    ref = torch.rand(N, Lq, L, ref_dim, generator=g, dtype=torch.float64)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.6 + 0.1  # box sizes
    offsets = torch.randn(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * 2
    logits = torch.randn(N, Lq, M, L, P, generator=g, dtype=torch.float64) * 2
    return value, ss, lsi, ref.to(coord), offsets.to(coord), logits.to(coord)


def composed(value, ss, lsi, ref, offsets, logits):
    """The fused op spelled out the way MSDeformAttn computed it before the fusion."""
    N, Lq, M, L, P, _ = offsets.shape
    weights = logits.reshape(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
    r = ref[:, :, None, :, None, :]
    if ref.shape[-1] == 2:
        normalizer = torch.stack([ss[..., 1], ss[..., 0]], -1).to(offsets.dtype)
        locations = r + offsets / normalizer[None, None, None, :, None, :]
    else:
        locations = r[..., :2] + offsets / P * r[..., 2:] * 0.5
    return ms_deform_attn(value, ss, lsi, locations, weights)


def _grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    out.backward(grad_out)
    return out.detach(), [t.grad for i, t in enumerate(leaves) if i in (0, 3, 4, 5)]


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_fused_equals_composition_values_and_gradients(ref_dim):
    inputs = fused_inputs(ref_dim)
    out, grads = _grads(ms_deform_attn_fused, inputs)
    want_out, want_grads = _grads(composed, inputs)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("value", "reference_points", "offsets", "attention_logits"), grads, want_grads):
        assert got is not None and got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_fused_float32(ref_dim):
    inputs = fused_inputs(ref_dim, dtype=torch.float32, D=8, P=4)
    out, grads = _grads(ms_deform_attn_fused, inputs)
    want_out, want_grads = _grads(composed, inputs)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_gradcheck_fused(ref_dim):
    value, ss, lsi, ref, offsets, logits = fused_inputs(ref_dim, N=1, Lq=3, M=2, D=3, P=2)
    # Keep points away from pixel-centre lines, where bilinear sampling has a kink.
    args = [value, ss, lsi, ref, offsets, logits]
    for i in (0, 3, 4, 5):
        args[i] = args[i].requires_grad_()
    assert torch.autograd.gradcheck(ms_deform_attn_fused, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_gradcheck_registered_backward(ref_dim):
    """The custom op's own backward (msda::fused_backward: the one torch.compile and a GPU without the
    fused kernel run) against numerical gradients, on levels with H != W."""
    value, ss, lsi, ref, offsets, logits = fused_inputs(ref_dim, N=1, Lq=2, M=2, D=2, P=2)
    args = [value, ss, lsi, ref, offsets, logits]
    for i in (0, 3, 4, 5):
        args[i] = args[i].requires_grad_()
    assert torch.autograd.gradcheck(_fused_forward_op, args, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_low_precision_offsets_are_used_in_float32():
    """bf16 reference points, offsets and logits give the float32 value's answer of their float32
    copies: the locations are not computed in bf16 (off by up to a pixel on a 150-wide map)."""
    g = torch.Generator().manual_seed(0)
    ss = torch.tensor([[40, 150], [20, 75]])
    lsi = torch.tensor([0, 6000])
    value = torch.randn(1, 7500, 2, 4, generator=g)
    for ref_dim in (2, 4):
        ref = torch.rand(1, 10, 2, ref_dim, generator=g).bfloat16()
        offsets = (torch.randn(1, 10, 2, 2, 4, 2, generator=g) * 3).bfloat16()
        logits = torch.randn(1, 10, 2, 2, 4, generator=g).bfloat16()
        out = ms_deform_attn_fused(value, ss, lsi, ref, offsets, logits)
        want = ms_deform_attn_fused(value, ss, lsi, ref.float(), offsets.float(), logits.float())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_no_value_gradient_when_value_is_constant():
    value, ss, lsi, ref, offsets, logits = fused_inputs(2)
    offsets.requires_grad_()
    out = ms_deform_attn_fused(value, ss, lsi, ref, offsets, logits)
    out.sum().backward()
    assert value.grad is None and ref.grad is None and offsets.grad is not None


def test_opcheck_fused_op():
    value, ss, lsi, ref, offsets, logits = fused_inputs(4, N=1, Lq=2, D=2, P=2)
    for t in (value, ref, offsets, logits):
        t.requires_grad_()
    torch.library.opcheck(_fused_forward_op, (value, ss, lsi, ref, offsets, logits))


@pytest.mark.parametrize(
    ("index", "bad", "match"),
    [
        (3, torch.rand(2, 5, 3, 3, dtype=torch.float64), r"reference_points must have shape .*\(2, 5, 3, 2\|4\)"),
        (4, torch.rand(2, 5, 2, 3, 3, dtype=torch.float64), r"offsets must have shape \(N, Lq, M, L, P, 2\)"),
        (5, torch.rand(2, 5, 2, 3, 2, dtype=torch.float64), r"attention_logits must have shape .*\(2, 5, 2, 3, 3\)"),
        (5, torch.zeros(2, 5, 2, 3, 3, dtype=torch.int64), "attention_logits must be a floating-point tensor"),
    ],
)
def test_bad_arguments_are_named(index, bad, match):
    args = list(fused_inputs(2))
    args[index] = bad
    with pytest.raises((ValueError, TypeError), match=match):
        ms_deform_attn_fused(*args)


def test_level_table_is_still_checked():
    value, ss, lsi, ref, offsets, logits = fused_inputs(2)
    with pytest.raises(ValueError, match="level_start_index must be"):
        ms_deform_attn_fused(value, ss, lsi + 1, ref, offsets, logits)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_output_unchanged_by_the_fusion(ref_dim):
    """MSDeformAttn through the fused op equals the layer written with the unfused op (the model's
    parity with the authors rests on this)."""
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3).double()
    with torch.no_grad():  # non-trivial offsets and logits
        layer.sampling_offsets.weight.normal_(0, 0.3)
        layer.attention_weights.weight.normal_(0, 0.3)
    value, ss, lsi, ref, _, _ = fused_inputs(ref_dim, Lq=7)
    flat = torch.randn(2, value.shape[1], 16, dtype=torch.float64)
    query = torch.randn(2, 7, 16, dtype=torch.float64)
    out = layer(query, ref.float(), flat, ss, lsi)

    N, Lq, M, L, P = 2, 7, 2, 3, 3
    v = layer.value_proj(flat).view(N, -1, M, 8)
    offsets = layer.sampling_offsets(query).view(N, Lq, M, L, P, 2)
    logits = layer.attention_weights(query).view(N, Lq, M, L, P)
    want = layer.output_proj(composed(v, ss, lsi, ref.float().double(), offsets, logits))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    layer.fused = False  # the benchmarks' "before" path
    torch.testing.assert_close(layer(query, ref.float(), flat, ss, lsi), out, rtol=1e-5, atol=1e-6)
