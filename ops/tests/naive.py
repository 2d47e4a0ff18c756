"""An independent, loop-by-loop multi-scale deformable attention in float64, for tests only.

Written straight from the definition and differentiable by autograd (the corner choice is the only
non-differentiable step, as in the op itself).
"""

import math

import torch


def naive_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """out[n,q,m] = sum_{l,p} a[n,q,m,l,p] * bilinear(V_l[n,:,m], x*W - 0.5, y*H - 0.5), zeros outside."""
    value = value.double()
    sampling_locations = sampling_locations.double()
    attention_weights = attention_weights.double()
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist()
    starts = [sum(h * w for h, w in shapes[:i]) for i in range(L)]
    rows = []
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                acc = value.new_zeros(D)
                for l, (H, W) in enumerate(shapes):
                    for p in range(P):
                        px = sampling_locations[n, q, m, l, p, 0] * W - 0.5
                        py = sampling_locations[n, q, m, l, p, 1] * H - 0.5
                        x0, y0 = math.floor(px.item()), math.floor(py.item())
                        fx, fy = px - x0, py - y0
                        a = attention_weights[n, q, m, l, p]
                        for dy, wy in ((0, 1 - fy), (1, fy)):
                            for dx, wx in ((0, 1 - fx), (1, fx)):
                                yy, xx = y0 + dy, x0 + dx
                                if 0 <= yy < H and 0 <= xx < W:
                                    acc = acc + a * wy * wx * value[n, starts[l] + yy * W + xx, m]
                rows.append(acc)
    return torch.stack(rows).view(N, Lq, M * D)
