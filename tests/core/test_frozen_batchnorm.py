"""FrozenBatchNorm2d equals an eval-mode BatchNorm2d with the same statistics, in one pass."""

import pytest
import torch
from torch import nn

from core.backbone import FrozenBatchNorm2d


def _pair(channels: int, seed: int = 0) -> tuple[FrozenBatchNorm2d, nn.BatchNorm2d]:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.randn(channels, generator=g))
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.1)
    frozen = FrozenBatchNorm2d(channels)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    return frozen, bn


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_matches_eval_batchnorm_and_passes_gradients(memory_format):
    frozen, bn = _pair(6)
    x = torch.randn(2, 6, 5, 7).to(memory_format=memory_format).requires_grad_(True)
    out = frozen(x)
    torch.testing.assert_close(out, bn(x), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    expected = (bn.weight * (bn.running_var + bn.eps).rsqrt()).view(1, -1, 1, 1).expand_as(x)
    torch.testing.assert_close(grad, expected)
    assert not any(p.requires_grad for p in frozen.buffers())


def test_half_precision_activation_stays_half():
    frozen, bn = _pair(4, seed=1)
    x = torch.randn(1, 4, 3, 3).to(torch.bfloat16)
    out = frozen(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), bn(x.float()), rtol=2e-2, atol=2e-2)
