"""The reference op and the public custom op against a naive loop, plus gradients."""

import pytest
import torch
from naive import naive_ms_deform_attn

import ops
from ops.reference import ms_deform_attn_reference

SHAPE_SETS = [
    [[3, 4], [1, 5]],  # a 1xW level
    [[5, 6], [3, 3], [1, 1]],  # a 1x1 level
    [[2, 7], [4, 1], [1, 1], [3, 2]],  # four levels, a Hx1 level
]


@pytest.mark.parametrize("D", [1, 3, 30, 32, 71])
@pytest.mark.parametrize("shapes", SHAPE_SETS, ids=["1xW", "1x1", "L4"])
def test_reference_matches_naive_loop(inputs_factory, shapes, D):
    value, ss, lsi, loc, attn = inputs_factory(shapes, D=D, M=2, Lq=3, P=2, seed=D)
    expected = naive_ms_deform_attn(value, ss, loc, attn)
    got = ms_deform_attn_reference(value, ss, lsi, loc, attn)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # the public op (custom op, CPU kernel) must agree too
    torch.testing.assert_close(ops.ms_deform_attn(value, ss, lsi, loc, attn), expected, rtol=1e-10, atol=1e-10)


def test_locations_far_outside_read_zero(inputs_factory):
    value, ss, lsi, loc, attn = inputs_factory([[4, 4], [2, 2]])
    loc = torch.full_like(loc, 5.0)
    out = ops.ms_deform_attn(value, ss, lsi, loc, attn)
    assert torch.count_nonzero(out) == 0


def test_exact_pixel_centres_read_the_pixel():
    # location (x+0.5)/W, (y+0.5)/H is pixel (x, y) itself; one point with weight 1
    H, W = 3, 5
    value = torch.arange(H * W, dtype=torch.float64).view(1, H * W, 1, 1)
    ss = torch.tensor([[H, W]])
    lsi = torch.tensor([0])
    for y in range(H):
        for x in range(W):
            loc = torch.tensor([(x + 0.5) / W, (y + 0.5) / H], dtype=torch.float64).view(1, 1, 1, 1, 1, 2)
            out = ops.ms_deform_attn(value, ss, lsi, loc, torch.ones(1, 1, 1, 1, 1, dtype=torch.float64))
            assert out.item() == pytest.approx(y * W + x)


@pytest.mark.parametrize("loc_range", [(0.05, 0.95), (-0.3, 1.3)], ids=["inside", "across-the-border"])
def test_gradcheck_public_op(inputs_factory, loc_range):
    # Across the border some corners fall outside the map and read zeros, on both sides of the
    # gradient check's small steps (random locations almost never sit on a pixel edge).
    value, ss, lsi, loc, attn = inputs_factory([[3, 4], [2, 2], [1, 1]], N=1, Lq=2, M=2, D=3, P=2, loc_range=loc_range)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, lc, a: ops.ms_deform_attn(v, ss, lsi, lc, a), (value, loc, attn), eps=1e-6, atol=1e-5
    )


def test_gradients_match_naive_autograd(inputs_factory):
    value, ss, lsi, loc, attn = inputs_factory([[3, 4], [1, 5]], N=1, Lq=2, M=2, D=3, P=2, loc_range=(-0.3, 1.3))
    grads = []
    for fn in (
        lambda v, lc, a: ops.ms_deform_attn(v, ss, lsi, lc, a),
        lambda v, lc, a: naive_ms_deform_attn(v, ss, lc, a),
    ):
        ins = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
        out = fn(*ins)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        grads.append([t.grad for t in ins])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)


def test_opcheck_custom_op(inputs_factory):
    value, ss, lsi, loc, attn = inputs_factory([[3, 4], [2, 2]], N=1, Lq=2, M=2, D=3, P=2)
    torch.library.opcheck(
        torch.ops.msda.forward.default,
        (value.requires_grad_(True), ss, lsi, loc.requires_grad_(True), attn.requires_grad_(True)),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_values(inputs_factory, dtype):
    value, ss, lsi, loc, attn = inputs_factory([[5, 6], [3, 3]], D=8, dtype=dtype)
    out = ops.ms_deform_attn(value, ss, lsi, loc, attn)
    assert out.dtype == dtype
    expected = naive_ms_deform_attn(value.double(), ss, loc.double(), attn.double())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    # locations given in half precision are promoted to float32 (and keep gradients)
    loc16 = loc.to(dtype).requires_grad_(True)
    ops.ms_deform_attn(value.float(), ss, lsi, loc16, attn).sum().backward()
    assert loc16.grad is not None and loc16.grad.dtype == dtype


def test_float16_is_computed_in_float32():
    """All-half inputs are sampled in float32: a half grid would misplace points by up to a tenth of a
    pixel on a 300-wide map."""
    g = torch.Generator().manual_seed(0)
    value = torch.randn(1, 600, 1, 4, generator=g).half()
    ss, lsi = torch.tensor([[2, 300]]), torch.tensor([0])
    loc = torch.rand(1, 8, 1, 1, 4, 2, generator=g).half()
    attn = torch.full((1, 8, 1, 1, 4), 0.25, dtype=torch.float16)
    out = ms_deform_attn_reference(value, ss, lsi, loc, attn)
    assert out.dtype == torch.float16
    expected = naive_ms_deform_attn(value, ss, loc, attn)  # float64 from the same half numbers
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=2e-3)
