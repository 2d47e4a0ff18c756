import sys
from pathlib import Path

import pytest
import torch

# ops/ is self-contained: make `import ops` and the test helpers work from any working directory.
_repo = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(_repo) not in sys.path:
    sys.path.insert(0, str(_repo))


def make_inputs(shapes, N=2, Lq=5, M=2, D=4, P=3, dtype=torch.float64, loc_range=(-0.3, 1.3), seed=0):
    """Random op inputs; locations deliberately spill outside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes.prod(1)
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    S, L = int(areas.sum()), len(shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64).to(dtype)
    lo, hi = loc_range
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=torch.float64) * (hi - lo) + lo
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64) + 1e-2
    attn = attn / attn.flatten(-2).sum(-1)[..., None, None]
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    return value, spatial_shapes, level_start_index, loc.to(coord), attn.to(coord)


@pytest.fixture
def inputs_factory():
    return make_inputs
