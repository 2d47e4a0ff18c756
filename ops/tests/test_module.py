"""MSDeformAttn: shapes, reference-point forms, padding mask, initialization, torch.compile."""

import math

import pytest
import torch

from ops import MSDeformAttn

SHAPES = [[8, 10], [4, 5], [2, 3], [1, 2]]


def _level_inputs(shapes, N=2, C=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.int64)
    areas = ss.prod(1)
    lsi = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S = int(areas.sum())
    return torch.randn(N, S, C, generator=g), ss, lsi


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_output_shape_and_gradients(ref_dim):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=3)
    flat, ss, lsi = _level_inputs(SHAPES)
    query = torch.randn(2, 7, 32, requires_grad=True)
    ref = torch.rand(2, 7, 4, ref_dim)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.5 + 0.05
    out = attn(query, ref, flat, ss, lsi)
    assert out.shape == (2, 7, 32)
    out.square().sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()
    for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
        assert torch.isfinite(getattr(attn, name).weight.grad).all(), name


def test_box_reference_scales_offsets_by_half_box_over_points():
    # With a box reference, a point's location is centre + offset / P * (w, h) / 2. Read it back from
    # a single-level map whose value is the x coordinate of each pixel.
    H, W, P = 1, 64, 2
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=1, n_points=P)
    with torch.no_grad():
        attn.value_proj.weight.copy_(torch.eye(8))
        attn.output_proj.weight.copy_(torch.eye(8))
        attn.sampling_offsets.bias.zero_()
        attn.sampling_offsets.bias.view(1, 1, P, 2)[0, 0, 0, 0] = 1.0  # point 0: +1 in x
        attn.attention_weights.bias.zero_()
        attn.attention_weights.bias[0] = 50.0  # all weight on point 0
    flat = torch.zeros(1, H * W, 8)
    flat[0, :, 0] = (torch.arange(W) + 0.5) / W  # the channel-0 value is the normalized x of the pixel
    ss, lsi = torch.tensor([[H, W]]), torch.tensor([0])
    box = torch.tensor([0.25, 0.5, 0.5, 0.2]).view(1, 1, 1, 4)
    out = attn(torch.zeros(1, 1, 8), box, flat, ss, lsi)
    expected_x = 0.25 + 1.0 / P * 0.5 * 0.5
    assert out[0, 0, 0].item() == pytest.approx(expected_x, abs=1e-3)


def test_padding_mask_ignores_padded_values():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    flat, ss, lsi = _level_inputs([[4, 4], [2, 2]], C=16)
    mask = torch.zeros(2, flat.shape[1], dtype=torch.bool)
    mask[:, 10:] = True
    query, ref = torch.randn(2, 5, 16), torch.rand(2, 5, 2, 2)
    out = attn(query, ref, flat, ss, lsi, mask)
    changed = flat.clone()
    changed[:, 10:] = torch.randn_like(changed[:, 10:]) * 100
    torch.testing.assert_close(attn(query, ref, changed, ss, lsi, mask), out)
    # and without the mask those values do matter
    assert not torch.allclose(attn(query, ref, changed, ss, lsi), out)


def test_padding_mask_zeroes_the_projected_value_not_the_input():
    """Padded positions contribute nothing, not value_proj's bias: with every position padded the
    layer returns output_proj's bias."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    with torch.no_grad():
        attn.value_proj.bias.normal_()
        attn.output_proj.bias.normal_()
    flat, ss, lsi = _level_inputs([[4, 4], [2, 2]], C=16)
    mask = torch.ones(2, flat.shape[1], dtype=torch.bool)
    query, ref = torch.randn(2, 5, 16), torch.rand(2, 5, 2, 2)
    out = attn(query, ref, flat, ss, lsi, mask)
    torch.testing.assert_close(out, attn.output_proj.bias.detach().expand(2, 5, 16))


def test_initialization_matches_the_paper():
    M, L, P = 8, 4, 4
    attn = MSDeformAttn(256, L, M, P)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    bias = attn.sampling_offsets.bias.view(M, L, P, 2)
    for m in range(M):
        angle = 2 * math.pi * m / M
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for p in range(P):
            torch.testing.assert_close(bias[m, :, p], direction.expand(L, 2) * (p + 1))
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    for proj in (attn.value_proj, attn.output_proj):
        bound = math.sqrt(6 / (256 + 256))
        assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 3
        assert torch.count_nonzero(proj.bias) == 0
    assert [n for n, _ in attn.named_parameters()] == [
        "sampling_offsets.weight",
        "sampling_offsets.bias",
        "attention_weights.weight",
        "attention_weights.bias",
        "value_proj.weight",
        "value_proj.bias",
        "output_proj.weight",
        "output_proj.bias",
    ]


def test_d_model_must_divide_by_heads():
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads"):
        MSDeformAttn(d_model=100, n_heads=8)
    with pytest.raises(ValueError, match="n_points must be a positive integer"):
        MSDeformAttn(n_points=0)


def test_module_rejects_bad_shapes():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    flat, ss, lsi = _level_inputs([[4, 4], [2, 2]], C=16)
    with pytest.raises(ValueError, match="reference_points must have shape"):
        attn(torch.randn(2, 5, 16), torch.rand(2, 5, 3, 2), flat, ss, lsi)
    with pytest.raises(ValueError, match="query must have shape"):
        attn(torch.randn(2, 5, 8), torch.rand(2, 5, 2, 2), flat, ss, lsi)
    with pytest.raises(ValueError, match="input_padding_mask"):
        attn(torch.randn(2, 5, 16), torch.rand(2, 5, 2, 2), flat, ss, lsi, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"input_spatial_shapes must have shape \(2, 2\) for n_levels=2"):
        attn(torch.randn(2, 5, 16), torch.rand(2, 5, 2, 2), flat, torch.tensor([[4, 4], [2, 2], [1, 1]]), lsi)


def test_bfloat16_autocast_output_is_close_to_float32():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    flat, ss, lsi = _level_inputs([[4, 4], [2, 2]], C=16)
    query, ref = torch.randn(2, 5, 16), torch.rand(2, 5, 2, 2)
    expected = attn(query, ref, flat, ss, lsi)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(query, ref, flat, ss, lsi)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.slow
def test_torch_compile_fullgraph_cpu():
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    flat, ss, lsi = _level_inputs([[4, 4], [2, 2]], C=16)
    query, ref = torch.randn(2, 5, 16, requires_grad=True), torch.rand(2, 5, 2, 2)
    eager = attn(query, ref, flat, ss, lsi)
    compiled = torch.compile(attn, fullgraph=True, backend="inductor")
    out = compiled(query, ref, flat, ss, lsi)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(query.grad).all()
